"""The campaign record, ``<campaign directory>/campaign.json``: the campaign's name and one
record per iteration (counts, metrics, decisions), written by `nequix_fw.campaign.CampaignLog`
and mirrored in the store. `IterationRecord` types the fields that reports and stopping read
(others are kept as they are)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from nequix_fw.schemas.base import DocumentError

Count = NonNegativeInt | None


class IterationRecord(BaseModel):
    """One iteration's record: what its stages reported (a stage not yet run leaves its
    fields out)."""

    model_config = ConfigDict(extra="allow")

    iteration: NonNegativeInt
    n_candidates: Count = None
    n_evaluated: Count = None
    n_selected: Count = None
    n_labelled: Count = None
    n_label_failures: Count = None
    n_label_reused: Count = None
    n_added: Count = None
    n_conflicts: Count = None
    n_models: Count = None
    dataset_size: Count = None
    dataset: str | None = None
    validation: dict[str, float | None] | None = Field(
        None, description="Errors of the ensemble mean (energy meV/atom, forces eV/Å)."
    )
    calibration: dict[str, float | None] | None = None
    uncertainty_error_ratio: float | None = None
    md_stable_fraction: float | None = None
    properties: dict[str, float | None] | None = None
    reference_bulk_modulus_GPa: float | None = None
    forgetting: dict[str, float | bool | list[str] | None] | None = Field(
        None,
        description="A fine-tuned ensemble's drift from its foundation model (eV/Å per "
        "group) and its repulsive-wall check (wall_passed, wall_failures).",
    )
    elastic_worst: str | None = Field(
        None, description="The elastic constant with the largest error (C11, C12, ...)."
    )
    stalled: dict[str, dict] | None = Field(
        None,
        description="Property tolerances whose error stalled, each with its errors, the labels "
        "of its kind added and the diagnosis (`nequix_fw.diagnosis`).",
    )
    explored_with: str | None = Field(
        None, description="Set when the exploration did not use the previous ensemble: why."
    )
    selection_lo: float | None = None
    selection_method: str | None = None
    best_valid_loss: list[float] | None = None
    stop_reason: str | None = None


def check_iterations(iterations: list, where: str) -> list[dict]:
    """`iterations` checked against `IterationRecord`: one line naming `where`, the iteration
    and the field when a value has the wrong type."""
    out = []
    for i, it in enumerate(iterations):
        try:
            IterationRecord.model_validate(it)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            k = it.get("iteration", i) if isinstance(it, dict) else i
            raise DocumentError(
                f"{where}: iteration {k}: {field}: {err['msg']} (got {err['input']!r}); the "
                "record is damaged (its iterations are also in the store, collection "
                "nequix_fw_iterations)"
            ) from None
        out.append(it)
    return out


def read_campaign_log(path: str | Path) -> dict:
    """A campaign record (campaign.json), checked: one line naming the file when it is missing
    or damaged."""
    path = Path(path)
    if not path.is_file():
        raise DocumentError(f"{path}: no campaign record (has iteration 0 run?)")
    try:
        log = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DocumentError(
            f"{path}: a damaged campaign record (not JSON: {exc}); its iterations are also in "
            "the store (collection nequix_fw_iterations)"
        ) from None
    if not (isinstance(log, dict) and isinstance(log.get("iterations"), list) and "name" in log):
        raise DocumentError(f"{path}: not a campaign record (no name and iterations)")
    check_iterations(log["iterations"], str(path))
    return log
