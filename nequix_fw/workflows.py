"""The campaign as FireWorks workflows, one per iteration: iteration 0 up front, each later one
added by the iteration before. `SelectTask` and `ValidateTask` make them dynamic: select appends
the rest of its iteration (labelling .. validation) as FWAction additions built here, and the
last task of an iteration adds the next iteration as a workflow of its own, found again by its
metadata (``nequix_fw_campaign``, ``iteration``); nothing is added when the campaign stops, nor
twice when a rerun finds what its first run added. One workflow per iteration keeps FireWorks'
cost per Firework from growing with the campaign: FireWorks reloads and rewrites a whole
workflow on every state change (`benchmarks/bench_campaign_overhead.py --scale`). The stage
tasks are in `nequix_fw.firetasks`. One Firework builder per stage (`explore_fw`, `run_ensemble_fw`,
`select_fw`, `label_fw`, `update_dataset_fw`, `train_ensemble_fw`, `validate_fw`) resolves its
task's inputs (the iteration's settings, schedule and stage applied, and its paths) from the
campaign and gives it the stage's resources."""

from __future__ import annotations

import logging
from pathlib import Path

from fireworks import FiretaskBase, Firework, FWAction, Workflow, explicit_serialize

from nequix_fw.campaign import Campaign, stages
from nequix_fw.campaign.stages import foundation_of, label_groups, label_inputs
from nequix_fw.errors import SettingsError
from nequix_fw.firetasks import (
    ExploreTask,
    LabelTask,
    RunEnsembleTask,
    StageTask,
    TrainEnsembleTask,
    UpdateDatasetTask,
)
from nequix_fw.labelling import backend_class
from nequix_fw.settings import (
    AUTO_STRESS_WEIGHT,
    FINETUNE_DEFAULTS,
    LABEL_REFERENCE,
    PLACEHOLDER,
    SECTIONS,
    ExplorationSettings,
    LabellingSettings,
    SystemSettings,
    TrainingSettings,
    ValidationSettings,
    path_fields,
    read_sections,
    section_name,
    section_settings,
    stages_as_phases,
)
from nequix_fw.stopping import iteration_stop, selection_decision
from nequix_fw.structures import is_store_spec, iter_frames
from nequix_fw.validation import check_validation

logger = logging.getLogger(__name__)


def _fw(c: Campaign, k: int, task: FiretaskBase, stage: str, group: int | None = None) -> Firework:
    """The Firework of `stage` at iteration k: its task, and the stage's resources (spec)."""
    resources = c.settings.resources.get(stage)
    spec = resources.spec() if resources else {}
    # every task reaches the database through the LaunchPad that runs it; growing tasks also
    # look up what they appended
    spec["_add_launchpad_and_fw_id"] = True
    name = f"{c.settings.name} {stage} {k}" + ("" if group is None else f".{group}")
    return Firework([task], spec=spec, name=name)


def _log_params(c: Campaign, k: int) -> dict:
    """Where a stage task reports (its iteration, campaign.json, the store)."""
    params = {"iteration": k, "campaign_dir": str(c.directory), "campaign_name": c.settings.name}
    if c.settings.launchpad is not None:
        params["launchpad"] = str(c.settings.launchpad)
    return params


def _value(c: Campaign, cls, k: int, key: str):
    """Setting `key` of section `cls` at iteration k, as given (a placeholder kept) or its
    default."""
    return c.section_values(section_name(cls), k).get(key, cls.model_fields[key].default)


