"""Label with any ASE calculator, configured by name and keyword parameters."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from ase import Atoms
from ase.calculators.calculator import Calculator, FileIOCalculator, get_calculator_class

from nequix_fw.errors import SettingsError
from nequix_fw.labelling.base import LabellingBackend, LabelResult, singlepoint
from nequix_fw.settings import LabellingSettings


def calculator_class(name: str) -> type[Calculator]:
    """Resolve an ASE calculator name ('emt', 'lj', 'morse', 'vasp', ... as ASE's
    `get_calculator_class` knows them) or 'package.module:Class' to its class."""
    module_name, _, cls_name = name.partition(":")
    try:
        if cls_name:
            return getattr(importlib.import_module(module_name), cls_name)
        return get_calculator_class(name.lower())
    except (ImportError, AttributeError) as exc:
        hint = "" if cls_name else "; an ASE calculator name (emt, lj, ...) or 'module:Class'"
        raise SettingsError(f"calculator {name!r} cannot be imported ({exc}{hint})") from None


def _known_parameters(cls: type[Calculator]) -> set[str] | None:
    """Keywords a calculator accepts (its defaults and signatures); None when it declares no
    defaults and so takes any keyword (Vasp, Espresso, ...)."""
    names = set(getattr(cls, "default_parameters", {}) or {})
    if not names:
        return None
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {
                n
                for n, p in inspect.signature(init).parameters.items()
                if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
            }
    return names


def check_parameters(cls: type[Calculator], params: dict, name: str) -> None:
    """Refuse keywords that calculator `cls` (named `name`) does not know."""
    known = _known_parameters(cls)
    unknown = sorted(set(params) - known) if known is not None else []
    if unknown:
        raise SettingsError(
            f"calculator {name!r}: bad parameters (unknown {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))})"
        )


class AseCalculatorBackend(LabellingBackend):
    """Runs an ASE calculator in the structure's working directory."""

    name = "ase"
    settings_fields = ("calculator", "calculator_params")

    def __init__(self, calculator: str, params: dict | None = None):
        self.calculator = calculator
        self.params = dict(params or {})
        self._cls = calculator_class(calculator)
        check_parameters(self._cls, self.params, calculator)

    @classmethod
    def gives_stress(cls, settings: LabellingSettings) -> bool | None:
        """What the calculator declares (`implemented_properties`)."""
        try:
            declared = calculator_class(settings.calculator).implemented_properties
        except (SettingsError, AttributeError):
            return None  # refused, with its reason, when the backend is built
        return "stress" in declared

    @classmethod
    def from_settings(cls, settings: LabellingSettings) -> AseCalculatorBackend:
        return cls(settings.calculator, settings.calculator_params)

    def settings_doc(self) -> dict:
        return {"calculator": f"{self._cls.__module__}:{self._cls.__name__}", **self.params}

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult:
        params = dict(self.params)
        if issubclass(self._cls, FileIOCalculator):  # runs a program: keep its files per structure
            params.setdefault("directory", str(workdir))
        try:
            calc = self._cls(**params)
        except TypeError as exc:
            raise SettingsError(f"calculator {self.calculator!r}: bad parameters ({exc})") from None
        a = atoms.copy()
        a.calc = calc
        energy = a.get_potential_energy()
        forces = a.get_forces()
        stress = a.get_stress() if a.pbc.all() else None
        doc = {"calculator": self.settings_doc()["calculator"], "converged": True}
        return LabelResult(singlepoint(atoms, energy, forces, stress), "success", None, doc)
