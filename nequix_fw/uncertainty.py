"""Ensemble uncertainty metrics and DP-GEN-style trust levels.

Conventions (all spreads are population standard deviations over the M models, ddof=0):

- ``max_force_dev`` (eV/Å): per atom i, ``sqrt(mean_m |F_m,i - mean_m F_m,i|^2)``; max over atoms
  (DP-GEN's ``max_devi_f``). ``mean_force_dev`` is the mean of the same per-atom values.
- ``energy_std_per_atom`` (eV/atom): std of the total energies divided by the number of atoms.
- ``stress_std`` (GPa): std of each of the six Voigt components, max over components; periodic
  cells only (None otherwise).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from ase.units import GPa

TrustClass = Literal["accurate", "candidate", "failed"]


def atomic_force_deviation(forces: np.ndarray) -> np.ndarray:
    """Per-atom force deviation (eV/Å) from forces of shape (M, N, 3)."""
    f = np.asarray(forces, dtype=np.float64)
    return np.sqrt(((f - f.mean(axis=0)) ** 2).sum(axis=-1).mean(axis=0))


def ensemble_metrics(
    energies: np.ndarray, forces: np.ndarray, stresses: np.ndarray | None
) -> dict[str, float | None]:
    """Uncertainty metrics of one structure from per-model energies (M,) in eV, forces (M, N, 3)
    in eV/Å and Voigt stresses (M, 6) in eV/Å³ (or None)."""
    energies = np.asarray(energies, dtype=np.float64)
    dev = atomic_force_deviation(forces)
    n_atoms = dev.shape[0]
    stress_std = None
    if stresses is not None:
        stress_std = float((np.asarray(stresses, dtype=np.float64) / GPa).std(axis=0).max())
    return {
        "max_force_dev": float(dev.max()),
        "mean_force_dev": float(dev.mean()),
        "energy_std_per_atom": float(energies.std() / n_atoms),
        "stress_std": stress_std,
    }


def trust_class(max_force_dev: float, lo: float, hi: float | None) -> TrustClass:
    """'accurate' below `lo`, 'candidate' in [lo, hi), 'failed' at/above `hi` or not finite."""
    if not np.isfinite(max_force_dev):
        return "failed"
    if max_force_dev < lo:
        return "accurate"
    if hi is not None and max_force_dev >= hi:
        return "failed"
    return "candidate"
