"""The campaign's stages as plain calls on its directory (no FireWorks here): each takes the
campaign (or its log) and reports to the iteration's record."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from math import ceil
from pathlib import Path

import ase.io

from nequix_fw.campaign.layout import Campaign, member_files, models_dir
from nequix_fw.campaign.log import CampaignLog
from nequix_fw.campaign.report import plot_progress
from nequix_fw.dataset import (
    dataset_ids,
    labelled_by_id,
    read_labelled,
    training_structures,
    update_dataset,
)
from nequix_fw.diagnosis import (
    STALL_ITERATIONS,
    check_of,
    diagnose,
    fit_error,
    labelled_of_kind,
    stalled,
    worst_quantity,
)
from nequix_fw.ensemble import Ensemble
from nequix_fw.errors import SettingsError
from nequix_fw.evaluation import run_ensemble
from nequix_fw.exploration import explore, stop_counts
from nequix_fw.exploration.properties import (
    missed_checks,
    npt_candidates,
    property_candidates,
)
from nequix_fw.forgetting import forgetting_summary
from nequix_fw.labelled_sets import label_ev_set
from nequix_fw.labelling import label_structures, make_backend
from nequix_fw.labelling.property_set import label_cells
from nequix_fw.selection import Reserve, select_from_results
from nequix_fw.settings import (
    LABEL_REFERENCE,
    EnsembleSettings,
    ExplorationSettings,
    LabellingSettings,
    SelectionSettings,
    TrainingSettings,
    ValidationSettings,
)
from nequix_fw.structures import atomic_path, iter_frames
from nequix_fw.training import train_ensemble
from nequix_fw.validation import validate

logger = logging.getLogger(__name__)


@dataclass
class SystemExploration:
    """One system's exploration in an iteration (`name` None: the campaign's only system)."""

    name: str | None
    initial_structures: Path
    settings: ExplorationSettings
    output: Path  # candidates.extxyz + manifest.json


@dataclass
class SystemCandidates:
    """One system's candidates in an iteration: the explored pool (if it was made) and the
    fixed ones, evaluated into `output` (ensemble_results.json)."""

    name: str | None
    explored: Path | None
    fixed: list[Path]
    output: Path


def explore_stage(
    log: CampaignLog,
    k: int,
    models: list[str],
    ensemble: EnsembleSettings,
    systems: list[SystemExploration],
    explored_with: str | None = None,
) -> dict:
    """MD, distortions and random packings from each system's starts with the ensemble of
    `models` (that of iteration k-1, or, as `explored_with` says, a trusted one)."""
    engine = Ensemble.from_specs(models, ensemble)
    counts, stops = {}, Counter()
    for system in systems:
        starts = list(iter_frames([system.initial_structures]))
        manifest = explore(engine, starts, system.output, system.settings, progress=False)
        counts[system.name] = len(manifest["frames"])
        stops.update(stop_counts(manifest["trajectories"]))
    if explored_with:
        logger.warning("iteration %d explores with %s", k, explored_with)
    if None not in counts:
        return log.record(
            k,
            n_candidates=sum(counts.values()),
            trajectory_stops=dict(stops),
            system_candidates=counts,
            explored_with=explored_with,
        )
    return log.record(
        k, n_candidates=counts[None], trajectory_stops=dict(stops), explored_with=explored_with
    )


def run_ensemble_stage(
    log: CampaignLog,
    k: int,
    models: list[str],
    ensemble: EnsembleSettings,
    systems: list[SystemCandidates],
    properties: dict | None = None,
) -> dict:
    """The ensemble of `models` (iteration k-1's) on each system's candidates; with
    `properties` (see `RunEnsembleTask`), also on the candidates of the property checks that
    iteration k-1's validation missed (property-driven exploration), as the first system's."""
    n, added = 0, None
    for system in systems:
        explored = system.explored
        inputs = ([explored] if explored is not None and explored.is_file() else []) + list(
            system.fixed
        )
        if properties and system is systems[0]:  # with systems: the first explored
            paths, added = _property_candidates(
                log, k, properties, system.output.parent, models, ensemble
            )
            inputs += paths
        if not inputs:
            where = f" of system {system.name}" if system.name else ""
            raise SettingsError(
                f"no candidates{where}: enable exploration or give a candidate_pool"
            )
        summary = run_ensemble(models, inputs, system.output, ensemble, progress=False)
        n += summary.get("n_structures") or 0
    if properties:
        return log.record(k, n_evaluated=n, property_exploration=added or {})
    return log.record(k, n_evaluated=n)


def _property_candidates(
    log: CampaignLog,
    k: int,
    spec: dict,
    directory: Path,
    models: list[str],
    ensemble: EnsembleSettings,
) -> tuple[list[Path], dict | None]:
    """The candidates of the checks iteration k-1's validation missed, in
    `directory`/property_candidates_<check>.extxyz, and which check added how many for which missed
    tolerances ([], None when none missed). A missed E-V check also runs NPT on the ensemble
    of `models` at pressures from the reference bulk modulus, when the validation had one."""
    previous = log.iteration_record(k - 1)
    missed = missed_checks(previous.get("properties"), spec["tolerances"])
    if not missed:
        return [], None
    if spec.get("structure"):
        structure = next(iter_frames([spec["structure"]])).atoms
    else:
        structure = read_labelled(spec["testset"], log.datasets)[0].frame.atoms
    paths, added = [], {}
    bulk_modulus = previous.get("reference_bulk_modulus_GPa")

    def write(name: str, cells: list) -> Path:
        path = directory / f"property_candidates_{name}.extxyz"
        with atomic_path(path) as tmp:
            ase.io.write(tmp, cells, format="extxyz")
        paths.append(path)
        return path

    for check, names in missed.items():
        new = property_candidates(structure, check, spec["n"], spec["seed"], spec["supercell"])
        added[check] = {"missed": names, "added": len(new), "file": str(write(check, new))}
        if check == "eos" and bulk_modulus and structure.pbc.all():
            mean = Ensemble.from_specs(models, ensemble)
            npt = npt_candidates(structure, mean, bulk_modulus, spec["n"], spec["seed"])
            added[check].update(added=len(new) + len(npt), npt=len(npt))
            if npt:  # through uncertainty alone: frames of the ensemble's own dynamics
                write("eos_npt", npt)
    logger.info("iteration %d: property-driven candidates %s", k, added)
    return paths, added


def _property_reserve(c: Campaign, k: int) -> list[Reserve]:
    """What the selection of iteration k takes first: `campaign.property_labels` of the cells
    each missed property check added (the most uncertain; the NPT frames go by uncertainty
    alone), since a missed check is itself evidence that the ensemble is wrong there, even
    where its members agree."""
    added = c.iteration_record(k).get("property_exploration") or {}
    n = c.settings.property_labels
    return [
        (info["file"], n, f"property check {check} missed ({', '.join(info['missed'])})")
        for check, info in added.items()
        if n and info.get("file")
    ]


def select_stage(c: Campaign, k: int) -> dict:
    """Each system's selection (its own trust levels and quota) into select/ (select/<name>/
    with systems); never a structure labelled before."""
    # never pay twice for a structure labelled earlier; a rerun of this selection picks the
    # same structures as its first run (labelled by this iteration since)
    labelled = dataset_ids(c.dataset, c.datasets, before_iteration=k)
    known = None
    manifests, systems = {}, {}
    for i, system in enumerate(c.systems_at(k)):
        settings = c.section(SelectionSettings, k, system)
        # new random draws every iteration
        settings = settings.model_copy(update={"seed": settings.seed + k})
        if settings.diverse and known is None:  # keep away from the training set
            known = training_structures(c.dataset, c.datasets)
        manifest = select_from_results(
            c.results_file(k, system),
            c.stage_dir(k, "select", system),
            settings,
            labelled,
            known,
            reserve=_property_reserve(c, k) if i == 0 else (),  # where run_ensemble put them
            # lo: auto from the calibration of the ensemble that predicted
            calibration=c.iteration_record(k - 1).get("calibration"),
            calibration_of=f"the validation of iteration {k - 1}",
        )
        labelled = labelled | {e["id"] for e in manifest["structures"] if e["selected"]}
        name = system.name if system else None
        manifests[name] = manifest
        n = manifest["counts"]["selected"]
        systems[name] = {
            "selection": manifest["counts"],
            "n_selected": n,
            "selection_lo": manifest["settings"]["lo"],
        }
    if c.store is not None:
        c.store.save_selection(k, manifests)
    counts = {
        key: sum(m["counts"][key] for m in manifests.values())
        for key in next(iter(manifests.values()))["counts"]
    }
    first = c.section(SelectionSettings, k)
    entries = {
        "selection": counts,
        "n_selected": counts["selected"],
        "selection_method": first.method,
    }
    if c.settings.systems:
        return c.record(k, **entries, systems=systems)
    return c.record(k, **entries, selection_lo=systems[None]["selection_lo"])


def label_inputs(c: Campaign, k: int) -> Path:
    """What iteration k labels: the initial structures at 0, then the selection."""
    return Path(c.settings.initial_structures) if k == 0 else c.stage_dir(k, "select")


def label_groups(c: Campaign, n_structures: int) -> list[int | None]:
    """The labelling Fireworks' groups for `n_structures` ([None]: one Firework for all)."""
    size = c.settings.label_group_size
    if size is None or n_structures <= size:
        return [None]
    return list(range(ceil(n_structures / size)))


