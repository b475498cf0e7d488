"""Why a property check stalls: the evidence a campaign's own records and labels give.

A missed tolerance (`campaign.property_tolerances`) of the property checks that explore
(`exploration.properties.CHECKS`: the E-V curve's V0 and B0, the elastic constants, the
phonons, the vacancy formation energy) has stalled at iteration k when its |error| fell by
less than `STALL_FALL` from iteration k - `STALL_ITERATIONS` to k. The diagnosis, first that holds:

1. no labels of its kind were added over those iterations (the cells its missed check adds,
   which the selection takes first by `campaign.property_labels`): they are what teach it;
2. the models do not fit the labelled cells of its kind: the ensemble mean's stress error
   (forces for phonons) on them, relative to their stresses, is above the tolerance's share
   (for the vacancy, its energy error per cell above the tolerance in eV; `fit_error`): the
   model cannot represent them, so raise its capacity or the stress weight;
3. the ensemble disagrees on the check: the spread of its worst quantity is at least
   `DISAGREEMENT` of that quantity's error (elastic constants and phonons, whose checks give
   each model's value): more labels will help;
4. otherwise the models fit those cells but miss the check: more or other cells are needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms

from nequix_fw.exploration.properties import CHECKS
from nequix_fw.labels import Labelled

#: A property stalls when its |error| fell by less than this fraction over the iterations...
STALL_FALL = 0.1
#: ... from iteration k - STALL_ITERATIONS to k.
STALL_ITERATIONS = 2
#: The ensemble disagrees on a check when the spread of its worst quantity is at least this
#: fraction of that quantity's error.
DISAGREEMENT = 0.5
#: How reports name the properties.
NAMES = {
    "v0_percent": "V0",
    "bulk_modulus_percent": "B0",
    "phonon_percent": "phonons",
    "vacancy_formation_eV": "vacancy formation energy",
}

Predict = Callable[[list[Atoms]], list]


def check_of(tolerance: str) -> str | None:
    """The property check ('eos', 'elastic', 'phonons') a tolerance judges (None: none that
    explores, such as the vacancy formation energy)."""
    return next((check for check, names in CHECKS.items() if tolerance in names), None)


def stalled(history: Sequence[dict | None], tolerances: dict[str, float]) -> dict[str, list]:
    """The missed tolerances whose |error| fell by less than `STALL_FALL` over `history`, the
    property errors of the last `STALL_ITERATIONS` + 1 iterations (oldest first): {tolerance:
    its errors}. A history that is shorter, or lacks a value, shows no stall."""
    if len(history) < STALL_ITERATIONS + 1:
        return {}
    history = [h or {} for h in history[-(STALL_ITERATIONS + 1) :]]
    out = {}
    for name, tolerance in tolerances.items():
        errors = [h.get(name) for h in history]
        if check_of(name) is None or any(e is None for e in errors):
            continue
        first, last = abs(errors[0]), abs(errors[-1])
        if last > tolerance and last > (1 - STALL_FALL) * first:
            out[name] = errors
    return out


def labelled_of_kind(manifests: Iterable[Path], check: str) -> set[str]:
    """The structure ids that selections (their manifest.json files) took for `check`'s
    property reserve (reason ``property check <check> missed ...``)."""
    ids = set()
    for path in manifests:
        for e in json.loads(Path(path).read_text())["structures"]:
            if e.get("selected") and str(e.get("reason", "")).startswith(
                f"property check {check} "
            ):
                ids.add(e["id"])
    return ids


def fit_error(predict: Predict, data: Sequence[Labelled], check: str) -> float | None:
    """The ensemble mean's error on labelled cells of `check`'s kind: the RMS of the stress
    error over the RMS of the stress; for 'phonons' (displaced cells at one volume) the same
    of the forces; for 'vacancy' the RMS energy error per cell (eV), in its tolerance's unit.
    None without such labels."""
    if check in ("eos", "elastic"):
        data = [d for d in data if d.stress is not None]
    if not data:
        return None
    preds = predict([d.frame.atoms for d in data])
    if check == "vacancy":
        errors = [p.energies.mean() - d.energy for d, p in zip(data, preds, strict=True)]
        return float(np.sqrt(np.mean(np.square(errors))))
    labels, means = [], []
    for d, p in zip(data, preds, strict=True):
        if check == "phonons":
            labels.append(np.ravel(d.forces))
            means.append(np.ravel(p.forces.mean(0)))
        elif p.stresses is not None:
            labels.append(np.ravel(d.stress))
            means.append(np.ravel(p.stresses.mean(0)))
    if not labels:
        return None
    label, mean = np.concatenate(labels), np.concatenate(means)
    scale = float(np.sqrt(np.mean(label**2)))
    return float(np.sqrt(np.mean((mean - label) ** 2)) / scale) if scale > 0 else None


def worst_quantity(properties: dict | None, check: str) -> tuple[str, float, float] | None:
    """The worst quantity of a validation report's elastic or phonon check (its `properties`):
    (its name, its error, the models' spread), in the check's unit (GPa, THz); None for the
    E-V check, whose report has no spread."""
    report = (properties or {}).get(check)
    if not report:
        return None
    if check == "elastic":
        rows = [
            (name, v["model"] - v["reference"], v["model_std"])
            for name, v in report["constants_GPa"].items()
        ]
    else:
        rows = [
            (f"{q} mode {i + 1}", m - r, s)
            for q, v in report["qpoints"].items()
            for i, (m, r, s, e) in enumerate(
                zip(
                    v["model_THz"],
                    v["reference_THz"],
                    v["model_std_THz"],
                    v["error_percent"],
                    strict=True,
                )
            )
            if e is not None
        ]
    return max(rows, key=lambda row: abs(row[1])) if rows else None


def diagnose(
    tolerance: str,
    limit: float,
    n_labels: int,
    fit: float | None,
    worst: tuple[str, float, float] | None,
) -> str:
    """What the evidence on a stalled `tolerance` (its value `limit`, in % or eV) points to: the
    labels of its kind added (`n_labels`), the models' `fit_error` on all its labelled cells
    and the check's `worst_quantity`."""
    check = check_of(tolerance)
    what = "force" if check == "phonons" else "stress"
    if n_labels == 0:
        return (
            "no labels of its kind were added: set campaign.property_labels, which takes the "
            "cells its missed check adds first"
        )
    if check == "vacancy" and fit is not None:
        misfit = f"energy error {fit:.3g} eV per cell"
        if fit > limit:
            return (
                f"the models do not fit the labelled cells of its kind ({misfit}, above the "
                f"tolerance's {limit:g} eV): raise the capacity (train_ensemble.architecture)"
            )
        return (
            f"the models fit the labelled cells of its kind ({misfit}) but miss the check: "
            "more or other cells are needed"
        )
    if fit is not None and fit > limit / 100:
        return (
            f"the models do not fit the labelled cells of its kind ({what} error {fit:.1%} of "
            f"their {what}, above the tolerance's {limit:g} %): raise the capacity "
            "(train_ensemble.architecture) or train_ensemble.stress_weight"
        )
    if worst is not None and abs(worst[1]) > 0 and worst[2] >= DISAGREEMENT * abs(worst[1]):
        return (
            f"the ensemble disagrees on the check ({worst[0]}: spread {worst[2]:.3g} against "
            f"an error of {worst[1]:+.3g}): more labels will help"
        )
    fits = "" if fit is None else f" ({what} error {fit:.1%} of their {what})"
    return (
        f"the models fit the labelled cells of its kind{fits} but miss the check: more or "
        "other cells are needed"
    )
