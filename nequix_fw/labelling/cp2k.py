"""Label with CP2K under custodian (Quickstep, GTH basis sets and potentials).

Inputs: the user's CP2K template (``cp2k_template``) with &CELL and &COORD replaced per
structure by pymatgen's input classes, or a pymatgen CP2K input set (``cp2k_input_set``, e.g.
``StaticSet`` with ``cp2k_input_set_params``) generated per periodic structure; either way
RUN_TYPE ENERGY_FORCE, forces printed and, for periodic cells, the analytical stress tensor.
Data files come from ``cp2k_data_dir`` (CP2K_DATA_DIR).

Labels: energy = the last ``ENERGY| Total FORCE_EVAL`` line (Hartree -> eV with ASE's constant);
forces and stress parsed with pymatgen's ``Cp2kOutput``: forces (Hartree/Bohr -> eV/Å), stress
(CP2K prints GPa with positive = compressive; stored in ASE's convention,
``stress = -stress_CP2K``, as eV/Å³).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import shutil
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import Bohr, GPa, Hartree
from custodian import Custodian
from custodian.cp2k import handlers as h
from custodian.cp2k.jobs import Cp2kJob
from custodian.cp2k.validators import Cp2kOutputValidator
from pymatgen.core import Lattice
from pymatgen.io.ase import AseAtomsAdaptor

from nequix_fw.errors import SettingsError
from nequix_fw.labelling.base import (
    LabellingBackend,
    LabelResult,
    custodian_corrections,
    import_class,
    singlepoint,
)
from nequix_fw.settings import LabellingSettings

INPUT, OUTPUT = "cp2k.inp", "cp2k.out"


def input_set_class(name: str) -> type:
    """A pymatgen CP2K input set class by name (in pymatgen.io.cp2k.sets) or 'module:Class'."""
    from pymatgen.io.cp2k.sets import DftSet  # noqa: PLC0415

    return import_class(name, "pymatgen.io.cp2k.sets", DftSet, "label.cp2k_input_set")


def parse_output(path: Path) -> tuple[float, np.ndarray, np.ndarray | None, bool]:
    """Energy (eV), forces (eV/Å), ASE-convention stress (eV/Å³, Voigt) and SCF convergence."""
    from pymatgen.io.cp2k.outputs import Cp2kOutput  # noqa: PLC0415

    text = path.read_text(errors="replace")
    totals = re.findall(r"ENERGY\| Total FORCE_EVAL.*?:\s+(\S+)", text)
    if not totals:
        raise ValueError("no 'ENERGY| Total FORCE_EVAL' line")
    energy = float(totals[-1]) * Hartree  # with ASE's Hartree, like every other unit here
    out = Cp2kOutput(str(path), auto_load=False)
    out.parse_forces()
    forces = np.asarray(out.data["forces"][-1], dtype=float) * Hartree / Bohr
    stress = None
    if "STRESS|" in text:
        out.parse_stresses()
        stress = -full_3x3_to_voigt_6_stress(np.asarray(out.data["stress_tensor"][-1])) * GPa
    converged = "SCF run NOT converged" not in text and "SCF run converged" in text
    return energy, forces, stress, converged


#: Version of the default input below: part of its settings hash, so a change of the input is a
#: new level of theory.
DEFAULT_VERSION = 1
BASIS_FILE, POTENTIAL_FILE = "BASIS_MOLOPT", "GTH_POTENTIALS"


@functools.lru_cache(maxsize=8)
def _data_file(path: Path) -> str:
    """A CP2K data file's text, read once per process (they are megabytes)."""
    return path.read_text(errors="replace")