def explore_fw(c: Campaign, k: int) -> Firework:
    """Iteration k's exploration: each system still explored, its settings at k (new seeds
    every iteration: seed + 1000 k), with the ensemble in use after k-1, unless it failed the
    repulsive-wall check (decided when it runs: `campaign.stages.trusted_models`)."""
    systems = []
    for system in c.systems_at(k):
        values = c.section_values("explore", k, system)
        seeds = values.get("seeds", ExplorationSettings.model_fields["seeds"].default)
        if not PLACEHOLDER.match(str(seeds)):
            values["seeds"] = [s + 1000 * k for s in seeds]
        starts = system.initial_structures if system else c.settings.initial_structures
        systems.append(
            {
                "name": system.name if system else None,
                "initial_structures": str(starts),
                "explore": values,
                "output": str(c.stage_dir(k, "explore", system)),
            }
        )
    foundation = foundation_of(c)
    task = ExploreTask(
        **_log_params(c, k),
        models_dir=str(c.models_dir(k - 1)),
        systems=systems,
        ensemble=c.section_values("ensemble", k),
        **({"foundation": foundation} if foundation else {}),
    )
    return _fw(c, k, task, "explore")


def run_ensemble_fw(c: Campaign, k: int) -> Firework:
    """Iteration k's evaluation of each system's candidates (explored and fixed)."""
    systems = []
    for system in c.systems_at(k):
        fixed = system.candidate_pool if system else c.settings.candidate_pool
        explored = c.stage_dir(k, "explore", system) / "candidates.extxyz"
        systems.append(
            {
                "name": system.name if system else None,
                "explored": str(explored),
                "fixed": [str(p) for p in fixed],
                "output": str(c.results_file(k, system)),
            }
        )
    params = {}
    tolerances = c.settings.property_tolerances
    if tolerances and c.settings.property_exploration:
        checks = c.section(ValidationSettings, k)
        params["properties"] = {
            "tolerances": dict(tolerances),
            "n": c.settings.property_exploration,
            "structure": None if checks.structure is None else str(checks.structure),
            "testset": [str(p) for p in c.settings.testset],
            "supercell": list(checks.phonon_supercell),
            "seed": k,
        }
    task = RunEnsembleTask(
        **_log_params(c, k),
        models_dir=str(c.models_dir(k - 1)),
        systems=systems,
        ensemble=c.section_values("ensemble", k),
        **params,
    )
    return _fw(c, k, task, "run_ensemble")


def select_fw(c: Campaign, k: int) -> Firework:
    """Iteration k's selection, which appends the rest of the iteration or stops."""
    return _fw(c, k, SelectTask(sections=c.sections, iteration=k), "select")


def label_fw(c: Campaign, k: int, group: int | None = None) -> Firework:
    """Iteration k's labelling (of one group of its structures)."""
    params = {
        "structures": str(label_inputs(c, k)),
        "output": str(c.stage_dir(k, "label")),
        "label": c.section_values("label", k),
    }
    if group is not None:
        params["group"] = [group, c.settings.label_group_size]
    return _fw(c, k, LabelTask(**_log_params(c, k), **params), "label", group)


def update_dataset_fw(c: Campaign, k: int) -> Firework:
    """Iteration k's labels into the campaign's training set."""
    limit = _value(c, LabellingSettings, k, "max_failed_fraction")
    task = UpdateDatasetTask(
        **_log_params(c, k),
        labels=str(c.stage_dir(k, "label")),
        dataset=c.dataset,
        max_failed_fraction=limit,
    )
    return _fw(c, k, task, "update_dataset")


def train_ensemble_fw(c: Campaign, k: int) -> Firework:
    """Iteration k's ensemble: fine-tuned (campaign.finetune_from) or from scratch at 0,
    warm-started from the ensemble in use after k-1 later."""
    params = {
        "dataset": c.dataset,
        "output": str(c.stage_dir(k, "train_ensemble")),
        "train_ensemble": c.section_values("train_ensemble", k),
    }
    if k == 0 and c.settings.finetune_from:
        params["finetune_from"] = c.settings.finetune_from
    if k > 0:
        params["warm_start"] = str(c.models_dir(k - 1))
    return _fw(c, k, TrainEnsembleTask(**_log_params(c, k), **params), "train_ensemble")


def validate_fw(c: Campaign, k: int) -> Firework:
    """Iteration k's validation, which appends the next iteration or stops the campaign."""
    return _fw(c, k, ValidateTask(sections=c.sections, iteration=k), "validate")


