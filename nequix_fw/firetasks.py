"""FireTasks: thin FireWorks wrappers over the campaign stages of `nequix_fw.campaign`.

As in atomate, each task names its inputs as parameters: its own settings section (the values
of its iteration, schedule and stage applied when the workflow was built) and the paths it reads
and writes, so that one value is changed with ``lpad update_fws -u
'{"_tasks.0.train_ensemble.epochs": 50}'``. A ``>>key<<`` value in any parameter, or in any
value of a section, is filled from the worker's env (my_fworker.yaml; atomate's env_chk). Every
task reports its summary to the campaign's log (``campaign_dir``/campaign.json and the store of
``campaign_name``) and to the launch's ``stored_data``. The two tasks that grow the workflow
(`SelectTask`, `ValidateTask`) see the whole campaign; they live with the workflow's builders in
`nequix_fw.workflows`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fireworks import FiretaskBase, FWAction, explicit_serialize

from nequix_fw import LOG_FORMAT
from nequix_fw.campaign import CampaignLog, member_files, stages
from nequix_fw.settings import (
    EnsembleSettings,
    ExplorationSettings,
    LabellingSettings,
    TrainingSettings,
    env_chk,
    section_settings,
)

#: The log file of a stage, in its launch directory.
LAUNCH_LOG = "nequix_fw.log"

#: The parameters every stage task has: where it reports.
LOG_PARAMS = ["iteration", "campaign_dir", "campaign_name"]


class StageTask(FiretaskBase):
    """A campaign stage, timed and logged; subclasses define `run_stage`."""

    env: dict = {}

    def run_task(self, fw_spec):
        """The stage, timed: ``task_wall_s`` in the launch's stored data (what FireWorks and
        the database add around it is the rest of the launch's time). What the stage logs at
        INFO and above goes to ``nequix_fw.log`` in the launch directory."""
        handler = logging.FileHandler(LAUNCH_LOG)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger = logging.getLogger("nequix_fw")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(min(level or logging.INFO, logging.INFO))
        self.env = dict(fw_spec.get("_fw_env") or {})
        try:
            t0 = time.perf_counter()
            action = self.run_stage(fw_spec)
            action.stored_data = {
                **(action.stored_data or {}),
                "task_wall_s": time.perf_counter() - t0,
            }
            return action
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            handler.close()

    def run_stage(self, fw_spec) -> FWAction:
        raise NotImplementedError

    @property
    def db(self):
        """The database of the LaunchPad running this task (None outside one)."""
        lp = getattr(self, "launchpad", None)  # set by the Rocket (_add_launchpad_and_fw_id)
        return lp.db if lp is not None else None

    def value(self, name: str, default=None):
        """Parameter `name`, a ``>>key<<`` placeholder filled from the worker's env."""
        return env_chk(self.get(name, default), self.env, name)

    def path(self, name: str) -> Path | None:
        value = self.value(name)
        return None if value is None else Path(value)

    def section(self, cls, name: str):
        """The settings section in parameter `name`, its placeholders filled."""
        return section_settings(cls, self.get(name) or {}, self.env, name)

    @property
    def log(self) -> CampaignLog:
        """Where the stage reports: campaign.json in ``campaign_dir`` and the store."""
        return CampaignLog(
            self["campaign_dir"], self["campaign_name"], self.db, self.value("launchpad")
        )


class _EnsembleTask(StageTask):
    """A stage of the ensemble in ``models_dir`` on each of ``systems``."""

    required_params = [*LOG_PARAMS, "models_dir", "systems"]
    optional_params = ["ensemble", "launchpad"]
    stage = None  # a function of nequix_fw.campaign (set by each task)

    def system(self, values: dict):
        """One entry of ``systems`` as the stage takes it."""
        raise NotImplementedError

    def run_stage(self, fw_spec):
        models, options = self.models()
        record = self.stage(
            self.log,
            self["iteration"],
            models,
            self.section(EnsembleSettings, "ensemble"),
            [self.system(values) for values in self["systems"]],
            **options,
        )
        return FWAction(stored_data=record)

    def models(self) -> tuple[list[str], dict]:
        """The models of the stage (``models_dir``'s members), and the stage function's
        further keywords."""
        return member_files(self.path("models_dir")), {}


@explicit_serialize
class ExploreTask(_EnsembleTask):
    """Ensemble-driven MD, distortions and random packings from each system's starts.

    Required params:
        iteration (int): the campaign iteration (>= 1).
        campaign_dir (str), campaign_name (str): where the stage reports.
        models_dir (str): the ensemble that drives the dynamics (member_*.nqx; iteration k-1's).
        systems (list[dict]): per system: name (str or None), initial_structures (str),
            explore (dict, an ExplorationSettings section; seeds already of this
            iteration), output (str: candidates.extxyz and manifest.json go there).
    Optional params:
        ensemble (dict): EnsembleSettings section of the engine.
        launchpad (str): LaunchPad file of the store, when not run by a LaunchPad.
        foundation (str): the foundation model a fine-tuned campaign starts from: when
            models_dir's ensemble failed the repulsive-wall check, the last ensemble that
            passed drives the dynamics, else this model (`campaign.stages.trusted_models`,
            decided from the campaign's records when the task runs).
    """

    optional_params = [*_EnsembleTask.optional_params, "foundation"]
    stage = staticmethod(stages.explore_stage)

    def models(self) -> tuple[list[str], dict]:
        trusted, why = stages.trusted_models(self.log, self["iteration"], self.get("foundation"))
        if trusted is None:
            return super().models()[0], {"explored_with": None}
        return trusted, {"explored_with": why}

    def system(self, values: dict) -> stages.SystemExploration:
        return stages.SystemExploration(
            values["name"],
            Path(env_chk(values["initial_structures"], self.env, "initial_structures")),
            section_settings(ExplorationSettings, values["explore"], self.env),
            Path(values["output"]),
        )


