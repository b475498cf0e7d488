"""Label with VASP under custodian (error handlers, validators, corrections recorded).

Inputs, either:

- the user's INCAR, KPOINTS and POTCAR (``vasp_inputs``, as the seed's launch_dft.sh copies them),
  the POSCAR listing species in the POTCAR's order; or
- a pymatgen input set (``vasp_input_set``, e.g. ``MPStaticSet``) written per structure with
  ``vasp_input_set_params`` (user INCAR/KPOINTS settings, POTCAR functional) and POTCARs from
  ``vasp_psp_dir`` (pymatgen's ``PMG_VASP_PSP_DIR``);

with ``incar_overrides`` on top.

Labels, parsed with pymatgen's ``Vasprun`` from the last ionic step:

- energy: ``e_0_energy`` (energy extrapolated to sigma -> 0) as pymatgen's ``final_energy``
  gives it (repairing VASP versions that write it as 0 in vasprun.xml), used for every VASP label;
- forces: eV/Å as written by VASP;
- stress: VASP writes kBar with positive = compressive; stored in ASE's convention,
  ``stress_ASE = -0.1 * stress_VASP`` GPa (positive = tensile), as eV/Å³.
"""

from __future__ import annotations

import shlex
import shutil
import warnings
from pathlib import Path

from ase import Atoms
from custodian import Custodian
from custodian.vasp import handlers as h
from custodian.vasp.jobs import VaspJob
from custodian.vasp.validators import VaspFilesValidator, VasprunXMLValidator
from monty.os import cd
from pymatgen.core import SETTINGS
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.vasp import Incar, Poscar, Potcar
from pymatgen.io.vasp.sets import VaspInputSet

from nequix_fw.errors import SettingsError
from nequix_fw.labelling.base import (
    LabellingBackend,
    LabelResult,
    custodian_corrections,
    import_class,
    singlepoint,
)
from nequix_fw.labelling.outputs import parse_vasprun
from nequix_fw.settings import LabellingSettings

INPUT_FILES = ("INCAR", "KPOINTS", "POTCAR")


def handler_group(name: str, wall_time_s: float | None = None) -> list:
    """A fresh list of custodian handlers, grouped as in atomate."""

    groups = {
        "default": lambda: [
            h.VaspErrorHandler(),
            h.MeshSymmetryErrorHandler(),
            h.UnconvergedErrorHandler(),
            h.NonConvergingErrorHandler(),
            h.PotimErrorHandler(),
            h.PositiveEnergyErrorHandler(),
            h.FrozenJobErrorHandler(),
            h.StdErrHandler(),
            h.LargeSigmaHandler(),
            h.IncorrectSmearingHandler(),
        ],
        "md": lambda: [h.VaspErrorHandler(), h.NonConvergingErrorHandler()],
        "no_handler": lambda: [],
    }
    groups["strict"] = lambda: [
        *groups["default"](),
        h.AliasingErrorHandler(),
        h.DriftErrorHandler(),
    ]
    handlers = groups[name]()
    if wall_time_s:
        handlers.append(h.WalltimeHandler(wall_time=int(wall_time_s)))
    return handlers


def input_set_class(name: str) -> type:
    """A pymatgen VASP input set class by name (in pymatgen.io.vasp.sets) or 'module:Class'."""

    return import_class(name, "pymatgen.io.vasp.sets", VaspInputSet, "label.vasp_input_set")


def psp_dir(configured: Path | None) -> Path:
    """The POTCAR library directory: the setting, else pymatgen's PMG_VASP_PSP_DIR."""

    path = configured or SETTINGS.get("PMG_VASP_PSP_DIR")
    if path is None:
        raise SettingsError(
            "VASP input sets need POTCARs: set label.vasp_psp_dir or "
            "PMG_VASP_PSP_DIR (pymatgen's ~/.config/.pmgrc.yaml)"
        )
    path = Path(path).expanduser()
    if not path.is_dir():
        raise SettingsError(f"label.vasp_psp_dir: {path} is not a directory")
    return path


def read_potcar(path: Path) -> dict[str, str]:
    """The datasets of a POTCAR by element, in order (pymatgen's `Potcar`)."""

    try:
        with warnings.catch_warnings():  # a POTCAR pymatgen has no hash for is still a POTCAR
            warnings.simplefilter("ignore")
            potcar = Potcar.from_file(str(path))
    except (KeyError, ValueError, IndexError) as exc:
        raise SettingsError(f"{path}: not a valid POTCAR ({type(exc).__name__}: {exc})") from None
    if not len(potcar):
        raise SettingsError(f"{path}: no datasets, not a POTCAR")
    return {single.element: single.data for single in potcar}