def basis_and_potential(element: str, data_dir: Path) -> tuple[str, str]:
    """The DZVP-MOLOPT-SR-GTH basis (else DZVP-MOLOPT-GTH) and the GTH-PBE potential of an
    element in CP2K's data directory."""
    basis_text, pot_text = _data_file(data_dir / BASIS_FILE), _data_file(data_dir / POTENTIAL_FILE)
    basis = next(
        (
            b
            for b in ("DZVP-MOLOPT-SR-GTH", "DZVP-MOLOPT-GTH")
            if re.search(rf"^\s*{element}\s+{b}\b", basis_text, re.M)
        ),
        None,
    )
    pot = re.search(rf"^\s*{element}\s+(GTH-PBE-q\d+)\b", pot_text, re.M)
    if basis is None or pot is None:
        what = "DZVP-MOLOPT basis" if basis is None else "GTH-PBE potential"
        raise SettingsError(
            f"the default CP2K input has no {what} for {element} in "
            f"{data_dir}: give label.cp2k_template"
        )
    return basis, pot.group(1)


def kpoint_grid(atoms: Atoms, spacing: float) -> list[int]:
    """Monkhorst-Pack divisions with at most `spacing` (Å⁻¹, 2π included) between k-points."""
    if not atoms.pbc.all():
        return [1, 1, 1]
    b = 2 * np.pi * np.linalg.norm(atoms.cell.reciprocal(), axis=1)
    return [max(1, int(np.ceil(x / spacing))) for x in b]


def default_input(atoms: Atoms, settings: LabellingSettings) -> str:
    """The default CP2K input for `atoms`: PBE, DZVP-MOLOPT(-SR)-GTH basis sets and GTH-PBE
    potentials, `cp2k_cutoff_Ry`, a Monkhorst-Pack grid of `cp2k_kpoint_spacing`; the SCF by
    diagonalisation with Broyden mixing and Fermi-Dirac smearing (300 K), which converges for
    metals and insulators alike (OT does not take k-points or smearing). &CELL and &COORD are
    filled in by the backend."""
    kinds = []
    for el in sorted(set(atoms.get_chemical_symbols())):
        basis, pot = basis_and_potential(el, Path(settings.cp2k_data_dir))
        kinds.append(
            f"    &KIND {el}\n      BASIS_SET {basis}\n      POTENTIAL {pot}\n    &END KIND"
        )
    grid = kpoint_grid(atoms, settings.cp2k_kpoint_spacing)
    kpoints = (
        ""
        if grid == [1, 1, 1]
        else (
            "    &KPOINTS\n      SCHEME MONKHORST-PACK "
            + " ".join(map(str, grid))
            + "\n      SYMMETRY OFF\n      FULL_GRID OFF\n    &END KPOINTS\n"
        )
    )
    n_added = max(8, len(atoms))
    return f"""&GLOBAL
  PROJECT cp2k
  RUN_TYPE ENERGY_FORCE
  PRINT_LEVEL LOW
&END GLOBAL
&FORCE_EVAL
  METHOD Quickstep
  &DFT
    BASIS_SET_FILE_NAME {BASIS_FILE}
    POTENTIAL_FILE_NAME {POTENTIAL_FILE}
    &MGRID
      CUTOFF {settings.cp2k_cutoff_Ry}
      REL_CUTOFF 50
    &END MGRID
    &QS
      EPS_DEFAULT 1.0E-10
    &END QS
{kpoints}    &SCF
      SCF_GUESS ATOMIC
      EPS_SCF 1.0E-6
      MAX_SCF 200
      ADDED_MOS {n_added}
      &DIAGONALIZATION
        ALGORITHM STANDARD
      &END DIAGONALIZATION
      &MIXING
        METHOD BROYDEN_MIXING
        ALPHA 0.3
      &END MIXING
      &SMEAR ON
        METHOD FERMI_DIRAC
        ELECTRONIC_TEMPERATURE [K] 300
      &END SMEAR
    &END SCF
    &XC
      &XC_FUNCTIONAL PBE
      &END XC_FUNCTIONAL
    &END XC
  &END DFT
  &SUBSYS
    &CELL
      ABC 10.0 10.0 10.0
    &END CELL
    &COORD
    &END COORD
{chr(10).join(kinds)}
  &END SUBSYS
&END FORCE_EVAL
"""


