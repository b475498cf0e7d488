"""The header of the ensemble-results file (its records are streamed after it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nequix_fw.schemas.base import Document


class ResultsArrays(BaseModel):
    """Where a version-2 results file keeps its per-atom arrays (see `nequix_fw.results`)."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="The arrays file, beside the JSON (<name>.arrays.npz).")
    token: str = Field(description="A random token the arrays file holds too: the pair's bond.")
    records_per_chunk: int = Field(gt=0, description="Records per chunk of arrays.")
    per_model: bool = Field(description="Whether per-model forces are kept (else their mean).")


class EnsembleResultsHeader(Document):
    """The first part of ``ensemble_results.json`` (see `nequix_fw.results`); ``structures``
    and ``summary`` follow it in the file. Version 2 keeps the per-atom arrays (structures,
    forces) in a columnar file beside it; version 1 (``ensemble.results_format: json``) keeps
    everything in the JSON."""

    SCHEMA = "nequix-fw/ensemble-results"
    VERSION = 2
    OLDER = (1,)
    OMIT_NONE = True

    created: str = Field(description="When it was written (ISO 8601, UTC).")
    units: dict[str, str] = Field(description="Units of every quantity in the records.")
    models: list[dict] = Field(description="The ensemble's models (name, path, sha256, ...).")
    settings: dict = Field(description="The EnsembleSettings used.")
    uncertainty_method: str | None = Field(
        None,
        description="What the rows' spread is (`metrics.max_force_dev` and the rest): 'ensemble' "
        "(members), 'llpr' (one model's LLPR heads) or 'ensemble+llpr'. None in older files: "
        "'ensemble'.",
    )
    arrays: ResultsArrays | None = Field(
        None, description="Version 2: the columnar arrays file (None in version 1)."
    )

    @model_validator(mode="after")
    def _arrays_with_version(self):
        """Version 2 names its arrays file; version 1 has none (no mixture of the two)."""
        if self.schema_version == 2 and self.arrays is None:
            raise ValueError("version 2 names no arrays file")
        if self.schema_version == 1 and self.arrays is not None:
            raise ValueError("version 1 has no arrays file, this one names one")
        return self