def _chain(
    fws: list[Firework], name: str, roots: list[Firework] = (), metadata: dict | None = None
) -> Workflow:
    """`roots` (run in parallel) -> fws[0] -> fws[1] -> ..."""
    links = {a.fw_id: [b.fw_id] for a, b in zip(fws, fws[1:], strict=False)}
    links.update({r.fw_id: [fws[0].fw_id] for r in roots})
    return Workflow([*roots, *fws], links, name=name, metadata=metadata)


def _metadata(c: Campaign, k: int) -> dict:
    """What finds iteration k's workflow among the LaunchPad's."""
    return {"nequix_fw_campaign": c.settings.name, "iteration": k}


def labelling_workflow(c: Campaign, k: int, n_structures: int) -> Workflow:
    """label (in groups, in parallel) -> update_dataset -> train_ensemble -> validate of
    iteration k."""
    labels = [label_fw(c, k, g) for g in label_groups(c, n_structures)]
    fws = [update_dataset_fw(c, k), train_ensemble_fw(c, k), validate_fw(c, k)]
    return _chain(fws, f"{c.settings.name} iteration {k}", labels, _metadata(c, k))


def exploration_workflow(c: Campaign, k: int) -> Workflow:
    """(explore ->) run_ensemble -> select of iteration k >= 1."""
    fws = [explore_fw(c, k)] if c.settings.explore else []
    fws += [run_ensemble_fw(c, k), select_fw(c, k)]
    return _chain(fws, f"{c.settings.name} iteration {k}", metadata=_metadata(c, k))


def _absolute(value, or_name: bool = False):
    """A path made absolute (placeholders and store datasets db:NAME as they are; with
    `or_name`, a value that names no existing file or directory too)."""
    if isinstance(value, list):
        return [_absolute(v, or_name) for v in value]
    if value is None or PLACEHOLDER.match(str(value)) or is_store_spec(value):
        return value
    path = Path(value).expanduser()
    if or_name and not path.exists():
        return value
    return str(path.resolve())


def _section_places(sections: dict) -> list[tuple[str, dict]]:
    """Where section values are in a campaign's `sections`, each with its name in errors: the
    sections themselves, the schedule's entries, the phases' and the systems' settings."""
    campaign = sections.get("campaign", {})
    places = [("", sections)]
    for k, entry in campaign.get("schedule", {}).items():
        places.append((f" (campaign.schedule from iteration {k})", entry))
    for key in ("phases", "systems"):
        for i, entry in enumerate(campaign.get(key, [])):
            places.append((f" (campaign.{key}[{i}])", entry.get("settings", {})))
    return places


def _absolute_paths(sections: dict) -> None:
    """Every path setting (`settings.path_fields`) in `sections`, wherever section values are,
    made absolute: Fireworks run in directories of their own (rlaunch's launcher_*)."""
    entries = [(SystemSettings, system) for system in sections["campaign"].get("systems", [])]
    for _, place in _section_places(sections):
        entries += [(SECTIONS[name], values) for name, values in place.items()]
    for cls, values in entries:
        for key, or_name in path_fields(cls).items():
            if values.get(key) is not None:
                values[key] = _absolute(values[key], or_name)


#: The property checks whose errors depend on how well the members fit the labels' stresses.
STRESS_CHECKS = ("v0_percent", "bulk_modulus_percent", "elastic_percent")


def campaign_defaults(sections: dict) -> dict[str, dict]:
    """Fill in what a campaign's train_ensemble section leaves unset, written into it so that
    every iteration trains alike: the fine-tuning defaults (`settings.FINETUNE_DEFAULTS`) for
    a fine-tuned campaign (campaign.finetune_from), and ``stress_weight: auto`` when
    campaign.property_tolerances judge V0, B0 or the elastic constants (`STRESS_CHECKS`). The
    values chosen, by why: {"fine-tuning" | "property checks": {"section.field": value}}."""
    campaign = sections["campaign"]
    wanted = {}
    if campaign.get("finetune_from"):
        wanted["fine-tuning"] = FINETUNE_DEFAULTS
    if set(STRESS_CHECKS) & set(campaign.get("property_tolerances") or {}):
        wanted["property checks"] = {"stress_weight": "auto"}
    chosen: dict[str, dict] = {}
    for why, defaults in wanted.items():
        train = sections.setdefault("train_ensemble", {})
        for key, value in defaults.items():
            if key not in train:
                train[key] = value
                chosen.setdefault(why, {})[f"train_ensemble.{key}"] = value
    return chosen


