"""The campaign on a real (one-node) SLURM against the local MongoDB server: `qlaunch -r
rapidfire` puts each ready Firework into its own `sbatch` job with its stage's queue requests
(`campaign.resources`), several jobs run at once (labelling groups), and each job's `rlaunch`
runs its Firework."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import pytest
import yaml
from helpers import emt_labelled, make_cells

from nequix_fw.errors import SettingsError
from nequix_fw.settings import CampaignSettings, make_settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SETTINGS = """
campaign:
  name: q
  directory: run
  initial_structures: initial.extxyz
  candidate_pool: [pool.extxyz]
  testset: [testset.extxyz]
  max_iterations: 1
  explore: false
  label_group_size: 2
  resources:
    label: {queueadapter: {walltime: "00:10:00"}}
    train_ensemble: {queueadapter: {walltime: "00:20:00", cpus_per_task: 2}}
train_ensemble:
  n_models: 2
  epochs: 2
  batch_size: 4
  architecture: {hidden_irreps: "8x0e + 4x1o", n_layers: 1, lmax: 1, radial_mlp_size: 8}
label: {backend: ase, calculator: ">>reference_calculator<<", calculator_params: {delay_s: 4}}
select: {lo: 0.0, max_selected: 3}
"""


@pytest.fixture(scope="module")
def slurm():
    """A running SLURM (`make sysdeps` starts a one-node one as root)."""
    if not shutil.which("sinfo") or subprocess.run(["sinfo"], capture_output=True).returncode:
        pytest.skip("no running SLURM (as root, `make sysdeps` starts a local one)")


def _run(cmd: list, cwd: Path, env: dict) -> str:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-3000:])
    return p.stdout + p.stderr


def _queue_empty(timeout_s: float = 300) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"SLURM jobs still queued after {timeout_s} s")


QUERY = """
import json
from nequix_fw.store import COLLECTION, launchpad_db
db = launchpad_db("my_launchpad.yaml")
fws = {f["fw_id"]: (f["name"], f["state"]) for f in db.fireworks.find()}
launches = {}
for l in db.launches.find():
    times = {h["state"]: str(h["created_on"]) for h in l["state_history"]}  # ISO strings
    res = [h.get("reservation_id") for h in l["state_history"] if h["state"] == "RESERVED"]
    launches.setdefault(l["fw_id"], []).append({"job": res[0] if res else None, "dir":
        l["launch_dir"], "start": times.get("RUNNING"), "end": times.get("COMPLETED")})
print(json.dumps({"fireworks": fws, "launches": launches,
                  "workflow_state": [w["state"] for w in db.workflows.find()],
                  "dataset": sorted(d["info"]["iteration"] for d in db[COLLECTION].find())}))
