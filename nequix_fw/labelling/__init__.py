"""Labelling backends: one module each, behind the interface in `base`."""

from __future__ import annotations

from pathlib import Path

from nequix_fw.labelling.base import LabellingBackend, import_class, label_structures
from nequix_fw.settings import (
    LABELLING_BACKENDS,
    LabellingSettings,
    fill_placeholders,
    make_settings,
)

__all__ = [
    "LabellingBackend",
    "backend_class",
    "label_structures",
    "make_backend",
    "resolve_placeholders",
]


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


def backend_class(name: str) -> type[LabellingBackend]:
    """The backend class registered under `name` (`settings.LABELLING_BACKENDS`), or a
    'module:Class' of your own."""
    return import_class(
        LABELLING_BACKENDS.get(name, name), "nequix_fw.labelling", LabellingBackend, "label.backend"
    )


def make_backend(settings: LabellingSettings, env: dict | None = None) -> LabellingBackend:
    """The backend named in the settings, ``>>key<<`` placeholders taken from `env` (the
    FireWorks worker's env)."""
    settings = resolve_placeholders(settings, env)
    return backend_class(settings.backend).from_settings(settings)
