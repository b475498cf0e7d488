"""FireTasks: thin FireWorks wrappers over the campaign stages of `nequix_fw.campaign`.

Each task gets the campaign's settings sections and its iteration; its summary goes to the
launch's ``stored_data`` (and to ``campaign.json``). `SelectTask` and `ValidateTask` make the
workflow dynamic: they append the rest of the iteration, or the next one, as FWAction
additions, and append nothing when the campaign stops.
"""

from __future__ import annotations

from fireworks import FiretaskBase, FWAction, explicit_serialize

from nequix_fw import campaign as stages


class _StageTask(FiretaskBase):
    """Runs `stage(campaign, iteration)` and stores its summary in the launch."""

    required_params = ["sections", "iteration"]
    stage = None  # a function of nequix_fw.campaign (set by each task)

    @property
    def campaign(self) -> stages.Campaign:
        return stages.Campaign(self["sections"])

    def run_task(self, fw_spec):
        return FWAction(stored_data=self.stage(self.campaign, self["iteration"]))


@explicit_serialize
class ExploreTask(_StageTask):
    """Ensemble-driven MD, distortions and random packing from the initial structures."""

    stage = staticmethod(stages.explore_stage)


@explicit_serialize
class EvaluateTask(_StageTask):
    """The previous ensemble on the candidates (run-ensemble)."""

    stage = staticmethod(stages.evaluate_stage)


@explicit_serialize
class SelectTask(_StageTask):
    """Trust-level selection; appends labelling -> dataset -> training -> validation, or stops
    the campaign when too few structures were selected."""

    def run_task(self, fw_spec):
        from nequix_fw.workflows import labelling_workflow

        c, k = self.campaign, self["iteration"]
        record = stages.select_stage(c, k)
        reason = stages.selection_stop(c, k, record)
        if reason:
            return FWAction(stored_data=c.record(k, stop_reason=reason))
        return FWAction(stored_data=record, additions=[labelling_workflow(c.sections, k)])


@explicit_serialize
class LabelTask(_StageTask):
    """Reference labels; ``>>key<<`` settings come from the worker's env (my_fworker.yaml)."""

    def run_task(self, fw_spec):
        env = fw_spec.get("_fw_env")
        return FWAction(stored_data=stages.label_stage(self.campaign, self["iteration"], env))


@explicit_serialize
class UpdateDatasetTask(_StageTask):
    """New labels into the training set (directory or store), idempotently."""

    stage = staticmethod(stages.dataset_stage)


@explicit_serialize
class TrainEnsembleTask(_StageTask):
    """The iteration's ensemble (fine-tune or scratch at 0, warm start after)."""

    stage = staticmethod(stages.train_stage)


@explicit_serialize
class ValidateTask(_StageTask):
    """Validation; appends the next iteration unless a stopping rule holds."""

    def run_task(self, fw_spec):
        from nequix_fw.workflows import exploration_workflow

        c, k = self.campaign, self["iteration"]
        record = stages.validate_stage(c, k)
        reason = stages.iteration_stop(c, k, record)
        if reason:
            return FWAction(stored_data=c.record(k, stop_reason=reason))
        return FWAction(stored_data=record, additions=[exploration_workflow(c.sections, k + 1)])