@explicit_serialize
class RunEnsembleTask(_EnsembleTask):
    """The ensemble on each system's candidates (run-ensemble): ensemble_results.json.

    Required params:
        iteration (int), campaign_dir (str), campaign_name (str): as ExploreTask.
        models_dir (str): the ensemble (iteration k-1's).
        systems (list[dict]): per system: name (str or None), explored (str or None: the
            explored candidates.extxyz, used if it was made), fixed (list[str]: candidates
            evaluated every iteration), output (str: the results JSON).
    Optional params:
        ensemble (dict): EnsembleSettings section. launchpad (str): as ExploreTask.
        properties (dict): property-driven exploration: tolerances (dict), n (int per missed
            check), structure (str or None: the checks' structure, else the first of testset),
            testset (list[str]), supercell (list[int]: the phonon check's), seed (int).
    """

    optional_params = [*_EnsembleTask.optional_params, "properties"]
    stage = staticmethod(stages.run_ensemble_stage)

    def models(self) -> tuple[list[str], dict]:
        return super().models()[0], {"properties": self.get("properties")}

    def system(self, values: dict) -> stages.SystemCandidates:
        explored = values["explored"]
        return stages.SystemCandidates(
            values["name"],
            None if explored is None else Path(explored),
            [Path(env_chk(p, self.env, "fixed")) for p in values["fixed"]],
            Path(values["output"]),
        )


@explicit_serialize
class LabelTask(StageTask):
    """Reference labels of the structures (of one group of them).

    Required params:
        iteration (int), campaign_dir (str), campaign_name (str): as ExploreTask.
        structures (str): what to label (file or directory).
        output (str): the labels directory (one subdirectory per structure, summary*.json).
        label (dict): LabellingSettings section; ``>>key<<`` values come from the worker's
            env (my_fworker.yaml), e.g. vasp_cmd.
    Optional params:
        group (list[int]): [index, size]: only that group of the structures (parallel jobs).
        launchpad (str): as ExploreTask.
    """

    required_params = [*LOG_PARAMS, "structures", "output", "label"]
    optional_params = ["group", "launchpad"]

    def run_stage(self, fw_spec):
        group = self.get("group")
        summary = stages.label_stage(
            self.log,
            self["iteration"],
            self.path("structures"),
            self.path("output"),
            self.section(LabellingSettings, "label"),
            self.env,
            None if group is None else tuple(group),
        )
        return FWAction(stored_data=summary)


@explicit_serialize
class UpdateDatasetTask(StageTask):
    """The iteration's labels (all groups) into the training set, idempotently; stops the
    iteration (defuses training and validation) when too many labels failed.

    Required params:
        iteration (int), campaign_dir (str), campaign_name (str): as ExploreTask.
        labels (str): the labels directory of the iteration.
        dataset (str): the training set: a directory or a store dataset db:NAME.
    Optional params:
        max_failed_fraction (float): label.max_failed_fraction (None: no limit).
        launchpad (str): as ExploreTask.
    """

    required_params = [*LOG_PARAMS, "labels", "dataset"]
    optional_params = ["max_failed_fraction", "launchpad"]

    def run_stage(self, fw_spec):
        record = stages.update_dataset_stage(
            self.log,
            self["iteration"],
            self.path("labels"),
            self.value("dataset"),
            self.value("max_failed_fraction"),
        )
        return FWAction(stored_data=record, defuse_children=bool(record.get("stop_reason")))


@explicit_serialize
class TrainEnsembleTask(StageTask):
    """The iteration's ensemble: fine-tuned or from scratch at iteration 0, each member
    warm-started from its predecessor after.

    Required params:
        iteration (int), campaign_dir (str), campaign_name (str): as ExploreTask.
        dataset (str): the training set (directory or db:NAME).
        output (str): the ensemble's directory (member_*.nqx).
        train_ensemble (dict): TrainingSettings section.
    Optional params:
        finetune_from (str | list): a model (path or pretrained name) to fine-tune, or several.
        warm_start (str): the previous ensemble's directory.
        launchpad (str): as ExploreTask.
    """

    required_params = [*LOG_PARAMS, "dataset", "output", "train_ensemble"]
    optional_params = ["finetune_from", "warm_start", "launchpad"]

    def run_stage(self, fw_spec):
        record = stages.train_ensemble_stage(
            self.log,
            self["iteration"],
            self.value("dataset"),
            self.path("output"),
            self.section(TrainingSettings, "train_ensemble"),
            self.value("finetune_from"),
            self.path("warm_start"),
        )
        return FWAction(stored_data=record)
