"""Labels attached to a structure (energy, forces, optional stress), read and checked once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase.calculators.calculator import PropertyNotImplementedError
from ase.stress import full_3x3_to_voigt_6_stress

from nequix_fw.errors import StructureError
from nequix_fw.structures import Frame, structure_id


@dataclass
class Labelled:
    """A structure with its reference labels (eV, eV/Å, Voigt eV/Å³ with ASE's sign)."""

    frame: Frame
    energy: float
    forces: np.ndarray
    stress: np.ndarray | None

    @property
    def id(self) -> str:
        return structure_id(self.frame.atoms)

    @property
    def where(self) -> str:
        return f"{self.frame.source} frame {self.frame.frame}"


def labels_of(frame: Frame) -> Labelled:
    """Read and check the labels attached to a frame (e.g. by extxyz, traj, vasprun.xml)."""
    atoms, where = frame.atoms, f"{frame.source} frame {frame.frame}"
    if atoms.calc is None:
        raise StructureError(f"{where}: no energy/forces labels")
    # the labels of this very structure, compared with it once (ASE's getters compare each time)
    known = atoms.calc.results if not atoms.calc.check_state(atoms) else {}
    try:
        energy = float(known["energy"] if "energy" in known else atoms.get_potential_energy())
    except (PropertyNotImplementedError, RuntimeError):
        raise StructureError(f"{where}: no energy label") from None
    try:
        forces = known["forces"] if "forces" in known else atoms.get_forces()
        forces = np.asarray(forces, dtype=np.float64)
    except (PropertyNotImplementedError, RuntimeError):
        raise StructureError(f"{where}: no forces label") from None
    if forces.shape != (len(atoms), 3):
        raise StructureError(
            f"{where}: forces have shape {forces.shape}, expected ({len(atoms)}, 3)"
        )
    stress = None
    if atoms.pbc.all():
        try:
            stress = known["stress"] if "stress" in known else atoms.get_stress(voigt=True)
            stress = np.asarray(stress, dtype=np.float64)
            if stress.shape == (3, 3):
                stress = full_3x3_to_voigt_6_stress(stress)
        except (PropertyNotImplementedError, RuntimeError):
            stress = None
    if not np.isfinite(energy) or not np.isfinite(forces).all():
        raise StructureError(f"{where}: non-finite energy or forces label")
    if stress is not None and not np.isfinite(stress).all():
        raise StructureError(f"{where}: non-finite stress label")
    return Labelled(frame=frame, energy=energy, forces=forces, stress=stress)