def campaign_sections(
    config: str | Path, launchpad: str | Path | None = None, chosen: dict | None = None
) -> dict:
    """The settings sections of a campaign file, checked (at every scheduled iteration too),
    with paths made absolute and the defaults of `campaign_defaults` filled in; `chosen` (a
    dict), if given, gets those."""
    sections = read_sections(config)
    if "campaign" not in sections:
        raise SettingsError(f"{config}: no 'campaign' section")
    try:
        sections["campaign"] = stages_as_phases(sections["campaign"])
    except ValueError as exc:
        raise SettingsError(f"{config}: {exc}") from None
    filled = campaign_defaults(sections)
    if chosen is not None:
        chosen.update(filled)
    if launchpad is not None:
        sections["campaign"].setdefault("launchpad", str(launchpad))
    try:
        valid = Campaign(sections).settings  # the campaign section is valid
    except SettingsError as exc:
        raise SettingsError(f"{config}: {exc}") from None
    scheduled = valid.schedule
    sections["campaign"]["schedule"] = {str(k): v for k, v in scheduled.items()}  # BSON keys
    for key in ("phases", "systems"):  # their sections by their new names
        for entry, checked in zip(
            sections["campaign"].get(key, []), getattr(valid, key), strict=True
        ):
            entry["settings"] = checked.settings
    _absolute_paths(sections)
    c = Campaign(sections)
    for k in [0, *scheduled]:  # every section valid before anything runs
        for cls in SECTIONS.values():
            try:
                c.section(cls, k)
            except SettingsError as exc:
                where = f" (campaign.schedule from iteration {k})" if k in scheduled else ""
                raise SettingsError(f"{config}: {exc}{where}") from None
    overrides = [(f"campaign.phases[{i}]", ph.settings) for i, ph in enumerate(c.settings.phases)]
    overrides += [
        (f"campaign.systems[{i}]", system.settings) for i, system in enumerate(c.settings.systems)
    ]
    for where, settings in overrides:  # every stage's and system's sections valid too
        for name, values in settings.items():
            try:
                section_settings(SECTIONS[name], {**sections.get(name, {}), **values}, None)
            except SettingsError as exc:
                raise SettingsError(f"{config}: {exc} ({where})") from None
    if (
        c.settings.md_stable_fraction is not None
        and not c.section(ValidationSettings, 0).md_stability
    ):
        raise SettingsError(
            f"{config}: campaign.md_stable_fraction needs validate.md_stability: "
            "true (the runs it counts)"
        )
    checks = c.section(ValidationSettings, 0)
    if c.settings.property_tolerances and not (checks.reference or checks.reference_data):
        raise SettingsError(
            f"{config}: campaign.property_tolerances needs validate.reference "
            "or validate.reference_data (what the structural checks compare "
            "with)"
        )
    for tolerance, check in (("elastic_percent", "elastic"), ("phonon_percent", "phonons")):
        if tolerance in c.settings.property_tolerances and not getattr(checks, check):
            raise SettingsError(
                f"{config}: campaign.property_tolerances.{tolerance} needs validate.{check}: "
                "true (the check it judges)"
            )
    if "vacancy_formation_eV" in c.settings.property_tolerances and (
        checks.reference in (None, LABEL_REFERENCE) or checks.reference_data
    ):
        raise SettingsError(
            f"{config}: campaign.property_tolerances.vacancy_formation_eV needs validate."
            "reference as a calculator (emt, or 'module:Class'): the vacancy check relaxes "
            "its cells with it, which labelled E-V data cannot"
        )
    if (checks.elastic or checks.phonons) and checks.reference is None:
        raise SettingsError(
            f"{config}: validate.elastic and validate.phonons compare with a reference: "
            "validate.reference (a calculator such as emt, or 'label': the campaign's own "
            "labels)"
        )
    _check_stress_labels(c, config)
    if (checks.reference or checks.reference_data) and not c.settings.testset:
        raise SettingsError(
            f"{config}: the structural checks (validate.reference) run in the "
            "validation, which needs campaign.testset"
        )
    _check_inputs(sections, config)
    try:
        check_validation(checks)
    except SettingsError as exc:
        raise SettingsError(f"{config}: {exc}") from None
    return sections


