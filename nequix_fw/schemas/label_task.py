"""The labelling task document: one per structure and labelling run."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from nequix_fw.schemas.base import Document


class LabelTaskDoc(Document):
    """``<output>/<structure id>/task.json`` of a labelling (and the store's
    ``nequix_fw_label_tasks``); a backend adds its own fields (custodian corrections, input
    files, ...)."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    SCHEMA = "nequix-fw/label-task"

    structure_id: str = Field(description="Content hash of the structure.")
    source: str = Field(description="File the structure was read from.")
    frame: int = Field(description="Its index in that file.")
    formula: str
    backend: str = Field(description="Labelling backend (ase, script, vasp, cp2k).")
    settings: dict = Field(description="The backend's settings that fix the level of theory.")
    settings_hash: str = Field(description="Hash of `settings`: the level of theory.")
    iteration: int | None = Field(None, description="Campaign iteration (None: by hand).")
    status: Literal["success", "failed"]
    reason: str | None = Field(None, description="Why it failed.")
    wall_time_s: float = Field(ge=0, description="Wall time (s).")
    labelled_file: str | None = Field(None, description="The labels (extxyz), on success.")
