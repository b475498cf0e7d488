"""Relabelling: every structure of a dataset labelled again at another level of theory, into a
new dataset (DP-GEN's tools/relabel.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from ase import Atoms

from nequix_fw.dataset import DatasetStore, read_labelled, same_dataset, update_dataset
from nequix_fw.errors import SettingsError, StructureError
from nequix_fw.labelling.base import LabellingBackend, label_frozen
from nequix_fw.settings import LabellingSettings

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
