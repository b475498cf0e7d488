"""Exploration: candidate structures. So far: distortions (rattling and random cell strain)."""

from __future__ import annotations

import numpy as np
from ase import Atoms


def distorted_copies(
    atoms: Atoms,
    n: int,
    rattle_std: float = 0.05,
    strain_max: float = 0.0,
    seed: int = 0,
) -> list[Atoms]:
    """`n` copies of `atoms`, each with Gaussian displacements (std `rattle_std`, Å) and, for
    periodic cells, a random symmetric strain with components uniform in ±`strain_max`."""
    if rattle_std < 0 or strain_max < 0:
        raise ValueError("rattle_std and strain_max must be >= 0")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = atoms.copy()
        if strain_max > 0 and a.pbc.all():
            e = rng.uniform(-strain_max, strain_max, (3, 3))
            a.set_cell(a.cell[:] @ (np.eye(3) + (e + e.T) / 2), scale_atoms=True)
        a.positions += rng.normal(0.0, rattle_std, a.positions.shape)
        out.append(a)
    return out
