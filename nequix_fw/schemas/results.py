"""The header of the ensemble-results file (its records are streamed after it)."""

from __future__ import annotations

from pydantic import Field

from nequix_fw.schemas.base import Document


class EnsembleResultsHeader(Document):
    """The first part of ``ensemble_results.json`` (see `nequix_fw.results`); ``structures``
    and ``summary`` follow it in the file."""

    SCHEMA = "nequix-fw/ensemble-results"

    created: str = Field(description="When it was written (ISO 8601, UTC).")
    units: dict[str, str] = Field(description="Units of every quantity in the records.")
    models: list[dict] = Field(description="The ensemble's models (name, path, sha256, ...).")
    settings: dict = Field(description="The EnsembleSettings used.")
