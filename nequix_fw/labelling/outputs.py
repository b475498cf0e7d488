"""Labels from the output files of a finished DFT run: VASP's vasprun.xml and OUTCAR (gzipped
or not, as the design's launch_dft.sh names them too)."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import GPa
from monty.io import zopen
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.vasp import Vasprun

from nequix_fw.errors import StructureError
from nequix_fw.labels import Labelled, labels_of
from nequix_fw.structures import Frame


def vasp_result_name(path: Path) -> str | None:
    """For a VASP result file (``OUTCAR``, ``vasprun.xml``, gzipped or not, or the design's
    ``<NAME>_OUTCAR`` / ``<NAME>_vasprun.xml``): NAME ('' without one); None for other files."""
    name = path.name.removesuffix(".gz")
    for kind in ("OUTCAR", "vasprun.xml"):
        if name == kind or name.startswith(kind + "."):
            return ""
        if name.endswith("_" + kind):
            return name[: -len(kind) - 1]
    return None


#: VASP writes this at the end of a run that finished; a truncated OUTCAR lacks it.
OUTCAR_FOOTER = "General timing and accounting informations for this job"


def vasp_result_labels(path: Path) -> Labelled:
    """Final-step labels of a VASP run: vasprun.xml through pymatgen (which refuses truncated
    files), OUTCAR through ASE once VASP's end-of-run footer shows the run finished. Energy is
    e_0 (sigma -> 0) either way."""
    path = Path(path)
    if "OUTCAR" in path.name:
        with zopen(path, "rt", errors="replace") as fh:
            if OUTCAR_FOOTER not in fh.read():
                raise StructureError(f"{path}: truncated OUTCAR (VASP did not finish the run)")
        try:
            atoms = ase.io.read(path, index=-1, format="vasp-out")
        except Exception as exc:
            raise StructureError(f"{path}: unreadable OUTCAR ({exc})") from None
        return labels_of(Frame(atoms, str(path), -1))
    return _vasprun_labels(path)


def parse_vasprun(path: Path) -> tuple[Atoms, float, np.ndarray, np.ndarray | None, dict]:
    """Final structure, energy (eV), forces (eV/Å), ASE stress (eV/Å³) and run facts."""
    run = Vasprun(str(path), parse_dos=False, parse_eigen=False)
    step = run.ionic_steps[-1]
    stress = None
    if step.get("stress") is not None:
        kbar = np.asarray(step["stress"], dtype=float)
        # VASP kBar, compressive positive -> ASE eV/Å3
        stress = full_3x3_to_voigt_6_stress(-0.1 * kbar * GPa)
    atoms = AseAtomsAdaptor.get_atoms(run.final_structure)
    facts = {
        "converged_electronic": bool(run.converged_electronic),
        "converged_ionic": bool(run.converged_ionic),
        "functional": run.parameters.get("GGA") or run.incar.get("METAGGA") or "PE",
        "encut_eV": run.parameters.get("ENCUT"),
    }
    # pymatgen's final_energy is e_0_energy with the fix for VASP versions that write it as 0
    energy = float(run.final_energy)
    return atoms, energy, np.asarray(step["forces"], float), stress, facts


def _vasprun_labels(path: Path) -> Labelled:
    """Final-step labels of a vasprun.xml with pymatgen (which refuses truncated files)."""

    try:
        atoms, energy, forces, stress, _ = parse_vasprun(path)
    except Exception as exc:
        raise StructureError(f"{path}: truncated or unreadable vasprun.xml ({exc})") from None
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    return labels_of(Frame(atoms, str(path), -1))