def _check_stress_labels(c: Campaign, config: str | Path) -> None:
    """B0 and elastic tolerances need labels with stresses (refused when the label backend
    gives none) and a stress weight (a warning when the user set it to 0)."""
    derivatives = sorted(
        {"bulk_modulus_percent", "elastic_percent"} & set(c.settings.property_tolerances)
    )
    if not derivatives:
        return
    label = c.section(LabellingSettings, 0)
    if not PLACEHOLDER.match(label.backend):
        try:
            gives = backend_class(label.backend).gives_stress(label)
        except SettingsError as exc:
            raise SettingsError(f"{config}: {exc}") from None
        if gives is False:
            what = f" (calculator {label.calculator})" if label.backend == "ase" else ""
            raise SettingsError(
                f"{config}: campaign.property_tolerances {', '.join(derivatives)} judge "
                f"derivatives of the stress, but label.backend {label.backend}{what} gives no "
                "stress labels: drop those tolerances or label with a method that gives "
                "stresses"
            )
    if c.section(TrainingSettings, 0).stress_weight == 0:
        logger.warning(
            "%s: campaign.property_tolerances judge %s, derivatives of the stress, but "
            "train_ensemble.stress_weight is 0: the members never see the labels' stresses "
            "(left unset, it would be auto: %g with stress labels)",
            config,
            " and ".join(derivatives),
            AUTO_STRESS_WEIGHT,
        )


def _check_inputs(sections: dict, config: str | Path) -> None:
    """What would fail only hours later, after iteration 0 has spent its labels and training,
    refused now with the error it would give then: input data that is not there, and
    ``select.lo: auto`` without the test set whose validation calibrates it."""
    campaign = sections["campaign"]
    inputs = [
        ("campaign.candidate_pool", campaign.get("candidate_pool") or []),
        ("campaign.testset", campaign.get("testset") or []),
    ]
    for i, system in enumerate(campaign.get("systems", [])):
        paths = [system["initial_structures"], *system.get("candidate_pool", [])]
        inputs.append((f"campaign.systems[{i}]", paths))
    for where, place in _section_places(sections):
        checks = place.get("validate", {})
        data = [*checks.get("reference_data", []), checks.get("structure")]
        inputs.append((f"validate{where}", [p for p in data if p is not None]))
        if place.get("select", {}).get("lo") == "auto" and not campaign.get("testset"):
            raise SettingsError(
                f"{config}: select.lo: auto{where} needs a calibration of the uncertainty, and "
                "the validation has none without campaign.testset (it needs a labelled test "
                "set)"
            )
    for where, paths in inputs:
        for path in paths:
            if not (PLACEHOLDER.match(str(path)) or is_store_spec(path) or Path(path).exists()):
                raise SettingsError(f"{config}: {where}: {path}: no such file or directory")


def campaign_workflow(sections: dict) -> Workflow:
    """Iteration 0: label the initial structures, grow the dataset, train, validate; the
    validation appends iteration 1, and so on."""
    c = Campaign(sections)
    n_initial = sum(1 for _ in iter_frames([label_inputs(c, 0)]))
    return labelling_workflow(c, 0, n_initial)  # named `<name> iteration 0`, as every other


# -- the tasks that grow the workflow ---------------------------------------------------------


