"""The preset campaigns of `workflows/`: each builds its workflow (paths made absolute,
placeholders kept for the worker, schedule and resources in place); the EMT one also runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from conftest import emt_labelled, make_cells
from fireworks import Workflow

from nequix_fw.campaign import Campaign
from nequix_fw.dataset import read_labelled
from nequix_fw.errors import SettingsError
from nequix_fw.settings import (
    ExplorationSettings,
    LabellingSettings,
    SelectionSettings,
    ValidationSettings,
)
from nequix_fw.workflows import campaign_sections, campaign_workflow

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "workflows").glob("*.yaml"))
BIN = Path(sys.executable).parent


def _inputs(d: Path, element: str) -> None:
    """initial_structures/, candidates/ and validation_set/ for a preset run in `d`."""
    for sub in ("initial_structures", "candidates", "validation_set"):
        (d / sub).mkdir()
    if element == "Si":
        cells = [bulk("Si", "diamond", a=5.43, cubic=True) for _ in range(3)]
        for k, a in enumerate(cells):
            a.rattle(0.05, seed=k)
        ase.io.write(d / "initial_structures" / "si.extxyz", cells)
        ase.io.write(d / "validation_set" / "si.extxyz", emt_labelled(2, seed=1))  # any labels
    else:
        ase.io.write(d / "initial_structures" / "cells.extxyz", make_cells(5, seed=3))
        ase.io.write(d / "candidates" / "pool.extxyz", make_cells(4, seed=5))
        ase.io.write(d / "validation_set" / "test.extxyz", emt_labelled(4, seed=9))


def test_the_presets_are_there():
    assert [p.name for p in PRESETS] == ["cp2k_si.yaml", "emt_cu_au.yaml", "finetune_mp1.yaml",
                                         "npt_hot_schedule.yaml", "vasp_mpstatic.yaml"]  # fmt: skip


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_its_workflow(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(preset, tmp_path / preset.name)
    _inputs(tmp_path, "Si" if "cp2k" in preset.name else "Cu")
    sections = campaign_sections(preset.name, tmp_path / "my_launchpad.yaml")
    wf = campaign_workflow(sections)
    c = Campaign(sections)
    n_initial = len(list(ase.io.iread(next((tmp_path / "initial_structures").iterdir()))))
    size = c.settings.label_group_size
    groups = 1 if size is None or n_initial <= size else -(-n_initial // size)
    names = sorted(fw.name for fw in wf.fws)
    label = [f"{c.settings.name} label 0"] if groups == 1 else [
        f"{c.settings.name} label 0.{g}" for g in range(groups)]  # fmt: skip
    assert names == sorted([*label, *(f"{c.settings.name} {s} 0"
                                      for s in ("update_dataset", "train_ensemble",
                                                "validate"))])  # fmt: skip
    # every path absolute, worker placeholders kept for the worker's env
    assert Path(c.settings.initial_structures).is_absolute()
    assert all(Path(p).is_absolute() for p in c.settings.testset)
    labelling = c.section(LabellingSettings, 0)
    for fw in wf.fws:
        assert fw.spec["_add_launchpad_and_fw_id"] is True
    if preset.stem == "vasp_mpstatic":
        # kept for the worker's env (filled when a task runs)
        raw = sections["labelling"]
        assert raw["vasp_cmd"] == ">>vasp_cmd<<" and raw["vasp_psp_dir"] == ">>vasp_psp_dir<<"
        filled = Campaign(sections, env={"vasp_cmd": "srun vasp_std", "vasp_psp_dir": "/psp"})
        assert filled.section(LabellingSettings, 0).vasp_cmd == "srun vasp_std"
        specs = {fw.name: fw.spec for fw in wf.fws}
        assert specs["vasp_mpstatic train_ensemble 0"]["_category"] == "gpu"
        assert specs["vasp_mpstatic label 0"]["_queueadapter"]["ntasks"] == 64
    if preset.stem == "finetune_mp1":
        assert c.settings.finetune_from == "nequix-mp-1"
        s1, s2 = c.section(SelectionSettings, 1), c.section(SelectionSettings, 2)
        assert (s1.lo, s2.lo, s2.target_force_error) == (0.05, "auto", 0.1)
    if preset.stem == "npt_hot_schedule":
        temps = [c.section(ExplorationSettings, k).temperatures_K for k in (1, 3, 5)]
        assert temps == [[300.0, 600.0], [900.0, 1200.0], [1200.0, 1500.0]]
        assert c.section(ExplorationSettings, 5).pressures_GPa == [0.0, 5.0]
    if preset.stem == "cp2k_si":
        # the default input (k-points), checked against an E-V set CP2K labels once
        assert labelling.backend == "cp2k" and labelling.cp2k_input_set is None
        assert labelling.cp2k_template is None and labelling.cp2k_kpoint_spacing == 0.5
        assert c.section(ValidationSettings, 0).reference == "labelling"


def test_emt_preset_runs(tmp_path, launchpad_file):
    """The EMT preset through FireWorks, shortened to one iteration of small training."""
    _inputs(tmp_path, "Cu")
    cfg = yaml.safe_load((ROOT / "workflows" / "emt_cu_au.yaml").read_text())
    cfg["campaign"].update(max_iterations=1, target_force_rmse=None)
    cfg["training"].update(
        n_models=2,
        epochs=3,
        architecture={
            "hidden_irreps": "8x0e + 4x1o",
            "n_layers": 1,
            "lmax": 1,
            "radial_mlp_size": 8,
        },
    )
    cfg["exploration"].update(steps=0, n_distortions=2)  # distortions only: quick
    cfg["selection"].update(lo=0.0, hi=None)  # 3-epoch models: every candidate is uncertain
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    for cmd in ([BIN / "nequix-fw", "campaign", "--config", "campaign.yaml", "--launchpad",
                 launchpad_file], [BIN / "rlaunch", "-l", launchpad_file, "rapidfire"],
                [BIN / "nequix-fw", "campaign-status", "campaign"]):  # fmt: skip
        p = subprocess.run([str(x) for x in cmd], cwd=tmp_path, env=env, capture_output=True,
                           text=True)  # fmt: skip
        assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-3000:])
    assert "max_iterations (1) reached" in p.stdout
    its = yaml.safe_load((tmp_path / "campaign" / "campaign.json").read_text())["iterations"]
    assert its[0]["dataset_size"] == 5 and its[1]["n_selected"] > 0
    assert its[1]["dataset_size"] == 5 + its[1]["n_labelled"]


def test_powerups_change_the_fireworks_now_and_those_appended_later(tmp_path, monkeypatch):
    """add_priority / set_category / set_queueadapter / set_fworker change the matching
    Fireworks' specs and the campaign's resources in every task, so that the iterations the
    workflow appends later carry them too; use_stand_in_labels makes a VASP campaign label
    with EMT (its schedule cannot switch back)."""

    from nequix_fw.labelling import make_backend
    from nequix_fw.powerups import (
        add_priority,
        set_category,
        set_fworker,
        set_queueadapter,
        use_stand_in_labels,
    )
    from nequix_fw.workflows import exploration_workflow, labelling_workflow

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "workflows" / "vasp_mpstatic.yaml", "c.yaml")
    _inputs(tmp_path, "Cu")
    wf = campaign_workflow(campaign_sections("c.yaml", tmp_path / "my_launchpad.yaml"))
    wf = add_priority(wf, 7)
    wf = set_category(wf, "fast", stages=["train_ensemble"])
    wf = set_queueadapter(wf, {"walltime": "02:00:00", "nodes": 2}, stages=["label"])
    wf = set_fworker(wf, "big", stages=["validate"])
    wf = use_stand_in_labels(wf)
    wf = Workflow.from_dict(wf.to_dict())  # as lpad add stores it
    specs = {fw.name.split()[-2]: fw.spec for fw in wf.fws}
    assert {s["_priority"] for s in specs.values()} == {7}
    assert specs["train_ensemble"]["_category"] == "fast"
    assert "_category" not in specs["update_dataset"]
    assert specs["label"]["_queueadapter"]["walltime"] == "02:00:00"
    assert specs["label"]["_queueadapter"]["nodes"] == 2
    assert specs["label"]["_queueadapter"]["ntasks"] == 64  # the preset's other keys kept
    assert specs["validate"]["_fworker"] == "big"
    sections = next(t["sections"] for fw in wf.fws for t in fw.tasks if "sections" in t)
    assert all(t["labelling"]["backend"] == "ase" for fw in wf.fws for t in fw.tasks
               if "labelling" in t)  # the label tasks' own sections too  # fmt: skip
    c = Campaign(sections)
    later = [*exploration_workflow(c, 1).fws, *labelling_workflow(c, 1, 3).fws]
    later_specs = {fw.name.split()[-2]: fw.spec for fw in later}
    assert set(later_specs) == {"explore", "run_ensemble", "select", "label", "update_dataset",
                                "train_ensemble", "validate"}  # fmt: skip
    assert {s["_priority"] for s in later_specs.values()} == {7}
    assert later_specs["train_ensemble"]["_category"] == "fast"
    assert later_specs["label"]["_queueadapter"]["walltime"] == "02:00:00"
    backend = make_backend(c.section(LabellingSettings, 3))
    assert backend.name == "ase" and backend.calculator == "emt"
    with pytest.raises(ValueError, match="unknown stages \\['training'\\]"):
        add_priority(wf, 1, stages=["training"])


def test_placeholders_in_any_section_come_from_the_worker_env(tmp_path, monkeypatch):
    """`>>key<<` in any section (a typed field too, a stage's or a system's settings): the
    workflow builds with it left for the worker; the worker's env fills it; a worker without
    the key gets one error naming the setting and the key."""
    from nequix_fw.settings import TrainingSettings

    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path, "Cu")
    cfg = {"campaign": {"directory": "run", "initial_structures": "initial_structures",
                        "stages": [{"iterations": 1, "settings": {
                            "exploration": {"steps": ">>md_steps<<"}}}]},
           "training": {"n_models": ">>n_members<<", "epochs": 2}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    sections = campaign_sections("c.yaml")
    campaign_workflow(sections)  # builds: the placeholders wait for the worker
    assert sections["training"]["n_models"] == ">>n_members<<"
    c = Campaign(sections, env={"n_members": 3, "md_steps": 40})
    assert c.section(TrainingSettings, 0).n_models == 3
    assert c.section(ExplorationSettings, 1).steps == 40  # the stage's value, filled
    with pytest.raises(SettingsError, match="training.n_models is '>>n_members<<', a FireWorks "
                       "worker placeholder, but the worker env has no 'n_members'"):  # fmt: skip
        Campaign(sections, env={}).section(TrainingSettings, 0)


def test_firetasks_name_their_inputs_resolved_at_build(tmp_path, monkeypatch):
    """Each stage task carries its own section with its iteration's values (schedule applied,
    seeds of the iteration) and its paths; only the growing tasks carry the campaign."""
    from nequix_fw.workflows import exploration_workflow, labelling_workflow

    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path, "Cu")
    cfg = {"campaign": {"name": "t", "directory": "run", "initial_structures": "initial_structures",
                        "schedule": {2: {"exploration": {"temperatures_K": [900]},
                                         "training": {"epochs": 7}}}},
           "exploration": {"temperatures_K": [300], "seeds": [0, 1]},
           "training": {"epochs": 3, "n_models": 2}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    c = Campaign(campaign_sections("c.yaml"))
    run = tmp_path / "run"
    fws = {fw.name: fw for k in (1, 2) for fw in exploration_workflow(c, k).fws}
    fws |= {fw.name: fw for k in (0, 2) for fw in labelling_workflow(c, k, 3).fws}
    explore = fws["t explore 2"].tasks[0]
    assert explore["systems"] == [{"name": None, "output": str(run / "iter_002" / "candidates"),
                                   "initial_structures": str(tmp_path / "initial_structures"),
                                   "exploration": {"temperatures_K": [900],
                                                   "seeds": [2000, 2001]}}]  # fmt: skip
    assert fws["t explore 1"].tasks[0]["systems"][0]["exploration"]["seeds"] == [1000, 1001]
    assert explore["models_dir"] == str(run / "iter_001" / "models")
    (evaluate,) = fws["t run_ensemble 2"].tasks
    explored = run / "iter_002" / "candidates" / "candidates.extxyz"
    results = run / "iter_002" / "ensemble_results.json"
    assert evaluate["systems"] == [{"name": None, "fixed": [], "explored": str(explored),
                                    "output": str(results)}]  # fmt: skip
    train0, train2 = fws["t train_ensemble 0"].tasks[0], fws["t train_ensemble 2"].tasks[0]
    assert train0["training"] == {"epochs": 3, "n_models": 2} and "warm_start" not in train0
    assert train2["training"] == {"epochs": 7, "n_models": 2}
    assert train2["warm_start"] == str(run / "iter_001" / "models")
    assert train2["output"] == str(run / "iter_002" / "models") and train2["dataset"] == "db:t"
    assert fws["t label 2"].tasks[0]["structures"] == str(run / "iter_002" / "selected")
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
    from nequix_fw.firetasks import LabelTask, UpdateDatasetTask

    ase.io.write(tmp_path / "s.extxyz", make_cells(3, seed=2))
    log = {"iteration": 0, "campaign_dir": str(tmp_path / "run"), "campaign_name": "t"}
    label = LabelTask(**log, structures=str(tmp_path / "s.extxyz"), output=">>scratch<<",
                      labelling={"calculator": ">>calc<<"})  # fmt: skip
    env = {"_fw_env": {"calc": "emt", "scratch": str(tmp_path / "labels"), "ds": "ds"}}
    (tmp_path / "launch").mkdir()
    monkeypatch.chdir(tmp_path / "launch")
    summary = label.run_task(env).stored_data
    assert summary["n_success"] == 3 and (tmp_path / "labels" / "summary.json").is_file()
    add = UpdateDatasetTask(**log, labels=str(tmp_path / "labels"),
                            dataset=str(tmp_path / "ds"))  # fmt: skip
    record = add.run_task(env).stored_data
    assert record["n_added"] == 3 and record["dataset_size"] == 3
    saved = yaml.safe_load((tmp_path / "run" / "campaign.json").read_text())
    assert saved["iterations"][0]["n_labelled"] == 3
    for x in read_labelled([tmp_path / "ds"]):  # labelled by EMT, as the env said
        emt = x.frame.atoms.copy()
        emt.calc = EMT()
        assert x.energy == pytest.approx(emt.get_potential_energy(), abs=1e-6)
    with pytest.raises(SettingsError, match="output is '>>scratch<<', a FireWorks worker "
                       "placeholder, but the worker env has no 'scratch'"):  # fmt: skip
        label.run_task({"_fw_env": {"calc": "emt"}})
    with pytest.raises(SettingsError, match="labelling.calculator is '>>calc<<'"):
        label.run_task({"_fw_env": {"scratch": str(tmp_path / "labels")}})
