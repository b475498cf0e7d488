"""Labelling backends: one module each, behind the interface in `base`."""

from nequix_fw.errors import SettingsError
from nequix_fw.labelling.base import LabellingBackend, label_structures
from nequix_fw.settings import LabellingSettings

__all__ = ["LabellingBackend", "label_structures", "make_backend"]


def make_backend(settings: LabellingSettings) -> LabellingBackend:
    """The backend named in the settings."""
    if settings.backend == "ase":
        from nequix_fw.labelling.ase_calc import AseCalculatorBackend

        return AseCalculatorBackend(settings.calculator, settings.calculator_params)
    if settings.backend == "script":
        from nequix_fw.labelling.script import ScriptBackend

        return ScriptBackend(settings.command, settings.timeout_s)
    if settings.backend == "vasp":
        from nequix_fw.labelling.vasp import VaspBackend

        return VaspBackend(settings)
    if settings.backend == "cp2k":
        from nequix_fw.labelling.cp2k import Cp2kBackend

        return Cp2kBackend(settings)
    raise SettingsError(f"unknown labelling backend {settings.backend!r}")