class _GrowingTask(StageTask):
    """A stage that decides whether the campaign goes on and adds the next Fireworks: the rest
    of its iteration (appended to its workflow) or the next iteration (a workflow of its own).

    Its Firework carries ``_add_launchpad_and_fw_id``, so a rerun (``lpad rerun_fws``) can see
    what its first run added: FireWorks reruns appended Fireworks as its descendants, and the
    next iteration's workflow is run again; neither is added twice, and both are defused when
    the rerun decides to stop.

    Required params:
        sections (dict): the campaign's settings sections (as `campaign_sections` made them):
            what the next Fireworks are built from.
        iteration (int): the campaign iteration.
    """

    required_params = ["sections", "iteration"]

    @property
    def campaign(self) -> Campaign:
        """The campaign, on the database of the LaunchPad that runs this task, its ``>>key<<``
        values (in any section) filled from the worker's env."""
        return Campaign(self["sections"], db=self.db, env=self.env)

    def _children(self) -> list[int]:
        lp = getattr(self, "launchpad", None)  # None when run outside a LaunchPad
        return lp.get_wf_by_fw_id_lzyfw(self.fw_id).links[self.fw_id] if lp else []

    def _grow(self, stop_reason: str | None, addition) -> FWAction:
        """Stop (`stop_reason`) or go on with `addition()`; the decision goes into the record
        (None: goes on), replacing that of an earlier run."""
        children = self._children()
        record = self.campaign.record(self["iteration"], stop_reason=stop_reason)
        if stop_reason:
            return FWAction(stored_data=record, defuse_children=bool(children))
        return FWAction(stored_data=record, additions=[] if children else [addition()])

    def _next_iteration(self, stop_reason: str | None) -> FWAction:
        """Stop (`stop_reason`), or add the next iteration as a workflow of its own. A rerun
        that finds the next iteration's workflow (added by its first run) runs it again, or
        defuses it when it now stops. The decision goes into the record (None: goes on)."""
        c, k = self.campaign, self["iteration"]
        record = c.record(k, stop_reason=stop_reason)
        lp = getattr(self, "launchpad", None)
        if lp is None:  # run outside a LaunchPad: nothing to add the workflow to
            return FWAction(stored_data=record)
        # what a first run appended to this workflow (a select that labelled then) is stale
        action = FWAction(stored_data=record, defuse_children=bool(self._children()))
        found = lp.workflows.find_one(
            {f"metadata.{key}": value for key, value in _metadata(c, k + 1).items()},
            {"nodes": 1, "links": 1},
        )
        if found is None:
            if not stop_reason:
                lp.add_wf(exploration_workflow(c, k + 1))
            return action
        children = {child for kids in found["links"].values() for child in kids}
        for fw_id in sorted(set(found["nodes"]) - children):  # the workflow's roots
            state = lp.fireworks.find_one({"fw_id": fw_id}, {"state": 1})["state"]
            if stop_reason:
                lp.defuse_fw(fw_id)
            elif state == "DEFUSED":
                lp.reignite_fw(fw_id)
            else:
                lp.rerun_fw(fw_id)
        return action


@explicit_serialize
class SelectTask(_GrowingTask):
    """Trust-level selection; appends labelling -> dataset -> training -> validation, or stops
    the campaign when too few structures were selected (with phases: moves to the next phase,
    or stops after the last)."""

    def run_stage(self, fw_spec):
        c, k = self.campaign, self["iteration"]
        record = stages.select_stage(c, k)
        n = record["n_selected"]
        stop, label = selection_decision(c, k, record)
        if label:
            return self._grow(stop, lambda: labelling_workflow(c, k, n))
        # a stage converged with too little to label: the next iteration, in the next stage
        return self._next_iteration(stop)


@explicit_serialize
class ValidateTask(_GrowingTask):
    """Validation; appends the next iteration unless a stopping rule holds."""

    def run_stage(self, fw_spec):
        c, k = self.campaign, self["iteration"]
        record = stages.validate_stage(c, k, fw_spec.get("_fw_env"))
        reason = iteration_stop(c, k, record)
        return self._next_iteration(reason)
