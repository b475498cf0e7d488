"""FireTasks: thin FireWorks wrappers over the campaign stages of `nequix_fw.campaign`.

Each task gets the campaign's settings sections and its iteration; its summary goes to the
launch's ``stored_data`` (and to ``campaign.json``). The two tasks that grow the workflow
(`SelectTask`, `ValidateTask`) live with the workflow's builders in `nequix_fw.workflows`.
"""

from __future__ import annotations

import logging
import time

from fireworks import FiretaskBase, FWAction, explicit_serialize

from nequix_fw import LOG_FORMAT
from nequix_fw import campaign as stages

#: The log file of a stage, in its launch directory.
LAUNCH_LOG = "nequix_fw.log"


class StageTask(FiretaskBase):
    """Runs `stage(campaign, iteration)` and stores its summary in the launch."""

    required_params = ["sections", "iteration"]
    stage = None  # a function of nequix_fw.campaign (set by each task)

    @property
    def campaign(self) -> stages.Campaign:
        """The campaign, on the database of the LaunchPad that runs this task, its ``>>key<<``
        values (in any section, atomate's env_chk) filled from the worker's env."""
        lp = getattr(self, "launchpad", None)  # set by the Rocket (_add_launchpad_and_fw_id)
        return stages.Campaign(self["sections"], db=lp.db if lp is not None else None,
                               env=getattr(self, "env", None))  # fmt: skip

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
            action.stored_data = {**(action.stored_data or {}),
                                  "task_wall_s": time.perf_counter() - t0}  # fmt: skip
            return action
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            handler.close()

    def run_stage(self, fw_spec) -> FWAction:
        return FWAction(stored_data=self.stage(self.campaign, self["iteration"]))


@explicit_serialize
class ExploreTask(StageTask):
    """Ensemble-driven MD, distortions and random packing from the initial structures."""

    stage = staticmethod(stages.explore_stage)


@explicit_serialize
class EvaluateTask(StageTask):
    """The previous ensemble on the candidates (run-ensemble)."""

    stage = staticmethod(stages.evaluate_stage)


@explicit_serialize
class LabelTask(StageTask):
    """Reference labels (of one group, with ``group``); ``>>key<<`` settings come from the
    worker's env (my_fworker.yaml)."""

    optional_params = ["group"]

    def run_stage(self, fw_spec):
        env = fw_spec.get("_fw_env")
        summary = stages.label_stage(self.campaign, self["iteration"], env, self.get("group"))
        return FWAction(stored_data=summary)


@explicit_serialize
class UpdateDatasetTask(StageTask):
    """New labels into the training set (directory or store), idempotently; stops the
    iteration (defuses training and validation) when too many labels failed."""

    def run_stage(self, fw_spec):
        record = stages.dataset_stage(self.campaign, self["iteration"])
        return FWAction(stored_data=record, defuse_children=bool(record.get("stop_reason")))


@explicit_serialize
class TrainEnsembleTask(StageTask):
    """The iteration's ensemble (fine-tune or scratch at 0, warm start after)."""

    stage = staticmethod(stages.train_stage)
