"""The evaluation stage: an ensemble on structures, written to a results file."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from nequix_fw.ensemble import Ensemble
from nequix_fw.errors import ModelError
from nequix_fw.results import ResultsWriter
from nequix_fw.settings import EnsembleSettings
from nequix_fw.structures import check_output, iter_frames
from nequix_fw.uncertainty import heads_path

logger = logging.getLogger(__name__)


def run_ensemble(
    model_specs: Sequence[str | Path],
    structures: Sequence[str | Path],
    output: str | Path,
    settings: EnsembleSettings | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate every input structure with the ensemble and write the results JSON atomically.

    Inputs are checked first (readable, elements covered), so bad input fails before any
    model work. Returns the summary written at the end of the file.
    """
    settings = settings or EnsembleSettings()
    check_output(output, "file")
    ensemble = Ensemble.from_specs(model_specs, settings)
    if len(ensemble) < 2:
        path = ensemble.models[0].info.path
        raise ModelError(
            f"{path}: one model without LLPR heads (no {heads_path(path).name} beside it): "
            "uncertainty needs at least 2 models, or a model with LLPR heads "
            "(train_ensemble.uncertainty: llpr) (command line: --models)"
        )
    ensemble.check_distinct()
    n_frames = 0
    for frame in iter_frames(structures):  # cheap first pass: readable, covered, counted
        ensemble.check_covered(frame.atoms, f"{frame.source} frame {frame.frame}")
        n_frames += 1
    models = ensemble.model_infos()
    with ResultsWriter(
        output,
        models,
        settings.model_dump(mode="json"),
        uncertainty_method=ensemble.uncertainty_method,
    ) as writer:
        bar = tqdm(total=n_frames, unit="struct", disable=not progress, desc="ensemble")
        for rec in ensemble.evaluate(iter_frames(structures), on_batch=bar.update):
            writer.write(rec)
        bar.close()
    logger.info(
        "%d models (%s) evaluated %d structures -> %s",
        len(ensemble.models),
        ensemble.uncertainty_method,
        n_frames,
        output,
    )
    return writer.summary
