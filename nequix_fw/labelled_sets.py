"""Datasets grown by labelling directly, without a campaign: every structure of a dataset
labelled again at another level of theory (DP-GEN's tools/relabel.py), and an E-V set labelled
as the reference data of the structural checks against DFT (`validate.reference_data`, and
`validate.reference: label` in a campaign)."""

from __future__ import annotations

import logging
from pathlib import Path

from ase import Atoms

from nequix_fw.dataset import DatasetStore, read_labelled, same_dataset, update_dataset
from nequix_fw.errors import SettingsError, StructureError
from nequix_fw.labelling.base import LabellingBackend, label_frozen
from nequix_fw.settings import LabellingSettings
from nequix_fw.structures import EV_STRAINS, scaled_cells

logger = logging.getLogger(__name__)


def relabel(
    dataset: str | Path,
    to: str | Path,
    backend: LabellingBackend,
    settings: LabellingSettings,
    output: str | Path,
    store: DatasetStore | None = None,
    progress: bool = True,
) -> dict:
    """Label every structure of `dataset` (a directory, file or ``db:NAME``) with `backend`
    into the dataset `to`. The structures are frozen in `output`/structures.extxyz by the first
    run and labelled in `output`/labels, so a rerun after a crash labels only what is left and
    adds each structure once. Each new document keeps its structure id (the content hash, the
    same as in `dataset`) and records ``relabelled_from``: `dataset`."""
    if same_dataset(dataset, to):
        raise SettingsError(
            f"relabel: --to {to} is the dataset {dataset} being relabelled (or inside it): the "
            "old labels would be mixed with the new; give another dataset"
        )
    output = Path(output)

    def structures() -> list[Atoms]:
        data = read_labelled([dataset], store, allow_mixed=True)
        if not data:
            raise StructureError(f"{dataset}: holds no structures to relabel")
        return [
            Atoms(
                d.frame.atoms.numbers,
                d.frame.atoms.positions,
                cell=d.frame.atoms.cell,
                pbc=d.frame.atoms.pbc,
            )
            for d in data
        ]

    labels = label_frozen(output, structures, backend, settings, progress)
    added = update_dataset(
        output / "labels", to, store=store, provenance={"relabelled_from": str(dataset)}
    )
    logger.info(
        "relabelled %s -> %s: %d labelled (%d reused), %d failed, %d added",
        dataset,
        to,
        labels["n_success"],
        labels["n_reused"],
        labels["n_failed"],
        added["n_added"],
    )
    return {"labels": labels, "dataset": added}


def label_ev_set(
    structure: Atoms,
    to: str | Path,
    backend: LabellingBackend,
    settings: LabellingSettings,
    output: str | Path,
    store: DatasetStore | None = None,
    progress: bool = True,
) -> dict:
    """Label `structure` scaled to the E-V volumes (`validation.EV_STRAINS`) with `backend`
    into the dataset `to` (a directory, file or ``db:NAME``). The cells are written to
    `output`/structures.extxyz and labelled in `output`/labels, so a rerun labels nothing twice
    (the once-per-campaign reference). Fails unless at least 5 volumes were labelled."""
    if not structure.pbc.all():
        raise StructureError(
            f"{structure.get_chemical_formula()}: an E-V set needs a periodic cell"
        )
    output = Path(output)
    labels = label_frozen(output, lambda: scaled_cells(structure), backend, settings, progress)
    if labels["n_success"] < 5:
        raise StructureError(
            f"E-V set of {structure.get_chemical_formula()}: {labels['n_success']} of "
            f"{len(EV_STRAINS)} volumes labelled (>= 5 needed); reasons in "
            f"{output / 'labels'}/*/task.json"
        )
    formula = structure.get_chemical_formula()
    added = update_dataset(
        output / "labels", to, store=store, provenance={"reference_ev_of": formula}
    )
    logger.info(
        "E-V set of %s: %d volumes labelled (%d reused) -> %s",
        formula,
        labels["n_success"],
        labels["n_reused"],
        to,
    )
    return {"labels": labels, "dataset": added}
