"""The exploration manifest: what `explore` ran and where each candidate came from."""

from __future__ import annotations

from pydantic import Field

from nequix_fw.schemas.base import Document


class ExplorationManifest(Document):
    """``manifest.json`` of an exploration's output: beside ``candidates.extxyz``."""

    SCHEMA = "nequix-fw/exploration"

    settings: dict = Field(description="The ExplorationSettings used (K, fs, GPa, Å, eV/Å).")
    trajectories: list[dict] = Field(
        description="One entry per MD trajectory: start, condition (temperature_K, "
        "pressure_GPa), seed, stop_reason, stop_step, n_frames."
    )
    frames: list[dict] = Field(
        description="One entry per candidate: its structure id and provenance (generator, "
        "parent, condition, step, time_fs, uncertainty)."
    )
