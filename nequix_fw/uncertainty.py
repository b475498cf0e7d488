"""Ensemble uncertainty metrics and DP-GEN-style trust levels.

Conventions (all spreads are population standard deviations over the M models, ddof=0):

- ``max_force_dev`` (eV/Å): per atom i, ``sqrt(mean_m |F_m,i - mean_m F_m,i|^2)``; max over atoms
  (DP-GEN's ``max_devi_f``). ``mean_force_dev`` is the mean of the same per-atom values.
- ``energy_std_per_atom`` (eV/atom): std of the total energies divided by the number of atoms.
- ``stress_std`` (GPa): std of each of the six Voigt components, max over components; periodic
  cells only (None otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from ase.units import GPa

TrustClass = Literal["accurate", "candidate", "failed"]

#: The file of a checkpoint's LLPR heads (`nequix_fw.llpr`): member_0.nqx -> member_0.llpr.npz.
LLPR_SUFFIX = ".llpr.npz"


def heads_path(checkpoint: str | Path) -> Path:
    """The LLPR heads file beside `checkpoint`."""
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(p.suffix) + LLPR_SUFFIX)


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


def calibrate(max_force_dev, max_force_error, coverage: float = 0.9) -> dict:
    """How `max_force_dev` (eV/Å) relates to the true max force error (eV/Å) on labelled data.

    ``scale``: the geometric-mean ratio error / deviation (the least-squares fit of
    ``log err = log scale + log dev``), so ``scale * dev`` estimates the error.
    ``conformal_factor``: the split-conformal quantile of that ratio at `coverage`, so that
    ``error <= conformal_factor * dev`` holds for that share of new structures from the same
    distribution (exchangeability). Structures with zero deviation or error are left out.
    """
    dev = np.asarray(max_force_dev, dtype=np.float64)
    err = np.asarray(max_force_error, dtype=np.float64)
    keep = (dev > 0) & (err > 0) & np.isfinite(dev) & np.isfinite(err)
    ratio = err[keep] / dev[keep]
    n = len(ratio)
    if n < 2:
        raise ValueError(f"calibration needs at least 2 structures with a deviation, got {n}")
    level = min(1.0, np.ceil((n + 1) * coverage) / n)  # finite-sample conformal level
    return {
        "scale": float(np.exp(np.log(ratio).mean())),
        "conformal_factor": float(np.quantile(ratio, level, method="higher")),
        "coverage": coverage,
        "n_structures": n,
    }


def lower_trust_level(calibration: dict, target_force_error: float) -> float:
    """The `lo` (eV/Å) below which a structure's max force error is predicted to be under
    `target_force_error` (eV/Å) with the calibration's coverage."""
    return target_force_error / calibration["conformal_factor"]


#: Below this median uncertainty / median error ratio on a validation set, the uncertainty has
#: collapsed: it sees less than a third of the error (`collapse_warning`).
COLLAPSE_RATIO = 0.3


def uncertainty_error_ratio(max_force_dev, max_force_error) -> float | None:
    """The median `max_force_dev` over the median true max force error (both eV/Å) on a
    labelled set: about 1 when the uncertainty is on the scale of the error (LLPR's is fitted
    to be), far below 1 when the members agree where they are wrong. None without errors."""
    err = float(np.median(np.asarray(max_force_error, dtype=np.float64)))
    if not err > 0:
        return None
    return float(np.median(np.asarray(max_force_dev, dtype=np.float64))) / err


def collapse_warning(ratio: float | None, where: str) -> str | None:
    """One line saying what to change when the uncertainty / error `ratio` of `where` is below
    `COLLAPSE_RATIO`, else None."""
    if ratio is None or ratio >= COLLAPSE_RATIO:
        return None
    return (
        f"warning: {where}: the uncertainty has collapsed: median max_force_dev is "
        f"{ratio:.2f}x the median force error (below {COLLAPSE_RATIO}), so structures it calls "
        "accurate may be badly wrong. Give the ensemble an uncertainty that survives "
        "fine-tuning (train_ensemble.uncertainty: llpr, or reinitialise: readout, or "
        "campaign.finetune_from: [nequix-mp-1, nequix-oam-1]) and calibrate the trust levels "
        "(select.lo: auto)."
    )