"""


def test_campaign_through_qlaunch_rapidfire_on_slurm(slurm, tmp_path, launchpad_file):
    lp, fw = launchpad_file, tmp_path / "my_fworker.yaml"
    # EMT that takes 4 s a structure (jobs are submitted 1 s apart), so that the labelling
    # groups visibly run side by side
    fw.write_text(
        "name: slurm_worker\ncategory: ''\nquery: '{}'\n"
        "env:\n  reference_calculator: slow_emt:SlowEMT\n"
    )
    qadapter = yaml.safe_load((ROOT / "my_qadapter.yaml").read_text())
    qadapter.update(  # the node has 2 cores: one per job unless a stage asks for more
        rocket_launch=f"{BIN}/rlaunch -l {lp} -w {fw} singleshot",
        pre_rocket=f"export PYTHONPATH={ROOT / 'tests' / 'standins'}",
        cpus_per_task=None,
    )
    (tmp_path / "my_qadapter.yaml").write_text(yaml.safe_dump(qadapter))
    # qlaunch waits QUEUE_UPDATE_INTERVAL (5 s) after each submission; SLURM here answers at once
    (tmp_path / "FW_config.yaml").write_text("QUEUE_UPDATE_INTERVAL: 1\n")
    ase.io.write(tmp_path / "initial.extxyz", make_cells(4, seed=3))
    ase.io.write(tmp_path / "pool.extxyz", make_cells(6, seed=5))
    ase.io.write(tmp_path / "testset.extxyz", emt_labelled(4, seed=9))
    (tmp_path / "campaign.yaml").write_text(SETTINGS)
    env = dict(os.environ)
    _run(
        [BIN / "nequix-fw", "campaign", "--config", "campaign.yaml", "--launchpad", lp],
        tmp_path,
        env,
    )
    (tmp_path / "jobs").mkdir()
    qlaunch = [
        BIN / "qlaunch",
        "-l",
        lp,
        "-w",
        fw,
        "-q",
        tmp_path / "my_qadapter.yaml",
        "--launch_dir",
        tmp_path / "jobs",
        "-r",
        "rapidfire",
        "--sleep",
        "2",
    ]
    for _ in range(10):  # rapidfire returns when nothing is ready or waiting for a running job
        _run(qlaunch, tmp_path, env)
        _queue_empty()
        state = json.loads(_run([sys.executable, "-c", QUERY], tmp_path, env).splitlines()[-1])
        if state["workflow_state"] == ["COMPLETED", "COMPLETED"]:  # one per iteration
            break
    fws = {int(k): v for k, v in state["fireworks"].items()}
    launches = {int(k): v for k, v in state["launches"].items()}
    # iteration 0 (2 label groups, update_dataset, train_ensemble, validate), then iteration
    # 1's workflow added by validate 0 (run_ensemble, select) with its label groups..validate
    # appended by select 1: twelve Fireworks
    names = sorted(name for name, _ in fws.values())
    assert names == [
        "q label 0.0",
        "q label 0.1",
        "q label 1.0",
        "q label 1.1",
        "q run_ensemble 1",
        "q select 1",
        "q train_ensemble 0",
        "q train_ensemble 1",
        "q update_dataset 0",
        "q update_dataset 1",
        "q validate 0",
        "q validate 1",
    ]
    assert {s for _, s in fws.values()} == {"COMPLETED"}
    assert state["workflow_state"] == ["COMPLETED", "COMPLETED"]
    assert state["dataset"] == [0] * 4 + [1] * 3  # complete, nothing twice
    assert all(len(v) == 1 for v in launches.values())  # every Firework ran once
    by_name = {fws[i][0]: launches[i][0] for i in fws}
    # the two labelling groups of an iteration ran at the same time, in two SLURM jobs
    for k in (0, 1):
        a, b = by_name[f"q label {k}.0"], by_name[f"q label {k}.1"]
        assert a["job"] != b["job"]
        assert a["start"] < b["end"] and b["start"] < a["end"], (a, b)
    for name, launch in by_name.items():
        # FireWorks recorded the SLURM job (whose output file names it) that ran the Firework
        launch_dir = Path(launch["dir"])
        job_name = name.replace(" ", "_")
        assert (launch_dir / f"{job_name}-{launch['job']}.out").is_file()
        script = (launch_dir / "FW_submit.script").read_text()
        assert f"--job-name={job_name}" in script
        stage = name.split()[1]
        # each stage's queue requests, the rest from my_qadapter.yaml
        assert ("#SBATCH --cpus-per-task=2" in script) == (stage == "train_ensemble")
        walltime = {"train_ensemble": "00:20:00", "label": "00:10:00"}.get(stage, "02:00:00")
        assert f"#SBATCH --time={walltime}" in script


def test_resources_go_into_the_firework_specs(tmp_path):
    from nequix_fw.campaign import Campaign
    from nequix_fw.workflows import campaign_workflow, exploration_workflow

    ase.io.write(tmp_path / "i.extxyz", make_cells(5))
    sections = {
        "campaign": {
            "name": "r",
            "directory": str(tmp_path),
            "initial_structures": str(tmp_path / "i.extxyz"),
            "label_group_size": 2,
            "resources": {
                "label": {"category": "dft", "queueadapter": {"nodes": 2, "walltime": "04:00:00"}},
                "select": {"fworker": "gpu_node"},
            },
        }
    }
    wf = campaign_workflow(sections)
    specs = {fw.name: fw.spec for fw in wf.fws}
    # every task reaches the database through the LaunchPad that runs it
    lp = {"_add_launchpad_and_fw_id": True}
    label = {"_category": "dft", "_queueadapter": {"nodes": 2, "walltime": "04:00:00"}, **lp}
    assert specs == {
        "r label 0.0": label,
        "r label 0.1": label,
        "r label 0.2": label,
        "r update_dataset 0": lp,
        "r train_ensemble 0": lp,
        "r validate 0": lp,
    }
    # the 5 initial structures in groups of 2: three parallel labelling Fireworks, then the rest
    names = {fw.fw_id: fw.name for fw in wf.fws}
    links = {names[a]: sorted(names[b] for b in bs) for a, bs in wf.links.items()}
    d, t = "r update_dataset 0", "r train_ensemble 0"
    assert links == {
        "r label 0.0": [d],
        "r label 0.1": [d],
        "r label 0.2": [d],
        d: [t],
        t: ["r validate 0"],
        "r validate 0": [],
    }
    groups = [t.get("group") for fw in wf.fws for t in fw.tasks if "label" in fw.name]
    assert groups == [[0, 2], [1, 2], [2, 2]]  # [index, size]
    sections["campaign"]["explore"] = False
    specs = {fw.name: fw.spec for fw in exploration_workflow(Campaign(sections), 1).fws}
    assert specs == {
        "r run_ensemble 1": {"_add_launchpad_and_fw_id": True},
        "r select 1": {"_fworker": "gpu_node", "_add_launchpad_and_fw_id": True},
    }
    with pytest.raises(SettingsError, match="resources.relax"):
        make_settings(
            CampaignSettings, directory="d", initial_structures="i", resources={"relax": {}}
        )
