"""The campaign on a real (one-node) SLURM: `qlaunch -r singleshot` puts each Firework into its
own `sbatch` job with its stage's queue requests (`campaign.resources`), and the jobs' `rlaunch`
runs it. On the embedded store one FireWorks process at a time owns the store file, so every
`qlaunch` and every job's `rlaunch` takes the same `flock`."""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import pytest
import yaml
from conftest import emt_labelled, make_cells

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
  resources:
    label: {queueadapter: {ntasks: 2}}
    train: {queueadapter: {walltime: "00:20:00", cpus_per_task: 2}}
training:
  n_models: 2
  epochs: 2
  batch_size: 4
  architecture: {hidden_irreps: "8x0e + 4x1o", n_layers: 1, lmax: 1, radial_mlp_size: 8}
labelling: {backend: ase, calculator: ">>reference_calculator<<"}
selection: {lo: 0.0, max_selected: 3}
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


def _wait_for_job(launch_dir: Path, timeout_s: float = 300) -> str:
    """The id of the job submitted from `launch_dir`, once SLURM has run it."""
    name = re.search(r"--job-name=(\S+)", (launch_dir / "FW_submit.script").read_text()).group(1)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        queued = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True,
                                text=True, check=True).stdout.split()  # fmt: skip
        outputs = list(launch_dir.glob(f"{name}-*.out"))
        if not queued and outputs:
            return outputs[0].name.removeprefix(f"{name}-").removesuffix(".out")
        time.sleep(1)
    subprocess.run(["scancel", "-n", name])
    raise AssertionError(f"SLURM job {name} did not finish in {timeout_s} s")


def test_campaign_through_qlaunch_on_slurm(slurm, tmp_path):
    db, lock = tmp_path / "fw_db.json", tmp_path / "fw_db.lock"
    lp, fw = tmp_path / "my_launchpad.yaml", tmp_path / "my_fworker.yaml"
    lp.write_text((ROOT / "my_launchpad.yaml").read_text())
    fw.write_text("name: slurm_worker\ncategory: ''\nquery: '{}'\n"
                  "env:\n  reference_calculator: emt\n")  # fmt: skip
    qadapter = yaml.safe_load((ROOT / "my_qadapter.yaml").read_text())
    qadapter.update(  # the node has 2 cores: one per task unless a stage asks for more
        rocket_launch=f"flock {lock} {BIN}/rlaunch -l {lp} -w {fw} singleshot",
        pre_rocket=f"export MONGOMOCK_SERVERSTORE_FILE={db}",
        cpus_per_task=None,
    )
    (tmp_path / "my_qadapter.yaml").write_text(yaml.safe_dump(qadapter))
    ase.io.write(tmp_path / "initial.extxyz", make_cells(4, seed=3))
    ase.io.write(tmp_path / "pool.extxyz", make_cells(6, seed=5))
    ase.io.write(tmp_path / "testset.extxyz", emt_labelled(4, seed=9))
    (tmp_path / "campaign.yaml").write_text(SETTINGS)
    env = {**os.environ, "MONGOMOCK_SERVERSTORE_FILE": str(db)}
    _run([BIN / "nequix-fw", "campaign", "--config", "campaign.yaml", "--launchpad", lp,
          "--write", "wf.yaml"], tmp_path, env)  # fmt: skip
    _run([BIN / "lpad", "-l", lp, "reset", "--password", datetime.date.today().isoformat()],
         tmp_path, env)  # fmt: skip
    _run([BIN / "lpad", "-l", lp, "add", "wf.yaml"], tmp_path, env)

    jobs = []  # (Firework id, SLURM job id, launch directory)
    for n in range(20):
        launch_dir = tmp_path / "jobs" / f"{n:02d}"
        launch_dir.mkdir(parents=True)
        log = _run(["flock", lock, BIN / "qlaunch", "-l", lp, "-w", fw, "-q",
                    tmp_path / "my_qadapter.yaml", "--launch_dir", launch_dir, "-r",
                    "singleshot"], tmp_path, env)  # fmt: skip
        if "No jobs exist in the LaunchPad" in log:
            break
        fw_id = re.search(r"reserved FW with fw_id: (\d+)", log).group(1)
        jobs.append((int(fw_id), _wait_for_job(launch_dir), launch_dir))

    query = """
import json
from nequix_fw.store import COLLECTION, launchpad_db
db = launchpad_db("my_launchpad.yaml")
fws = {f["fw_id"]: (f["name"], f["state"]) for f in db.fireworks.find()}
res = {l["fw_id"]: [h.get("reservation_id") for h in l["state_history"]
                    if h["state"] == "RESERVED"][0] for l in db.launches.find()}
print(json.dumps({"fireworks": fws, "reservations": res,
                  "workflow_state": [w["state"] for w in db.workflows.find()],
                  "dataset": sorted(d["info"]["iteration"] for d in db[COLLECTION].find())}))
"""
    out = _run([sys.executable, "-c", query], tmp_path, env).strip().splitlines()[-1]
    state = json.loads(out)
    fws = {int(k): v for k, v in state["fireworks"].items()}
    # iteration 0 (label, dataset, train, validate), then select 1 appended by validate 0, then
    # iteration 1's label..validate appended by select 1: nine Fireworks, nine SLURM jobs
    assert len(jobs) == len(fws) == 9
    assert {s for _, s in fws.values()} == {"COMPLETED"}
    assert state["workflow_state"] == ["COMPLETED"]
    assert state["dataset"] == [0] * 4 + [1] * 3
    names = [fws[fw_id][0] for fw_id, _, _ in jobs]
    assert names == ["q label 0", "q dataset 0", "q train 0", "q validate 0", "q select 1",
                     "q label 1", "q dataset 1", "q train 1", "q validate 1"]  # fmt: skip
    for fw_id, job_id, launch_dir in jobs:
        # FireWorks recorded the SLURM job (whose output file named it) that ran the Firework
        assert state["reservations"][str(fw_id)] == job_id
        script = (launch_dir / "FW_submit.script").read_text()
        assert f"--job-name={fws[fw_id][0].replace(' ', '_')}" in script
        stage = fws[fw_id][0].split()[1]
        # each stage's queue requests, the rest from my_qadapter.yaml
        assert ("#SBATCH --ntasks=2" in script) == (stage == "label")
        assert ("#SBATCH --ntasks=1" in script) == (stage != "label")
        assert ("#SBATCH --cpus-per-task=2" in script) == (stage == "train")
        assert "#SBATCH --time=" + ("00:20:00" if stage == "train" else "02:00:00") in script


