"""The reference cells of the elastic and phonon checks (`nequix_fw.properties`) labelled with a
labelling backend, once: what the checks compare with in a campaign with
``validate.reference: label``."""

from __future__ import annotations

from pathlib import Path

import ase.io
from ase import Atoms

from nequix_fw.labelling.base import LabellingBackend, label_frozen
from nequix_fw.settings import LabellingSettings


def label_cells(
    cells: list[Atoms],
    output: str | Path,
    backend: LabellingBackend,
    settings: LabellingSettings,
    progress: bool = True,
) -> list[Atoms | None]:
    """`cells` labelled by `backend` in `output` (frozen there by the first run, so that a
    rerun labels only what is left), in their order; None where the labelling failed."""
    output = Path(output)
    summary = label_frozen(output, lambda: cells, backend, settings, progress)
    out = []
    for sid in summary["structure_ids"]:  # in the order of the cells (all distinct)
        labelled = output / "labels" / sid / "labelled.extxyz"
        out.append(ase.io.read(labelled) if labelled.is_file() else None)
    return out