def label_stage(
    log: CampaignLog,
    k: int,
    structures: Path,
    output: Path,
    settings: LabellingSettings,
    env: dict | None = None,
    group: tuple[int, int] | None = None,
) -> dict:
    """Label iteration k's `structures` (one `group` = (index, size) of them) into `output`;
    the dataset stage records the counts of all groups."""
    summary = label_structures(
        structures,
        output,
        make_backend(settings, env),
        settings,
        iteration=k,
        progress=False,
        group=group,
    )
    if log.store is not None:  # this group's task documents
        tasks = [output / sid / "task.json" for sid in summary["structure_ids"]]
        log.store.save_label_tasks(k, [json.loads(p.read_text()) for p in tasks])
    return summary


def update_dataset_stage(
    log: CampaignLog, k: int, labels: Path, dataset: str, max_failed_fraction: float | None
) -> dict:
    """Add iteration k's `labels` (all groups) to `dataset`, unless more than
    `max_failed_fraction` failed: then the record carries the stop reason and nothing is
    added."""
    parts = [json.loads(p.read_text()) for p in sorted(labels.glob("summary*.json"))]
    counts = {
        "n_labelled": sum(p["n_success"] for p in parts),
        "n_label_failures": sum(p["n_failed"] for p in parts),
        "n_label_reused": sum(p["n_reused"] for p in parts),
    }
    stop = labelling_stop(
        labels, counts["n_labelled"], counts["n_label_failures"], max_failed_fraction
    )
    if stop:
        return log.record(k, **counts, stop_reason=stop)
    s = update_dataset(labels, dataset, iteration=k, store=log.datasets)
    return log.record(
        k,
        **counts,
        n_added=s["n_added"],
        n_conflicts=s["n_conflicts"],
        dataset_size=s["n_total"],
        dataset=s["dataset"],
        stop_reason=None,
    )


