"""Property checks of bulk crystals: elastic constants by finite strain and phonon frequencies at
high-symmetry points by finite displacements (phonopy).

Each check is two halves, so that a potential and the reference labels are judged on the very
same cells: the cells to compute (`strained_cells`, `PhononCheck.supercells`) and the fit of
the property from their stresses or forces (`elastic_tensor`, `PhononCheck.frequencies`). The
potential's side is an ensemble's per-model predictions (`ensemble_elastic`,
`ensemble_phonons`: each model's property, then their mean and spread, which says whether a
miss is to be trusted); the reference's is a labelled set of the same cells.

Conventions: strains in Voigt order (xx, yy, zz, yz, xz, xy) with engineering shears (the
xy entry is 2 e_xy); stresses with ASE's sign (positive = tensile); elastic constants of the
clamped-ion (unrelaxed) cell, in GPa; frequencies in THz.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import spglib
from ase import Atoms
from ase.units import GPa

from nequix_fw.errors import NequixFWError, StructureError

#: Strain of each finite-strain cell (±, per Voigt component).
ELASTIC_STRAIN = 0.01
#: Phonopy's displacement (Å) of the finite-displacement supercells.
PHONON_DISPLACEMENT = 0.01
#: High-symmetry points in the reciprocal basis of phonopy's standard primitive cell, by the
#: centring of a cubic lattice (a conventional cubic cell along x, y, z, or ASE's primitive
#: cells); other lattices get Γ only unless q-points are given.
CUBIC_POINTS = {
    "F": {"G": [0.0, 0.0, 0.0], "X": [0.5, 0.0, 0.5], "L": [0.5, 0.5, 0.5]},
    "I": {"G": [0.0, 0.0, 0.0], "H": [0.5, -0.5, 0.5], "N": [0.0, 0.0, 0.5]},
    "P": {"G": [0.0, 0.0, 0.0], "X": [0.0, 0.5, 0.0], "M": [0.5, 0.5, 0.0], "R": [0.5, 0.5, 0.5]},
}

Predict = Callable[[Sequence[Atoms]], list]


def check_bulk(atoms: Atoms, what: str, where: str) -> None:
    """Refuse what is not a periodic bulk cell (a slab, a molecule) with one line."""
    if not atoms.pbc.all() or atoms.cell.rank < 3:
        raise StructureError(
            f"{where}: {what} needs a periodic bulk cell, and {atoms.get_chemical_formula()} "
            f"is periodic along {int(atoms.pbc.sum())} axes"
        )


# -- elastic constants ----------------------------------------------------------------------------


def voigt_strain_matrix(component: int, strain: float) -> np.ndarray:
    """The symmetric strain tensor of Voigt `component` (0-5) at `strain` (engineering shear)."""
    eps = np.zeros((3, 3))
    i, j = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)][component]
    if i == j:
        eps[i, i] = strain
    else:
        eps[i, j] = eps[j, i] = strain / 2
    return eps


#: Every Voigt component, and the two a cubic crystal along x, y, z needs (xx and yz).
ALL_COMPONENTS = (0, 1, 2, 3, 4, 5)
CUBIC_COMPONENTS = (0, 3)


def elastic_components(atoms: Atoms) -> tuple[int, ...]:
    """The strains the elastic check of `atoms` needs: xx and yz for a cubic crystal whose
    cubic axes are x, y and z (4 cells: C11 and C12 from xx, C44 from yz), else all six (12
    cells)."""
    return CUBIC_COMPONENTS if _is_cubic(atoms) else ALL_COMPONENTS


def strained_cells(
    atoms: Atoms, strain: float = ELASTIC_STRAIN, components: tuple[int, ...] = ALL_COMPONENTS
) -> list[Atoms]:
    """`atoms` under -strain and +strain along each Voigt component of `components`, atoms
    moved with the cell (clamped ions), in that order."""
    cells = []
    for component in components:
        for sign in (-1, 1):
            eps = voigt_strain_matrix(component, sign * strain)
            a = atoms.copy()
            a.calc = None
            a.set_cell(a.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
            cells.append(a)
    return cells


def elastic_tensor(
    stresses: np.ndarray,
    strain: float = ELASTIC_STRAIN,
    components: tuple[int, ...] = ALL_COMPONENTS,
) -> np.ndarray:
    """The 6x6 elastic tensor (GPa) from the Voigt stresses (eV/Å³, ASE's sign) of the
    `strained_cells` of `components`, by central differences: C_ij = dσ_i/dε_j, symmetrised;
    from the cubic components, the cubic tensor of C11, C12 and C44."""
    s = np.asarray(stresses, dtype=float).reshape(len(components), 2, 6)
    cols = ((s[:, 1] - s[:, 0]) / (2 * strain)).T / GPa  # (6, len(components))
    if tuple(components) == CUBIC_COMPONENTS:
        c11, c12, c44 = cols[0, 0], (cols[1, 0] + cols[2, 0]) / 2, cols[3, 1]
        c = np.diag([c11] * 3 + [c44] * 3)
        c[:3, :3] += c12 * (1 - np.eye(3))
        return c
    if tuple(components) != ALL_COMPONENTS:
        raise ValueError(f"elastic tensor from components {components}: all six, or (0, 3)")
    return (cols + cols.T) / 2


def cubic_constants(c: np.ndarray) -> dict[str, float]:
    """C11, C12 and C44 (GPa) of a cubic crystal's tensor (averaged over the equivalent
    entries)."""
    c = np.asarray(c)
    return {
        "C11": float(np.mean([c[0, 0], c[1, 1], c[2, 2]])),
        "C12": float(np.mean([c[0, 1], c[0, 2], c[1, 2]])),
        "C44": float(np.mean([c[3, 3], c[4, 4], c[5, 5]])),
    }


def ensemble_elastic(
    predict: Predict,
    atoms: Atoms,
    strain: float = ELASTIC_STRAIN,
    components: tuple[int, ...] = ALL_COMPONENTS,
) -> dict:
    """Each model's elastic tensor from its stresses on the `strained_cells` (`predict`: an
    `Ensemble.predict`), and the mean and spread over the models (GPa)."""
    check_bulk(atoms, "an elastic-constant check", atoms.get_chemical_formula())
    preds = predict(strained_cells(atoms, strain, components))
    per_model = np.stack([p.stresses for p in preds], axis=1)  # (M, cells, 6)
    tensors = np.array([elastic_tensor(s, strain, components) for s in per_model])
    return {"mean": tensors.mean(axis=0), "std": tensors.std(axis=0), "per_model": tensors}


# -- phonons --------------------------------------------------------------------------------------


def _phonopy():
    try:
        return importlib.import_module("phonopy")
    except ImportError:
        raise NequixFWError(
            "phonon checks need phonopy: pip install 'nequix-fw[phonons]' (or pip install phonopy)"
        ) from None


@dataclass
class PhononCheck:
    """Phonon frequencies at high-symmetry points of a bulk cell, by phonopy's finite
    displacements on a `supercell` of it (its primitive cell found by phonopy)."""

    atoms: Atoms
    supercell: Sequence[int] = (2, 2, 2)
    displacement_A: float = PHONON_DISPLACEMENT
    qpoints: dict[str, list[float]] | None = None
    _phonon: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_bulk(self.atoms, "a phonon check", self.atoms.get_chemical_formula())
        phonopy = _phonopy()
        from phonopy.structure.atoms import PhonopyAtoms  # noqa: PLC0415 (optional extra)

        cell = PhonopyAtoms(
            symbols=self.atoms.get_chemical_symbols(),
            cell=self.atoms.cell[:],
            scaled_positions=self.atoms.get_scaled_positions(),
        )
        with warnings.catch_warnings():  # 'auto' is our choice, not phonopy's default
            warnings.filterwarnings("ignore", message="primitive_matrix defaulted")
            self._phonon = phonopy.Phonopy(
                cell, supercell_matrix=np.diag(self.supercell), primitive_matrix="auto"
            )
        self._phonon.generate_displacements(distance=self.displacement_A)
        if self.qpoints is None:
            self.qpoints = self.default_qpoints()

    def default_qpoints(self) -> dict[str, list[float]]:
        """Γ and the cubic lattice's high-symmetry points (`CUBIC_POINTS`); Γ alone for
        other lattices."""
        symbol = self._phonon.primitive_symmetry.dataset.international
        number = self._phonon.primitive_symmetry.dataset.number
        if number >= 195:  # cubic
            return dict(CUBIC_POINTS[symbol[0]])
        return {"G": [0.0, 0.0, 0.0]}

    def supercells(self) -> list[Atoms]:
        """The displaced supercells whose forces the frequencies need."""
        return [
            Atoms(s.symbols, cell=s.cell, scaled_positions=s.scaled_positions, pbc=True)
            for s in self._phonon.supercells_with_displacements
        ]

    def frequencies(self, forces: np.ndarray) -> dict[str, list[float]]:
        """Frequencies (THz, ascending) at each q-point from the forces (eV/Å) on the
        `supercells`, in their order."""
        self._phonon.forces = np.asarray(forces, dtype=float)
        self._phonon.produce_force_constants()
        names = list(self.qpoints)
        self._phonon.run_qpoints([self.qpoints[n] for n in names])
        freqs = self._phonon.qpoints.frequencies
        return {n: [float(f) for f in freq] for n, freq in zip(names, freqs, strict=True)}


def ensemble_phonons(predict: Predict, check: PhononCheck) -> dict:
    """Each model's frequencies from its forces on the check's supercells, and their mean and
    spread over the models (THz), per q-point."""
    preds = predict(check.supercells())
    forces = np.stack([p.forces for p in preds], axis=1)  # (M, n displacements, atoms, 3)
    per_model = [check.frequencies(f) for f in forces]
    out = {}
    for q in check.qpoints:
        f = np.array([m[q] for m in per_model])
        out[q] = {"mean": f.mean(axis=0).tolist(), "std": f.std(axis=0).tolist()}
    return out


def relative_errors(model: Sequence[float], reference: Sequence[float], floor: float) -> list:
    """Percent errors of `model` against `reference`, entry by entry; entries whose reference
    is below `floor` in magnitude (e.g. acoustic modes at Γ) are left out (None)."""
    return [
        None if abs(r) < floor else float(100 * (m - r) / r)
        for m, r in zip(model, reference, strict=True)
    ]


# -- the checks of a validation -------------------------------------------------------------------

#: Reference frequencies (THz) below this are left out of the errors (acoustic modes at Γ).
PHONON_FLOOR_THZ = 0.5


def _is_cubic(atoms: Atoms) -> bool:
    """Whether `atoms` is a cubic crystal with its cubic axes along x, y and z (a standard
    conventional cell, or ASE's primitive cells of one)."""
    if not atoms.pbc.all():
        return False
    cell = (atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers)
    dataset = spglib.get_symmetry_dataset(cell, symprec=1e-3)
    if dataset is None or dataset.number < 195:
        return False
    rotation = np.asarray(dataset.std_rotation_matrix)
    return bool(
        np.allclose(np.abs(rotation).sum(axis=0), 1)
        and np.allclose(np.abs(rotation).max(axis=0), 1)
    )


def elastic_constants(c: np.ndarray, cubic: bool, reference: np.ndarray) -> dict[str, float]:
    """Named constants (GPa) of tensor `c`: C11, C12, C44 of a cubic crystal; otherwise every
    C_ij (i <= j) that is at least 5 % of the largest entry of the `reference` tensor."""
    if cubic:
        return cubic_constants(c)
    big = np.abs(reference).max()
    return {
        f"C{i + 1}{j + 1}": float(c[i, j])
        for i in range(6)
        for j in range(i, 6)
        if abs(reference[i, j]) >= 0.05 * big
    }


def elastic_check(predict: Predict, atoms: Atoms, reference_stresses: np.ndarray) -> dict:
    """The ensemble's elastic constants against the reference's, from the reference's stresses
    (eV/Å³) on the `strained_cells` of `atoms` (of its `elastic_components`): each constant's
    mean, spread and reference (GPa), its error (%), and the largest error by size, with its
    sign (``error_percent``)."""
    components = elastic_components(atoms)
    mine = ensemble_elastic(predict, atoms, components=components)
    ref = elastic_tensor(reference_stresses, components=components)
    cubic = components == CUBIC_COMPONENTS
    names = elastic_constants(ref, cubic, ref)
    mean, std = (
        elastic_constants(mine["mean"], cubic, ref),
        elastic_constants(mine["std"], cubic, ref),
    )
    constants = {
        n: {
            "model": mean[n],
            "model_std": std[n],
            "reference": names[n],
            "error_percent": 100 * (mean[n] - names[n]) / names[n],
        }
        for n in names
    }
    return {
        "formula": atoms.get_chemical_formula(),
        "cubic": cubic,
        "strain": ELASTIC_STRAIN,
        "constants_GPa": constants,
        "error_percent": max((v["error_percent"] for v in constants.values()), key=abs),
    }


def phonon_check(predict: Predict, check: PhononCheck, reference_forces: np.ndarray) -> dict:
    """The ensemble's phonon frequencies against the reference's, from the reference's forces
    (eV/Å) on the check's supercells: per q-point the modes' mean, spread and reference (THz)
    and their errors (%; modes under `PHONON_FLOOR_THZ` left out), and the largest error by
    size, with its sign."""
    mine = ensemble_phonons(predict, check)
    ref = check.frequencies(reference_forces)
    points = {}
    for q, freqs in ref.items():
        errors = relative_errors(mine[q]["mean"], freqs, PHONON_FLOOR_THZ)
        points[q] = {
            "qpoint": check.qpoints[q],
            "model_THz": mine[q]["mean"],
            "model_std_THz": mine[q]["std"],
            "reference_THz": freqs,
            "error_percent": errors,
        }
    errors = [e for p in points.values() for e in p["error_percent"] if e is not None]
    return {
        "formula": check.atoms.get_chemical_formula(),
        "supercell": list(check.supercell),
        "qpoints": points,
        "error_percent": max(errors, key=abs) if errors else None,
    }
