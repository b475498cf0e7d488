"""Labelling backends: one module each, behind the interface in `base`."""

from __future__ import annotations

from pathlib import Path

from nequix_fw.errors import SettingsError
from nequix_fw.labelling.ase_calc import AseCalculatorBackend
from nequix_fw.labelling.base import LabellingBackend, label_structures
from nequix_fw.labelling.cp2k import Cp2kBackend
from nequix_fw.labelling.script import ScriptBackend
from nequix_fw.labelling.vasp import VaspBackend
from nequix_fw.settings import LabellingSettings, fill_placeholders, make_settings

__all__ = ["LabellingBackend", "label_structures", "make_backend", "resolve_placeholders"]


def resolve_placeholders(settings: LabellingSettings, env: dict | None) -> LabellingSettings:
    """Replace values written as ``>>key<<`` by the FireWorks worker's ``env[key]``.

    As in atomate, commands and paths that differ per machine (``vasp_cmd: ">>vasp_cmd<<"``)
    live in the worker's ``my_fworker.yaml`` (``env: {vasp_cmd: "srun vasp_std"}``).
    """
    values = {k: str(v) if isinstance(v, Path) else v for k, v in settings.model_dump().items()}
    filled = fill_placeholders(values, env or {}, "label")
    if filled == values:
        return settings
    return make_settings(LabellingSettings, **filled)


def make_backend(settings: LabellingSettings, env: dict | None = None) -> LabellingBackend:
    """The backend named in the settings, ``>>key<<`` placeholders taken from `env` (the
    FireWorks worker's env)."""
    settings = resolve_placeholders(settings, env)
    if settings.backend == "ase":
        return AseCalculatorBackend(settings.calculator, settings.calculator_params)
    if settings.backend == "script":
        return ScriptBackend(settings.command, settings.timeout_s)
    if settings.backend == "vasp":
        return VaspBackend(settings)
    if settings.backend == "cp2k":
        return Cp2kBackend(settings)
    raise SettingsError(f"unknown labelling backend {settings.backend!r}")