def labelling_stop(labels: Path, n_ok: int, n_failed: int, limit: float | None) -> str | None:
    """Why an iteration stops after labelling into `labels` (None: its labels go into the
    dataset)."""
    n = n_ok + n_failed
    if limit is None or not n or n_failed / n <= limit:
        return None
    return (
        f"labelling failed for {n_failed} of {n} structures (more than {limit:.0%}, "
        f"label.max_failed_fraction): reasons in {labels}/*/task.json"
    )


def train_ensemble_stage(
    log: CampaignLog,
    k: int,
    dataset: str,
    output: Path,
    settings: TrainingSettings,
    finetune_from: str | list[str] | None = None,
    warm_start: Path | None = None,
) -> dict:
    """Train iteration k's ensemble on `dataset` into `output`: fine-tuned from
    `finetune_from`, warm-started from the members in `warm_start`, or from scratch."""
    metas = train_ensemble(
        [dataset],
        output,
        settings,
        finetune_from=finetune_from,
        warm_start=warm_start,
        overwrite=True,
        progress=False,
        store=log.datasets,
    )
    if log.store is not None:
        log.store.save_members(k, output, metas)
    losses = [m["best_valid"]["loss"] for m in metas]
    return log.record(k, n_models=len(metas), best_valid_loss=losses)