class Cp2kBackend(LabellingBackend):
    """CP2K through custodian's `Cp2kJob`, handlers and `Cp2kOutputValidator`."""

    name = "cp2k"
    settings_fields = (
        "cp2k_cmd",
        "cp2k_template",
        "cp2k_input_set",
        "cp2k_input_set_params",
        "cp2k_data_dir",
        "cp2k_cutoff_Ry",
        "cp2k_kpoint_spacing",
        "max_errors",
        "timeout_s",
    )

    @classmethod
    def gives_stress(cls, settings: LabellingSettings) -> bool | None:
        """Every input asks CP2K for the analytical stress tensor of a periodic cell."""
        return True

    def __init__(self, settings: LabellingSettings):
        from pymatgen.io.cp2k.inputs import Cp2kInput  # noqa: PLC0415

        self.settings = settings
        self.cmd = shlex.split(settings.cp2k_cmd)
        if shutil.which(self.cmd[0]) is None and not Path(self.cmd[0]).is_file():
            raise SettingsError(
                f"label.cp2k_cmd: executable {self.cmd[0]!r} not found "
                f"(command: {settings.cp2k_cmd!r})"
            )
        if not Path(settings.cp2k_data_dir).is_dir():
            raise SettingsError(f"label.cp2k_data_dir: {settings.cp2k_data_dir} not found")
        if settings.cp2k_template is not None and settings.cp2k_input_set is not None:
            raise SettingsError(
                "give label.cp2k_template (a CP2K input) or label.cp2k_input_set, not both"
            )
        self.input_set = None
        self.template_path = None
        if settings.cp2k_input_set is not None:
            self.input_set = input_set_class(settings.cp2k_input_set)
            return
        if settings.cp2k_template is None:  # the default input, written per structure
            return
        path = Path(settings.cp2k_template).expanduser()
        try:
            self.template = Cp2kInput.from_file(str(path))
            self.template["FORCE_EVAL"]["SUBSYS"]
        except FileNotFoundError:
            raise SettingsError(f"{path}: CP2K template not found") from None
        except Exception as exc:
            raise SettingsError(f"{path}: not a usable CP2K input ({exc})") from None
        self.template_path = path

    def settings_doc(self) -> dict:
        if self.input_set is None and self.template_path is None:
            s = self.settings
            return {
                "default_input": DEFAULT_VERSION,
                "cutoff_Ry": s.cp2k_cutoff_Ry,
                "kpoint_spacing": s.cp2k_kpoint_spacing,
            }
        if self.input_set is not None:
            return {
                "input_set": f"{self.input_set.__module__}.{self.input_set.__name__}",
                "input_set_params": self.settings.cp2k_input_set_params,
            }
        return {"template": self.template_path.read_text()}

    def write_input(self, atoms: Atoms, workdir: Path) -> Path:
        """This structure's input (template or input set), forces and stress printed."""

        from pymatgen.io.cp2k.inputs import Cell, Coord, Cp2kInput, Keyword, Section  # noqa: PLC0415

        if self.input_set is not None:
            ci = self._from_input_set(atoms)
            ci.write_file(str(workdir / INPUT))
            return workdir / INPUT
        if self.template_path is None:
            text = default_input(atoms, self.settings)
            template = Cp2kInput.from_str(text)
        else:
            template = self.template
        ci = copy.deepcopy(template)
        kinds = {
            str(sec.section_parameters[0])
            for sec in ci["FORCE_EVAL"]["SUBSYS"].subsections.values()
            if sec.name.upper() == "KIND" and sec.section_parameters
        }
        missing = sorted(set(atoms.get_chemical_symbols()) - kinds)
        if missing:
            raise SettingsError(f"{self.template_path}: no &KIND section for {', '.join(missing)}")
        periodic = bool(atoms.pbc.all())
        if periodic:
            structure = AseAtomsAdaptor.get_structure(atoms)
            lattice = structure.lattice
        else:
            structure = AseAtomsAdaptor.get_molecule(atoms)
            lattice = Lattice(atoms.cell[:] if atoms.cell.rank == 3 else np.eye(3) * 20.0)
        sub = ci["FORCE_EVAL"]["SUBSYS"]
        sub.subsections["CELL"] = Cell(lattice)
        sub.subsections["COORD"] = Coord(structure)
        ci["GLOBAL"].keywords["RUN_TYPE"] = Keyword("RUN_TYPE", "ENERGY_FORCE")
        ci["GLOBAL"].keywords["PROJECT"] = Keyword("PROJECT", "cp2k")
        fe = ci["FORCE_EVAL"]
        if "PRINT" not in fe.subsections:
            fe.insert(Section("PRINT"))
        fe["PRINT"].subsections["FORCES"] = Section("FORCES", section_parameters=["ON"])
        if periodic:
            fe.keywords["STRESS_TENSOR"] = Keyword("STRESS_TENSOR", "ANALYTICAL")
            fe["PRINT"].subsections["STRESS_TENSOR"] = Section(
                "STRESS_TENSOR", section_parameters=["ON"]
            )
        ci.write_file(str(workdir / INPUT))
        return workdir / INPUT

    def _from_input_set(self, atoms: Atoms):
        from pymatgen.io.cp2k.inputs import Keyword  # noqa: PLC0415

        name = self.settings.cp2k_input_set
        if not atoms.pbc.all():
            raise SettingsError(
                f"label.cp2k_input_set ({name}) needs periodic cells; "
                "use a cp2k_template for molecules and slabs"
            )
        params = {
            "print_forces": True,
            "print_stress": True,
            "print_pdos": False,
            "print_v_hartree": False,
            "print_e_density": False,
            "print_mo_cubes": False,
            **self.settings.cp2k_input_set_params,
        }
        try:
            with warnings.catch_warnings():  # "unable to validate basis": names given as is
                warnings.simplefilter("ignore", UserWarning)
                ci = self.input_set(structure=AseAtomsAdaptor.get_structure(atoms), **params)
        except Exception as exc:
            raise SettingsError(
                f"{name} for {atoms.get_chemical_formula()}: {exc} (give basis and potential "
                "names and files in label.cp2k_input_set_params)"
            ) from None
        ci["GLOBAL"].keywords["RUN_TYPE"] = Keyword("RUN_TYPE", "ENERGY_FORCE")
        ci["GLOBAL"].keywords["PROJECT_NAME"] = Keyword("PROJECT_NAME", "cp2k")
        ci["FORCE_EVAL"].keywords["STRESS_TENSOR"] = Keyword("STRESS_TENSOR", "ANALYTICAL")
        return ci

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult:
        workdir = workdir.resolve()
        self.write_input(atoms, workdir)
        os.environ.setdefault("CP2K_DATA_DIR", str(self.settings.cp2k_data_dir))
        handlers = [
            h.UnconvergedScfErrorHandler(input_file=INPUT, output_file=OUTPUT),
            h.DivergingScfErrorHandler(input_file=INPUT, output_file=OUTPUT),
            h.AbortHandler(input_file=INPUT, output_file=OUTPUT),
            h.FrozenJobErrorHandler(input_file=INPUT, output_file=OUTPUT),
        ]
        if self.settings.timeout_s:
            handlers.append(h.WalltimeHandler(wall_time=int(self.settings.timeout_s)))
        c = Custodian(
            handlers,
            [Cp2kJob(self.cmd, input_file=INPUT, output_file=OUTPUT)],
            validators=[Cp2kOutputValidator()],
            max_errors=self.settings.max_errors,
            directory=str(workdir),
            polling_time_step=1,
            monitor_freq=5,
        )
        doc: dict = {"command": self.settings.cp2k_cmd}
        try:
            c.run()
        except Exception as exc:
            doc["corrections"] = custodian_corrections(workdir)
            return LabelResult(None, "failed", f"custodian: {exc}", doc)
        doc["corrections"] = custodian_corrections(workdir)
        try:
            energy, forces, stress, converged = parse_output(workdir / OUTPUT)
        except Exception as exc:
            return LabelResult(None, "failed", f"{OUTPUT} unreadable ({exc})", doc)
        doc["converged"] = converged
        if not converged:
            return LabelResult(None, "failed", "electronic SCF did not converge", doc)
        doc["energy_hartree"] = energy / Hartree
        return LabelResult(singlepoint(atoms, energy, forces, stress), "success", None, doc)
