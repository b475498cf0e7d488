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
from helpers import preset_inputs

from nequix_fw.campaign import Campaign
from nequix_fw.errors import SettingsError
from nequix_fw.settings import (
    ExplorationSettings,
    LabellingSettings,
    SelectionSettings,
    TrainingSettings,
    ValidationSettings,
)
from nequix_fw.workflows import campaign_sections, campaign_workflow

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "workflows").glob("*.yaml"))
BIN = Path(sys.executable).parent


def test_the_presets_are_there():
    assert [p.name for p in PRESETS] == [
        "cp2k_si.yaml",
        "cp2k_sic.yaml",
        "emt_cu_au.yaml",
        "finetune_mp1.yaml",
        "npt_hot_schedule.yaml",
        "vasp_mpstatic.yaml",
    ]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_its_workflow(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(preset, tmp_path / preset.name)
    element = {"cp2k_si": "Si", "cp2k_sic": "SiC"}.get(preset.stem, "Cu")
    preset_inputs(tmp_path, element)
    sections = campaign_sections(preset.name, tmp_path / "my_launchpad.yaml")
    wf = campaign_workflow(sections)
    c = Campaign(sections)
    n_initial = len(list(ase.io.iread(next((tmp_path / "initial_structures").iterdir()))))
    size = c.settings.label_group_size
    groups = 1 if size is None or n_initial <= size else -(-n_initial // size)
    names = sorted(fw.name for fw in wf.fws)
    label = (
        [f"{c.settings.name} label 0"]
        if groups == 1
        else [f"{c.settings.name} label 0.{g}" for g in range(groups)]
    )
    assert names == sorted(
        [
            *label,
            *(f"{c.settings.name} {s} 0" for s in ("update_dataset", "train_ensemble", "validate")),
        ]
    )
    # every path absolute, worker placeholders kept for the worker's env
    assert Path(c.settings.initial_structures).is_absolute()
    assert all(Path(p).is_absolute() for p in c.settings.testset)
    labelling = c.section(LabellingSettings, 0)
    for fw in wf.fws:
        assert fw.spec["_add_launchpad_and_fw_id"] is True
    if preset.stem == "vasp_mpstatic":
        # kept for the worker's env (filled when a task runs)
        raw = sections["label"]
        assert raw["vasp_cmd"] == ">>vasp_cmd<<" and raw["vasp_psp_dir"] == ">>vasp_psp_dir<<"
        filled = Campaign(sections, env={"vasp_cmd": "srun vasp_std", "vasp_psp_dir": "/psp"})
        assert filled.section(LabellingSettings, 0).vasp_cmd == "srun vasp_std"
        specs = {fw.name: fw.spec for fw in wf.fws}
        assert specs["vasp_mpstatic train_ensemble 0"]["_category"] == "gpu"
        assert specs["vasp_mpstatic label 0"]["_queueadapter"]["ntasks"] == 64
    if preset.stem == "finetune_mp1":
        assert c.settings.finetune_from == "nequix-mp-1"
        # the fine-tuning defaults, written into the section so that every iteration has them
        assert sections["train_ensemble"]["uncertainty"] == "llpr"
        train = c.section(TrainingSettings, 3)
        assert (train.uncertainty, train.n_models, train.epochs) == ("llpr", 1, 20)
        s1, s2 = c.section(SelectionSettings, 1), c.section(SelectionSettings, 2)
        assert (s1.lo, s2.lo, s2.target_force_error) == (0.05, "auto", 0.1)
    if preset.stem == "npt_hot_schedule":
        temps = [c.section(ExplorationSettings, k).temperatures_K for k in (1, 3, 5)]
        assert temps == [[300.0, 600.0], [900.0, 1200.0], [1200.0, 1500.0]]
        assert c.section(ExplorationSettings, 5).pressures_GPa == [0.0, 5.0]
    if preset.stem.startswith("cp2k_"):
        # the default input (k-points), checked against property sets CP2K labels once
        assert labelling.backend == "cp2k" and labelling.cp2k_input_set is None
        assert labelling.cp2k_template is None and labelling.cp2k_kpoint_spacing == 0.5
        validation = c.section(ValidationSettings, 0)
        assert validation.reference == "label" and validation.elastic and validation.phonons
        ideal = tmp_path / f"{element.lower()}8_ideal.vasp"
        assert validation.structure == ideal  # absolute, the ideal cell
        assert set(c.settings.property_tolerances) == {
            "v0_percent",
            "bulk_modulus_percent",
            "elastic_percent",
            "phonon_percent",
        }


def test_emt_preset_runs(tmp_path, launchpad_file):
    """The EMT preset through FireWorks, shortened to one iteration of small training."""
    preset_inputs(tmp_path, "Cu")
    cfg = yaml.safe_load((ROOT / "workflows" / "emt_cu_au.yaml").read_text())
    cfg["campaign"].update(max_iterations=1, target_force_rmse=None)
    cfg["train_ensemble"].update(
        n_models=2,
        epochs=3,
        architecture={
            "hidden_irreps": "8x0e + 4x1o",
            "n_layers": 1,
            "lmax": 1,
            "radial_mlp_size": 8,
        },
    )
    cfg["explore"].update(steps=0, n_distortions=2)  # distortions only: quick
    cfg["select"].update(lo=0.0, hi=None)  # 3-epoch models: every candidate is uncertain
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    for cmd in (
        [BIN / "nequix-fw", "campaign", "--config", "campaign.yaml", "--launchpad", launchpad_file],
        [BIN / "rlaunch", "-l", launchpad_file, "rapidfire"],
        [BIN / "nequix-fw", "campaign-status", "campaign"],
    ):
        p = subprocess.run(
            [str(x) for x in cmd], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-3000:])
    assert "max_iterations (1) reached" in p.stdout
    its = yaml.safe_load((tmp_path / "campaign" / "campaign.json").read_text())["iterations"]
    assert its[0]["dataset_size"] == 5 and its[1]["n_selected"] > 0
    assert its[1]["dataset_size"] == 5 + its[1]["n_labelled"]


def test_placeholders_in_any_section_come_from_the_worker_env(tmp_path, monkeypatch):
    """`>>key<<` in any section (a typed field too, a phase's or a system's settings): the
    workflow builds with it left for the worker; the worker's env fills it; a worker without
    the key gets one error naming the setting and the key."""
    from nequix_fw.settings import TrainingSettings

    monkeypatch.chdir(tmp_path)
    preset_inputs(tmp_path, "Cu")
    cfg = {
        "campaign": {
            "directory": "run",
            "initial_structures": "initial_structures",
            "phases": [{"iterations": 1, "settings": {"explore": {"steps": ">>md_steps<<"}}}],
        },
        "train_ensemble": {"n_models": ">>n_members<<", "epochs": 2},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    sections = campaign_sections("c.yaml")
    campaign_workflow(sections)  # builds: the placeholders wait for the worker
    assert sections["train_ensemble"]["n_models"] == ">>n_members<<"
    c = Campaign(sections, env={"n_members": 3, "md_steps": 40})
    assert c.section(TrainingSettings, 0).n_models == 3
    assert c.section(ExplorationSettings, 1).steps == 40  # the phase's value, filled
    with pytest.raises(
        SettingsError,
        match="train_ensemble.n_models is '>>n_members<<', a "
        "FireWorks worker placeholder, but the worker env has no "
        "'n_members'",
    ):
        Campaign(sections, env={}).section(TrainingSettings, 0)


def test_stress_checks_default_to_a_stress_weight_and_need_stress_labels(
    tmp_path, monkeypatch, capsys
):
    """property_tolerances on V0, B0 or the elastic constants: train_ensemble.stress_weight
    defaults to auto (printed by `campaign --write`, written into every training), unless the
    user sets it; B0 and elastic tolerances with a label method that gives no stresses are
    refused in one line."""
    from nequix_fw.cli import main

    monkeypatch.chdir(tmp_path)
    preset_inputs(tmp_path, "Cu")
    settings = yaml.safe_load((ROOT / "workflows" / "emt_cu_au.yaml").read_text())
    settings["campaign"]["property_tolerances"] = {"v0_percent": 1, "bulk_modulus_percent": 5}
    settings["validate"]["reference"] = "emt"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    write = ["campaign", "--config", "c.yaml", "--write", "wf.yaml"]
    assert main(write) == 0
    out = capsys.readouterr().out
    assert "property checks defaults: train_ensemble.stress_weight = auto (auto: 30000 " in out
    wf = yaml.safe_load((tmp_path / "wf.yaml").read_text())
    train = next(fw for fw in wf["fws"] if fw["name"].endswith("train_ensemble 0"))
    assert train["spec"]["_tasks"][0]["train_ensemble"]["stress_weight"] == "auto"
    settings["train_ensemble"]["stress_weight"] = 100.0  # the user's value stays
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    assert main(write) == 0
    assert "defaults" not in capsys.readouterr().out
    wf = yaml.safe_load((tmp_path / "wf.yaml").read_text())
    train = next(fw for fw in wf["fws"] if fw["name"].endswith("train_ensemble 0"))
    assert train["spec"]["_tasks"][0]["train_ensemble"]["stress_weight"] == 100.0
    settings["label"] = {"calculator": "tip3p"}  # ASE's TIP3P computes no stress
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    assert main(write) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and (
            "campaign.property_tolerances bulk_modulus_percent judge derivatives of the stress, "
            "but label.backend ase (calculator tip3p) gives no stress labels"
        )
        in err
    )
    settings["campaign"]["property_tolerances"] = {"v0_percent": 1}  # V0 needs no stress
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    assert main(write) == 0


def test_campaign_write_prints_the_fine_tuning_defaults_it_chose(tmp_path, monkeypatch, capsys):
    from nequix_fw.cli import main

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "workflows" / "finetune_mp1.yaml", tmp_path / "c.yaml")
    preset_inputs(tmp_path, "Cu")
    assert main(["campaign", "--config", "c.yaml", "--write", "wf.yaml"]) == 0
    out = capsys.readouterr().out
    assert (
        "fine-tuning defaults: train_ensemble.uncertainty = llpr, train_ensemble.n_models = 1, "
        "train_ensemble.learning_rate = 0.001, train_ensemble.stress_weight = auto"
    ) in out
    wf = yaml.safe_load((tmp_path / "wf.yaml").read_text())
    train = next(fw for fw in wf["fws"] if fw["name"].endswith("train_ensemble 0"))
    params = train["spec"]["_tasks"][0]["train_ensemble"]
    assert (params["uncertainty"], params["n_models"]) == ("llpr", 1)
