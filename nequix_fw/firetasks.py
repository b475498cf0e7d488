"""FireTasks: thin FireWorks wrappers over the campaign stages of `nequix_fw.campaign`.

Each task gets the campaign's settings sections and its iteration; its summary goes to the
launch's ``stored_data`` (and to ``campaign.json``). `SelectTask` and `ValidateTask` make the
workflow dynamic: they append the rest of the iteration, or the next one, as FWAction
additions, and append nothing when the campaign stops (nor when a rerun finds what its first
run appended).
"""

from __future__ import annotations

import logging
import time

from fireworks import FiretaskBase, FWAction, explicit_serialize

from nequix_fw import LOG_FORMAT
from nequix_fw import campaign as stages

#: The log file of a stage, in its launch directory.
LAUNCH_LOG = "nequix_fw.log"


class _StageTask(FiretaskBase):
    """Runs `stage(campaign, iteration)` and stores its summary in the launch."""

    required_params = ["sections", "iteration"]
    stage = None  # a function of nequix_fw.campaign (set by each task)

    @property
    def campaign(self) -> stages.Campaign:
        """The campaign, on the database of the LaunchPad that runs this task."""
        lp = getattr(self, "launchpad", None)  # set by the Rocket (_add_launchpad_and_fw_id)
        return stages.Campaign(self["sections"], db=lp.db if lp is not None else None)

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
class ExploreTask(_StageTask):
    """Ensemble-driven MD, distortions and random packing from the initial structures."""

    stage = staticmethod(stages.explore_stage)


@explicit_serialize
class EvaluateTask(_StageTask):
    """The previous ensemble on the candidates (run-ensemble)."""

    stage = staticmethod(stages.evaluate_stage)


class _GrowingTask(_StageTask):
    """A stage that decides whether the campaign goes on and appends the next Fireworks.

    Its Firework carries ``_add_launchpad_and_fw_id``, so a rerun (``lpad rerun_fws``) can see
    the Fireworks its first run appended: FireWorks reruns those as its descendants, so they are
    not appended again, and they are defused when the rerun decides to stop.
    """

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


@explicit_serialize
class SelectTask(_GrowingTask):
    """Trust-level selection; appends labelling -> dataset -> training -> validation, or stops
    the campaign when too few structures were selected."""

    def run_stage(self, fw_spec):
        from nequix_fw.workflows import labelling_workflow

        c, k = self.campaign, self["iteration"]
        record = stages.select_stage(c, k)
        n = record["n_selected"]
        return self._grow(stages.selection_stop(c, k, record),
                          lambda: labelling_workflow(c.sections, k, n))  # fmt: skip


@explicit_serialize
class LabelTask(_StageTask):
    """Reference labels (of one group, with ``group``); ``>>key<<`` settings come from the
    worker's env (my_fworker.yaml)."""

    optional_params = ["group"]

    def run_stage(self, fw_spec):
        env = fw_spec.get("_fw_env")
        summary = stages.label_stage(self.campaign, self["iteration"], env, self.get("group"))
        return FWAction(stored_data=summary)


@explicit_serialize
class UpdateDatasetTask(_StageTask):
    """New labels into the training set (directory or store), idempotently; stops the
    iteration (defuses training and validation) when too many labels failed."""

    def run_stage(self, fw_spec):
        record = stages.dataset_stage(self.campaign, self["iteration"])
        return FWAction(stored_data=record, defuse_children=bool(record.get("stop_reason")))


@explicit_serialize
class TrainEnsembleTask(_StageTask):
    """The iteration's ensemble (fine-tune or scratch at 0, warm start after)."""

    stage = staticmethod(stages.train_stage)


@explicit_serialize
class ValidateTask(_GrowingTask):
    """Validation; appends the next iteration unless a stopping rule holds."""

    def run_stage(self, fw_spec):
        from nequix_fw.workflows import exploration_workflow

        c, k = self.campaign, self["iteration"]
        reason = stages.iteration_stop(c, k, stages.validate_stage(c, k))
        return self._grow(reason, lambda: exploration_workflow(c.sections, k + 1))
