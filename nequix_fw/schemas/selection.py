"""The selection manifest: every structure's class, why, and what was selected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from nequix_fw.schemas.base import Document


class SelectionCounts(BaseModel):
    """How many structures fell in each class."""

    model_config = ConfigDict(extra="forbid")

    accurate: int = Field(ge=0, description="Below the lower trust level.")
    candidate: int = Field(ge=0, description="Between the trust levels.")
    failed: int = Field(ge=0, description="At or above the upper level, or not usable.")
    selected: int = Field(ge=0, description="Candidates written for labelling.")
    already_labelled: int = Field(ge=0, description="Candidates skipped: labelled before.")
    reserved: int = Field(
        0,
        ge=0,
        description="Of the selected, those picked first whatever their class: the candidates "
        "of property checks that missed (campaign.property_labels).",
    )


class SelectionManifest(Document):
    """``manifest.json`` of a selection's output: beside the selected structures (POSCAR or
    extxyz)."""

    SCHEMA = "nequix-fw/selection"

    ensemble_results: str = Field(description="The ensemble-results file selected from.")
    models: list[dict] = Field(description="The ensemble's models (name, path, sha256, ...).")
    settings: dict = Field(description="The SelectionSettings used (trust levels in eV/Å, GPa).")
    counts: SelectionCounts
    structures: list[dict] = Field(
        description="One entry per structure: id, class, metric value, reason, selected, "
        "file (if selected)."
    )