def validate_stage(c: Campaign, k: int, env: dict | None = None) -> dict:
    """Validate ensemble k on the test set; with ``validate.reference: label``, against
    the E-V set that the campaign's labelling backend (``>>key<<`` settings from the worker's
    `env`) labels once."""
    if not c.settings.testset:
        return c.record(k, validation=None)
    checks = c.section(ValidationSettings, k)
    if checks.reference == LABEL_REFERENCE:
        checks = checks.model_copy(update={"reference_data": [reference_ev_set(c, checks, env)]})
    output = c.stage_dir(k, "validate") / "validation.json"
    report = validate(
        c.models(k),
        c.settings.testset,
        output,
        checks,
        store=c.datasets,
        settings=c.section(EnsembleSettings, k),
        label_reference=(reference_labels(c, env) if checks.reference == LABEL_REFERENCE else None),
        foundation=foundation_of(c),
    )
    if c.store is not None:
        c.store.save_validation(k, report)
    mean = report["ensemble_mean"]
    reference_ev = (report.get("physics") or {}).get("ev_reference") or {}
    record = c.record(
        k,
        validation={
            "energy_rmse_meV_per_atom": mean["energy_per_atom_meV"]["rmse"],
            "force_rmse_eV_per_A": mean["forces_eV_per_A"]["rmse"],
        },
        calibration=(report.get("uncertainty") or {}).get("calibration"),
        uncertainty_error_ratio=(report.get("uncertainty") or {}).get("uncertainty_error_ratio"),
        md_stable_fraction=(report.get("md_stability") or {}).get("stable_fraction"),
        properties=_property_errors(report.get("physics"), report.get("properties")),
        reference_bulk_modulus_GPa=reference_ev.get("bulk_modulus_GPa"),
        forgetting=(forgetting_summary(report["forgetting"]) if report.get("forgetting") else None),
        elastic_worst=_elastic_worst(report.get("properties")),
    )
    stalls = stalled_properties(c, k, report)
    if stalls:
        record = c.record(k, stalled=stalls)
    plot_progress(c.directory)
    return record


def _elastic_worst(properties: dict | None) -> str | None:
    """The elastic constant with the largest error (C12, ...), None without the check."""
    worst = worst_quantity(properties, "elastic")
    return worst[0] if worst else None


def stalled_properties(c: Campaign, k: int, report: dict) -> dict[str, dict]:
    """The property tolerances that stalled at iteration k (`diagnosis.stalled`), each with
    its errors over the last iterations, the labels of its kind added then and in all, the
    models' fit of those and the diagnosis (`diagnosis.diagnose`)."""
    first = k - STALL_ITERATIONS
    if first < 0:
        return {}
    history = [c.iteration_record(j).get("properties") for j in range(first, k)]
    errors = _property_errors(report.get("physics"), report.get("properties"))
    found = stalled([*history, errors], c.settings.property_tolerances)

    evidence: dict[str, tuple] = {}  # by check (V0 and B0 share the E-V check's)
    out, ensemble = {}, None
    for name, errors in found.items():
        check = check_of(name)
        if check not in evidence:  # each iteration's manifests read once
            by_iteration = [
                labelled_of_kind(c.iter_dir(j).glob("select/**/manifest.json"), check)
                for j in range(1, k + 1)
            ]
            recent = set().union(*by_iteration[first:])  # iterations first + 1 .. k
            data = labelled_by_id(c.dataset, set().union(*by_iteration), c.datasets)
            fit = None
            if data:
                settings = c.section(EnsembleSettings, k)
                ensemble = ensemble or Ensemble.from_specs(c.models(k), settings)
                fit = fit_error(ensemble.predict, data, check)
            evidence[check] = (recent, data, fit)
        recent, data, fit = evidence[check]
        limit = c.settings.property_tolerances[name]
        out[name] = {
            "iterations": [first, k],
            "errors": errors,
            "labels_added": len(recent),
            "labels_of_its_kind": len(data),
            "fit_error": fit,
            "diagnosis": diagnose(
                name, limit, len(recent), fit, worst_quantity(report.get("properties"), check)
            ),
        }
    return out