def test_resources_go_into_the_firework_specs(tmp_path):
    from nequix_fw.workflows import campaign_workflow, exploration_workflow

    ase.io.write(tmp_path / "i.extxyz", make_cells(5))
    sections = {"campaign": {"name": "r", "directory": str(tmp_path),
                             "initial_structures": str(tmp_path / "i.extxyz"),
                             "label_group_size": 2,
                             "resources": {"label": {"category": "dft", "queueadapter": {
                                 "nodes": 2, "walltime": "04:00:00"}},
                                 "select": {"fworker": "gpu_node"}}}}  # fmt: skip
    wf = campaign_workflow(sections)
    specs = {fw.name: fw.spec for fw in wf.fws}
    label = {"_category": "dft", "_queueadapter": {"nodes": 2, "walltime": "04:00:00"}}
    assert specs == {"r label 0.0": label, "r label 0.1": label, "r label 0.2": label,
                     "r dataset 0": {}, "r train 0": {},
                     "r validate 0": {"_add_launchpad_and_fw_id": True}}  # fmt: skip
    # the 5 initial structures in groups of 2: three parallel labelling Fireworks, then the rest
    names = {fw.fw_id: fw.name for fw in wf.fws}
    links = {names[a]: sorted(names[b] for b in bs) for a, bs in wf.links.items()}
    assert links == {"r label 0.0": ["r dataset 0"], "r label 0.1": ["r dataset 0"],
                     "r label 0.2": ["r dataset 0"], "r dataset 0": ["r train 0"],
                     "r train 0": ["r validate 0"], "r validate 0": []}  # fmt: skip
    assert [t.get("group") for fw in wf.fws for t in fw.tasks if "label" in fw.name] == [0, 1, 2]
    sections["campaign"]["explore"] = False
    specs = {fw.name: fw.spec for fw in exploration_workflow(sections, 1).fws}
    assert specs == {"r select 1": {"_fworker": "gpu_node", "_add_launchpad_and_fw_id": True}}
    with pytest.raises(SettingsError, match="resources.relax"):
        make_settings(CampaignSettings, directory="d", initial_structures="i",
                      resources={"relax": {}})  # fmt: skip
