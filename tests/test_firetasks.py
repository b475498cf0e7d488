"""The FireTasks (`nequix_fw.firetasks`): named inputs resolved when the workflow is built, and
``>>key<<`` placeholders in any parameter filled from the worker's env."""

import ase.io
import pytest
import yaml
from ase.calculators.emt import EMT
from fireworks import Workflow
from helpers import make_cells, preset_inputs

from nequix_fw.campaign import Campaign
from nequix_fw.dataset import read_labelled
from nequix_fw.errors import SettingsError
from nequix_fw.firetasks import LabelTask, UpdateDatasetTask
from nequix_fw.workflows import campaign_sections, exploration_workflow, labelling_workflow


def test_firetasks_name_their_inputs_resolved_at_build(tmp_path, monkeypatch):
    """Each stage task carries its own section with its iteration's values (schedule applied,
    seeds of the iteration) and its paths; only the growing tasks carry the campaign."""
    monkeypatch.chdir(tmp_path)
    preset_inputs(tmp_path, "Cu")
    cfg = {
        "campaign": {
            "name": "t",
            "directory": "run",
            "initial_structures": "initial_structures",
            "schedule": {
                2: {"explore": {"temperatures_K": [900]}, "train_ensemble": {"epochs": 7}}
            },
        },
        "explore": {"temperatures_K": [300], "seeds": [0, 1]},
        "train_ensemble": {"epochs": 3, "n_models": 2},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    c = Campaign(campaign_sections("c.yaml"))
    run = tmp_path / "run"
    fws = {fw.name: fw for k in (1, 2) for fw in exploration_workflow(c, k).fws}
    fws |= {fw.name: fw for k in (0, 2) for fw in labelling_workflow(c, k, 3).fws}
    explore = fws["t explore 2"].tasks[0]
    assert explore["systems"] == [
        {
            "name": None,
            "output": str(run / "iter_002" / "explore"),
            "initial_structures": str(tmp_path / "initial_structures"),
            "explore": {"temperatures_K": [900], "seeds": [2000, 2001]},
        }
    ]
    assert fws["t explore 1"].tasks[0]["systems"][0]["explore"]["seeds"] == [1000, 1001]
    assert explore["models_dir"] == str(run / "iter_001" / "train_ensemble")
    (evaluate,) = fws["t run_ensemble 2"].tasks
    explored = run / "iter_002" / "explore" / "candidates.extxyz"
    results = run / "iter_002" / "run_ensemble" / "ensemble_results.json"
    assert evaluate["systems"] == [
        {"name": None, "fixed": [], "explored": str(explored), "output": str(results)}
    ]
    train0, train2 = fws["t train_ensemble 0"].tasks[0], fws["t train_ensemble 2"].tasks[0]
    assert train0["train_ensemble"] == {"epochs": 3, "n_models": 2} and "warm_start" not in train0
    assert train2["train_ensemble"] == {"epochs": 7, "n_models": 2}
    assert train2["warm_start"] == str(run / "iter_001" / "train_ensemble")
    assert (
        train2["output"] == str(run / "iter_002" / "train_ensemble") and train2["dataset"] == "db:t"
    )
    assert fws["t label 2"].tasks[0]["structures"] == str(run / "iter_002" / "select")
    assert fws["t update_dataset 2"].tasks[0]["max_failed_fraction"] == 0.5
    growing = [t for fw in fws.values() for t in fw.tasks if "sections" in t]
    names = sorted(type(t).__name__ for t in growing)
    assert names == ["SelectTask", "SelectTask", "ValidateTask", "ValidateTask"]
    for fw in fws.values():  # what `lpad add` stores, read back
        for task in Workflow.from_dict(Workflow([fw]).to_dict()).fws[0].tasks:
            named = {*task.required_params, *(task.optional_params or [])}
            assert set(task.required_params) <= set(task)
            assert set(task) - {"_fw_name"} <= named


def test_stage_tasks_fill_placeholders_in_any_parameter(tmp_path, monkeypatch):
    """A label and a dataset task run as a worker would (its env in fw_spec): ``>>key<<`` in a
    section value and in a path parameter come from the env; the stages report to
    campaign.json."""
    ase.io.write(tmp_path / "s.extxyz", make_cells(3, seed=2))
    log = {"iteration": 0, "campaign_dir": str(tmp_path / "run"), "campaign_name": "t"}
    label = LabelTask(
        **log,
        structures=str(tmp_path / "s.extxyz"),
        output=">>scratch<<",
        label={"calculator": ">>calc<<"},
    )
    env = {"_fw_env": {"calc": "emt", "scratch": str(tmp_path / "labels"), "ds": "ds"}}
    (tmp_path / "launch").mkdir()
    monkeypatch.chdir(tmp_path / "launch")
    summary = label.run_task(env).stored_data
    assert summary["n_success"] == 3 and (tmp_path / "labels" / "summary.json").is_file()
    add = UpdateDatasetTask(**log, labels=str(tmp_path / "labels"), dataset=str(tmp_path / "ds"))
    record = add.run_task(env).stored_data
    assert record["n_added"] == 3 and record["dataset_size"] == 3
    saved = yaml.safe_load((tmp_path / "run" / "campaign.json").read_text())
    assert saved["iterations"][0]["n_labelled"] == 3
    for x in read_labelled([tmp_path / "ds"]):  # labelled by EMT, as the env said
        emt = x.frame.atoms.copy()
        emt.calc = EMT()
        assert x.energy == pytest.approx(emt.get_potential_energy(), abs=1e-6)
    with pytest.raises(
        SettingsError,
        match="output is '>>scratch<<', a FireWorks worker "
        "placeholder, but the worker env has no 'scratch'",
    ):
        label.run_task({"_fw_env": {"calc": "emt"}})
    with pytest.raises(SettingsError, match="label.calculator is '>>calc<<'"):
        label.run_task({"_fw_env": {"scratch": str(tmp_path / "labels")}})