def foundation_of(c: Campaign) -> str | None:
    """The foundation model a fine-tuned campaign starts from (the first of a committee)."""
    spec = c.settings.finetune_from
    return (spec[0] if isinstance(spec, list) else spec) or None


def trusted_models(
    log: CampaignLog, k: int, foundation: str | None
) -> tuple[list[str] | None, str | None]:
    """The models iteration k >= 1 of the campaign of `log` explores with, instead of ensemble
    k-1, when its validation failed the repulsive-wall check: the last ensemble that passed
    it, or the `foundation` model itself; and why. (None, None) when ensemble k-1 is trusted
    (not yet validated, or passed). Decided when the exploration runs, from the records as
    they are then (a validation run again since the workflow was built counts)."""
    failed = []
    for j in range(k - 1, -1, -1):
        summary = log.iteration_record(j).get("forgetting") or {}
        if summary.get("wall_passed", True):
            if not failed:
                return None, None
            return member_files(models_dir(log.directory, j)), (
                f"iteration {j}'s ensemble: iteration {failed[0]}'s failed the repulsive-wall "
                f"check ({_first_wall_failure(log, failed[0])})"
            )
        failed.append(j)
    return [foundation], (
        f"the foundation model {foundation}: no ensemble passed the repulsive-wall check "
        f"(iteration {failed[0]}: {_first_wall_failure(log, failed[0])})"
    )


def _first_wall_failure(log: CampaignLog, k: int) -> str:
    """The first wall failure of iteration k's validation."""
    failures = (log.iteration_record(k).get("forgetting") or {}).get("wall_failures") or []
    return failures[0] if failures else "no detail"


def reference_ev_set(c: Campaign, checks: ValidationSettings, env: dict | None) -> str:
    """The campaign's E-V reference set (the dataset <dataset>_reference_ev): `checks.structure`
    (default: the first test structure) at 7 volumes, labelled by the campaign's labelling
    backend in <directory>/reference_ev the first time, reused after."""
    if checks.structure is not None:
        structure = next(iter_frames([checks.structure])).atoms
    else:
        structure = read_labelled(c.settings.testset, c.datasets)[0].frame.atoms
    to = f"{c.dataset}_reference_ev"
    settings = c.section(LabellingSettings, 0)
    label_ev_set(
        structure,
        to,
        make_backend(settings, env),
        settings,
        c.directory / "reference_ev",
        store=c.datasets,
        progress=False,
    )
    return to


def reference_labels(c: Campaign, env: dict | None):
    """What labels the cells of the elastic and phonon checks with the campaign's labelling
    backend (``>>key<<`` settings from the worker's `env`), once per campaign: in
    <directory>/reference_<check>, reused by every later validation."""
    settings = c.section(LabellingSettings, 0)

    def label(check: str, cells: list) -> list:
        out = c.directory / f"reference_{check}"
        return label_cells(cells, out, make_backend(settings, env), settings, progress=False)

    return label


def _property_errors(physics: dict | None, properties: dict | None = None) -> dict | None:
    """The structural and property checks' errors against the reference, by tolerance name."""
    if not physics and not properties:
        return None
    out = {}
    if physics:
        vacancy = physics.get("vacancy") or {}
        out["v0_percent"] = physics["v0_error_percent"]
        out["bulk_modulus_percent"] = physics["bulk_modulus_error_percent"]
        out["vacancy_formation_eV"] = vacancy.get("error_eV")
    for check, tolerance in (("elastic", "elastic_percent"), ("phonons", "phonon_percent")):
        if properties and check in properties:
            out[tolerance] = properties[check]["error_percent"]
    return out
