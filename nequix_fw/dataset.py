"""Training-set I/O: labelled structures (energy, forces, optional stress) with checked labels."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase.calculators.calculator import PropertyNotImplementedError
from ase.units import Hartree, Rydberg

from nequix_fw.errors import StructureError
from nequix_fw.structures import Frame, iter_frames, structure_id


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
    try:
        energy = float(atoms.get_potential_energy())
    except (PropertyNotImplementedError, RuntimeError):
        raise StructureError(f"{where}: no energy label") from None
    try:
        forces = np.asarray(atoms.get_forces(), dtype=np.float64)
    except (PropertyNotImplementedError, RuntimeError):
        raise StructureError(f"{where}: no forces label") from None
    if forces.shape != (len(atoms), 3):
        raise StructureError(
            f"{where}: forces have shape {forces.shape}, expected ({len(atoms)}, 3)"
        )
    stress = None
    if atoms.pbc.all():
        try:
            stress = np.asarray(atoms.get_stress(voigt=True), dtype=np.float64)
        except (PropertyNotImplementedError, RuntimeError):
            stress = None
    if not np.isfinite(energy) or not np.isfinite(forces).all():
        raise StructureError(f"{where}: non-finite energy or forces label")
    if stress is not None and not np.isfinite(stress).all():
        raise StructureError(f"{where}: non-finite stress label")
    return Labelled(frame=frame, energy=energy, forces=forces, stress=stress)


def read_labelled(inputs: Iterable[str | Path]) -> list[Labelled]:
    """All labelled structures of the inputs (files or directories, any ASE format)."""
    data = [labels_of(f) for f in iter_frames(inputs)]
    for msg in unit_warnings(data):
        warnings.warn(msg, stacklevel=2)
    return data


def unit_warnings(data: Sequence[Labelled]) -> list[str]:
    """Warn when files' energies per atom differ by a Hartree or Rydberg factor (mixed units)."""
    by_file: dict[str, list[float]] = {}
    for d in data:
        by_file.setdefault(d.frame.source, []).append(d.energy / len(d.frame.atoms))
    medians = {src: float(np.median(v)) for src, v in by_file.items()}
    out = []
    files = sorted(medians)
    for i, a in enumerate(files):
        for b in files[i + 1 :]:
            ea, eb = medians[a], medians[b]
            if max(abs(ea), abs(eb)) < 1.0 or ea * eb <= 0:
                continue
            ratio = max(abs(ea), abs(eb)) / min(abs(ea), abs(eb))
            for name, factor in (("Hartree", Hartree), ("Rydberg", Rydberg)):
                if abs(ratio / factor - 1) < 0.05:
                    small = a if abs(ea) < abs(eb) else b
                    out.append(
                        f"{small}: energies per atom are 1/{factor:.2f} of those in "
                        f"{b if small == a else a}: labels look like {name}, not eV"
                    )
    return out


def ids_hash(ids: Iterable[str]) -> str:
    """Order-independent hash of a set of structure ids (names a data subset)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
