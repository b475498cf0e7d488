"""The validation report: errors, uncertainty quality, structural checks, MD stability."""

from __future__ import annotations

from pydantic import Field

from nequix_fw.schemas.base import Document


class ValidationReport(Document):
    """``validation.json`` (and the store's ``nequix_fw_validation``)."""

    SCHEMA = "nequix-fw/validation"
    OMIT_NONE = True

    models: list[dict] = Field(description="The ensemble's models (name, path, sha256, ...).")
    n_structures: int = Field(ge=1, description="Structures in the test set.")
    per_model: dict[str, dict] = Field(
        description="Each model's errors (energy per atom in meV, forces in eV/Å, stress in "
        "GPa: MAE, RMSE, per element)."
    )
    ensemble_mean: dict = Field(description="The ensemble mean's errors, as per_model.")
    uncertainty: dict | None = Field(
        None, description="Uncertainty against true error: Spearman, ROC AUC, calibration."
    )
    physics: dict | None = Field(
        None,
        description="Structural checks: E-V (V0 in Å³/atom, B0 in GPa), relaxation, "
        "vacancy formation energy (eV), against the reference.",
    )
    properties: dict | None = Field(
        None,
        description="Property checks against the reference calculator: `elastic` (constants "
        "in GPa: the ensemble's mean and spread, the reference's, errors in %) and `phonons` "
        "(frequencies in THz per q-point, likewise), each with its largest error.",
    )
    md_stability: dict | None = Field(None, description="MD stability runs and their outcome.")
    forgetting: dict | None = Field(
        None,
        description="A fine-tuned ensemble against its foundation model: drift on the "
        "foundation-domain set per group (forces eV/Å, energies meV/atom; errors against the "
        "reference where it labels) and the repulsive-wall check per element pair.",
    )
    plots: list[str] | None = Field(None, description="The PNG plots written beside it.")
