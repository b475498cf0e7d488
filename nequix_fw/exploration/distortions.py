"""Structure generators: rattled/strained copies, vacancies, substitutions, random packings.

Every generated structure carries its provenance in ``info`` (``generator``, ``parent_id``
and the parameters that made it), like the frames sampled by MD.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers, chemical_symbols
from ase.formula import Formula
from ase.units import _amu

from nequix_fw.errors import SettingsError, StructureError


def distorted_copies(
    atoms: Atoms,
    n: int,
    rattle_std: float = 0.05,
    strain_max: float = 0.0,
    seed: int = 0,
    *,
    rattle_distribution: str = "normal",
    strain_volumetric: float = 0.0,
    strain_shear: float = 0.0,
) -> list[Atoms]:
    """`n` copies of `atoms` with random strains (periodic cells only) and displacements.

    Strains (fractions) compose: a random symmetric tensor with components uniform in
    ±`strain_max`, an isotropic part uniform in ±`strain_volumetric` and off-diagonal shears
    uniform in ±`strain_shear`. Displacements: with `rattle_distribution` ``"normal"`` each
    Cartesian component has std `rattle_std` (Å); with ``"uniform"`` each atom moves in a
    random direction by a length uniform in [0, `rattle_std`].
    """
    if min(rattle_std, strain_max, strain_volumetric, strain_shear) < 0:
        raise SettingsError("rattle and strain amplitudes must be >= 0")
    if rattle_distribution not in ("normal", "uniform"):
        raise SettingsError(f"unknown rattle distribution {rattle_distribution!r}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = atoms.copy()
        if a.pbc.all():
            eps = np.zeros((3, 3))
            if strain_max > 0:
                e = rng.uniform(-strain_max, strain_max, (3, 3))
                eps += (e + e.T) / 2
            if strain_volumetric > 0:
                eps += np.eye(3) * rng.uniform(-strain_volumetric, strain_volumetric)
            if strain_shear > 0:
                s = np.zeros((3, 3))
                s[np.triu_indices(3, 1)] = rng.uniform(-strain_shear, strain_shear, 3)
                eps += s + s.T
            if eps.any():
                a.set_cell(a.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
        if rattle_distribution == "normal":
            a.positions += rng.normal(0.0, rattle_std, a.positions.shape)
        else:
            v = rng.normal(size=a.positions.shape)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            a.positions += v * rng.uniform(0.0, rattle_std, (len(a), 1))
        out.append(a)
    return out


def with_vacancies(atoms: Atoms, n: int, rng: np.random.Generator) -> Atoms:
    """A copy of `atoms` with `n` atoms removed at random."""
    if n >= len(atoms):
        raise StructureError(
            f"{atoms.get_chemical_formula()}: cannot make {n} vacancies in {len(atoms)} atoms"
        )
    a = atoms.copy()
    del a[sorted(rng.choice(len(a), size=n, replace=False).tolist())]
    return a


def with_substitutions(
    atoms: Atoms, swaps: dict[str, str], fraction: float, rng: np.random.Generator
) -> Atoms:
    """A copy of `atoms` where, for each ``old: new`` in `swaps`, round(`fraction` x count of
    `old`) atoms (at least one when `fraction` > 0 and `old` is present) become `new`."""
    a = atoms.copy()
    numbers = a.numbers.copy()
    for old, new in swaps.items():
        sites = np.flatnonzero(atoms.numbers == atomic_numbers[old])
        if len(sites) == 0 or fraction == 0:
            continue
        k = min(len(sites), max(1, round(fraction * len(sites))))
        numbers[rng.choice(sites, size=k, replace=False)] = atomic_numbers[new]
    a.numbers = numbers
    return a


def random_packing(
    composition: str,
    density_g_cm3: float,
    min_distance_A: float,
    rng: np.random.Generator,
    max_attempts: int = 2000,
) -> Atoms:
    """`composition` placed at random in a periodic cubic cell of the volume that gives
    `density_g_cm3`, no two atoms (periodic images included) closer than `min_distance_A`."""
    counts = Formula(composition).count()
    numbers = [atomic_numbers[el] for el, k in counts.items() for _ in range(k)]
    mass_g = sum(atomic_masses[z] for z in numbers) * _amu * 1e3
    length = (mass_g / density_g_cm3 * 1e24) ** (1 / 3)  # cm³ -> Å³
    species = rng.permutation(numbers)
    positions = np.zeros((0, 3))
    for z in species:
        for _ in range(max_attempts):
            p = rng.uniform(0, length, 3)
            d = positions - p
            d -= length * np.round(d / length)  # minimum image in a cubic cell
            if len(d) == 0 or np.einsum("ij,ij->i", d, d).min() >= min_distance_A**2:
                positions = np.vstack([positions, p])
                break
        else:
            raise SettingsError(
                f"random packing of {composition} at {density_g_cm3} g/cm³: could not place "
                f"{chemical_symbols[z]} atom {len(positions) + 1} of {len(numbers)} with "
                f"min distance {min_distance_A} Å after {max_attempts} tries; lower the "
                "density or the min distance"
            )
    atoms = Atoms(numbers=species, positions=positions, cell=[length] * 3, pbc=True)
    return atoms[np.argsort(species, kind="stable")]