class VaspBackend(LabellingBackend):
    """VASP through custodian's `VaspJob`, handlers and validators."""

    name = "vasp"
    settings_fields = (
        "vasp_cmd",
        "vasp_inputs",
        "vasp_input_set",
        "vasp_input_set_params",
        "vasp_psp_dir",
        "incar_overrides",
        "handler_group",
        "max_errors",
        "timeout_s",
        "scratch_dir",
        "gzip_output",
    )

    @classmethod
    def gives_stress(cls, settings: LabellingSettings) -> bool | None:
        """VASP computes the stress tensor unless ISIF is 0 (in incar_overrides, else in the
        user's INCAR)."""
        isif = settings.incar_overrides.get("ISIF")
        if isif is None and settings.vasp_inputs is not None:
            incar = Path(settings.vasp_inputs).expanduser() / "INCAR"
            isif = Incar.from_file(incar).get("ISIF") if incar.is_file() else None
        return isif is None or int(isif) != 0

    def __init__(self, settings: LabellingSettings):
        self.settings = settings
        self.cmd = shlex.split(settings.vasp_cmd)
        exe = next((c for c in self.cmd if "vasp" in Path(c).name), self.cmd[0])
        if shutil.which(exe) is None and not Path(exe).is_file():
            raise SettingsError(
                f"label.vasp_cmd: executable {exe!r} not found (command: {settings.vasp_cmd!r})"
            )
        if (settings.vasp_inputs is None) == (settings.vasp_input_set is None):
            raise SettingsError(
                "the vasp backend needs either label.vasp_inputs (INCAR, "
                "KPOINTS, POTCAR) or labelling.vasp_input_set, "
                "not both"
            )
        if settings.vasp_input_set is not None:
            self.input_set = input_set_class(settings.vasp_input_set)
            self.psp_dir = psp_dir(settings.vasp_psp_dir)
            return
        self.input_set = None
        self.inputs = Path(settings.vasp_inputs).expanduser()
        missing = [f for f in INPUT_FILES if not (self.inputs / f).is_file()]
        if missing:
            raise SettingsError(f"{self.inputs}: missing {', '.join(missing)}")
        self.potcar_blocks = read_potcar(self.inputs / "POTCAR")
        self.potcar_elements = list(self.potcar_blocks)

    def settings_doc(self) -> dict:
        if self.input_set is not None:
            return {
                "input_set": f"{self.input_set.__module__}.{self.input_set.__name__}",
                "input_set_params": self.settings.vasp_input_set_params,
                "incar_overrides": self.settings.incar_overrides,
                "handler_group": self.settings.handler_group,
            }
        incar = dict(Incar.from_file(self.inputs / "INCAR"))
        incar.update(self.settings.incar_overrides)
        return {
            "incar": incar,
            "kpoints": (self.inputs / "KPOINTS").read_text(),
            "potcar": self.potcar_elements,
            "handler_group": self.settings.handler_group,
        }

    def _write_inputs(self, atoms: Atoms, workdir: Path) -> None:
        if self.input_set is not None:
            self._write_input_set(AseAtomsAdaptor.get_structure(atoms), workdir)
            return
        symbols = sorted(set(atoms.get_chemical_symbols()), key=self._species_rank)
        structure = AseAtomsAdaptor.get_structure(atoms)
        structure = structure.get_sorted_structure(key=lambda s: symbols.index(s.specie.symbol))
        Poscar(structure).write_file(workdir / "POSCAR")
        incar = Incar.from_file(self.inputs / "INCAR")
        incar.update(self.settings.incar_overrides)
        incar.write_file(workdir / "INCAR")
        shutil.copy(self.inputs / "KPOINTS", workdir / "KPOINTS")
        # one POTCAR block per species present, in POSCAR order
        (workdir / "POTCAR").write_text("".join(self.potcar_blocks[el] for el in symbols))

    def _write_input_set(self, structure, workdir: Path) -> None:
        params = dict(self.settings.vasp_input_set_params)
        if self.settings.incar_overrides:
            params["user_incar_settings"] = {
                **params.get("user_incar_settings", {}),
                **self.settings.incar_overrides,
            }
        previous = SETTINGS.get("PMG_VASP_PSP_DIR")
        SETTINGS["PMG_VASP_PSP_DIR"] = str(self.psp_dir)
        try:
            self.input_set(structure, **params).write_input(workdir)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SettingsError(
                f"{self.settings.vasp_input_set} for {structure.formula} with POTCARs from "
                f"{self.psp_dir}: {exc}"
            ) from None
        finally:
            SETTINGS["PMG_VASP_PSP_DIR"] = previous

    def _species_rank(self, symbol: str) -> int:
        if symbol not in self.potcar_elements:
            raise SettingsError(
                f"{self.inputs / 'POTCAR'}: no POTCAR for {symbol} "
                f"(it has {', '.join(self.potcar_elements)})"
            )
        return self.potcar_elements.index(symbol)

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult:
        workdir = workdir.resolve()
        self._write_inputs(atoms, workdir)
        s = self.settings
        c = Custodian(
            handler_group(s.handler_group, s.timeout_s),
            [VaspJob(self.cmd, auto_npar=False)],
            validators=[VasprunXMLValidator(), VaspFilesValidator()],
            max_errors=s.max_errors,
            scratch_dir=str(s.scratch_dir) if s.scratch_dir else None,
            gzipped_output=s.gzip_output,
            directory=str(workdir),
            polling_time_step=1,
            monitor_freq=5,
        )
        doc: dict = {"command": s.vasp_cmd}
        try:
            with cd(workdir):  # custodian's scratch_dir copies the *current* directory
                c.run()
        except Exception as exc:  # custodian gives up: max errors, validator failure, ...
            doc["corrections"] = custodian_corrections(workdir)
            return LabelResult(None, "failed", f"custodian: {exc}", doc)
        doc["corrections"] = custodian_corrections(workdir)
        vasprun = next(iter(sorted(workdir.glob("vasprun.xml*"))), None)
        try:
            final, energy, forces, stress, facts = parse_vasprun(vasprun)
        except Exception as exc:
            return LabelResult(None, "failed", f"vasprun.xml unreadable ({exc})", doc)
        doc.update(facts, converged=facts["converged_electronic"])
        if not facts["converged_electronic"]:
            return LabelResult(None, "failed", "electronic SCF did not converge", doc)
        if not atoms.pbc.all():
            stress = None
        return LabelResult(singlepoint(final, energy, forces, stress), "success", None, doc)
