"""Typed settings for every stage, with their defaults in one place, loadable from YAML.

A settings file is a YAML mapping with one section per stage, e.g.::

    ensemble:
      max_edges_per_batch: 8192
    selection:
      lo: 0.08      # eV/Å
      hi: 0.40      # eV/Å
      max_selected: 50
      diverse: true
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nequix_fw.errors import SettingsError


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EnsembleSettings(_Settings):
    """How the ensemble engine batches, pads and caches its work."""

    backend: Literal["jax", "torch"] = Field(
        "jax",
        description="Evaluation backend. 'jax' is the fast batched path (torch checkpoints are "
        "converted in memory); 'torch' evaluates each model with nequix's torch calculator.",
    )
    max_edges_per_batch: int | None = Field(
        None,
        ge=64,
        description="Target number of edges (neighbour pairs) in one padded batch. None: 8192 on "
        "CPU (bounds memory), 32768 on a GPU (fewer batches, fewer compilations).",
    )
    max_structures_per_batch: int = Field(
        64, ge=1, description="Most structures packed into one padded batch."
    )
    chunk_size: int = Field(
        512, ge=1, description="Structures held in memory at once (streaming chunk)."
    )
    compilation_cache_dir: Path | None = Field(
        Path("~/.cache/nequix_fw/jax"),
        description="JAX persistent compilation cache; None disables it.",
    )
    store_per_model: bool = Field(
        True, description="Write per-model energies/forces/stresses into the results JSON."
    )


class SelectionSettings(_Settings):
    """DP-GEN-style trust levels on `max_force_dev` (eV/Å) and the caps on what is selected."""

    lo: float = Field(0.05, ge=0, description="Lower trust level (eV/Å): below it, 'accurate'.")
    hi: float | None = Field(
        None,
        ge=0,
        description="Upper trust level (eV/Å): at or above it, 'failed' (not sent to DFT). "
        "None: no upper level.",
    )
    max_selected: int | None = Field(
        None, ge=1, description="Most candidates selected per call (None: all)."
    )
    diverse: bool = Field(
        False,
        description="Pick by farthest-point sampling on a structural descriptor, starting from "
        "the most uncertain, instead of by uncertainty alone.",
    )
    min_distance: float | None = Field(
        None,
        gt=0,
        description="Minimum interatomic distance (Å); closer pairs mark a structure 'failed'.",
    )
    format: Literal["vasp", "extxyz"] = Field(
        "vasp", description="File format of selected structures: POSCAR (<id>.vasp) or extxyz."
    )

    @model_validator(mode="after")
    def _check_levels(self) -> SelectionSettings:
        if self.hi is not None and self.lo > self.hi:
            raise ValueError(f"lo ({self.lo} eV/Å) must not exceed hi ({self.hi} eV/Å)")
        return self


S = TypeVar("S", bound=_Settings)

SECTIONS: dict[str, type[_Settings]] = {
    "ensemble": EnsembleSettings,
    "selection": SelectionSettings,
}


def make_settings(cls: type[S], **values) -> S:
    """Build settings, turning validation problems into one readable `SettingsError`."""
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or cls.__name__}: {err['msg']}"
            for err in exc.errors()
        )
        raise SettingsError(f"invalid {cls.__name__}: {problems}") from None


def load_settings(path: str | Path | None, cls: type[S], **overrides) -> S:
    """Read the section of `cls` from a YAML file (if given) and apply non-None `overrides`."""
    section = next(name for name, c in SECTIONS.items() if c is cls)
    values: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"{path}: cannot read settings file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise SettingsError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise SettingsError(f"{path}: expected a mapping of sections {sorted(SECTIONS)}")
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise SettingsError(
                f"{path}: unknown section(s) {sorted(unknown)}; known: {sorted(SECTIONS)}"
            )
        values = dict(data.get(section) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return make_settings(cls, **values)
