"""Campaigns that survive crashes, with real processes on a local MongoDB server: `kill -9` of
an `rlaunch` worker while it labels and while it trains (then `lpad detect_lostruns --rerun`
and a new worker), `kill -9` of the database server mid-campaign (restarted on its directory),
a flaky labelling oracle, and a labelling failure ratio that stops an iteration."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import pymongo
import pytest
import yaml
from helpers import NFW, emt_labelled, make_cells

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "standins"))
from flaky_emt import verdict  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(HERE / "standins"), os.environ.get("PYTHONPATH", "")]),
}
ARCH = {"hidden_irreps": "8x0e + 4x1o", "n_layers": 1, "lmax": 1, "radial_mlp_size": 8}


@pytest.fixture
def server(tmp_path):
    """A server of this test's own (it gets killed)."""
    d = tmp_path / "srv"
    subprocess.run(
        [NFW, "db", "start", "--dir", d, "--launchpad", tmp_path / "base.yaml"],
        check=True,
        capture_output=True,
    )
    yield d
    subprocess.run([NFW, "db", "stop", "--dir", d], capture_output=True)


def _setup(
    root: Path, name: str, labelling: dict, max_iterations: int = 1, epochs: int = 5
) -> dict:
    """A campaign directory with its own database: initial cells, a fixed candidate pool."""
    root.mkdir(parents=True, exist_ok=True)
    lp = yaml.safe_load((root.parent / "base.yaml").read_text())
    lp["name"] = name
    (root / "my_launchpad.yaml").write_text(yaml.safe_dump(lp))
    if not (root / "initial.extxyz").exists():
        ase.io.write(root / "initial.extxyz", make_cells(4, seed=3))
    ase.io.write(root / "pool.extxyz", make_cells(6, seed=5))
    ase.io.write(root / "testset.extxyz", emt_labelled(4, seed=9))
    settings = {
        "campaign": {
            "name": name,
            "directory": "run",
            "initial_structures": "initial.extxyz",
            "candidate_pool": ["pool.extxyz"],
            "testset": ["testset.extxyz"],
            "max_iterations": max_iterations,
            "explore": False,
        },
        "train_ensemble": {"n_models": 2, "epochs": epochs, "batch_size": 4, "architecture": ARCH},
        "label": labelling,
        "select": {"lo": 0.0, "max_selected": 3},
    }
    (root / "campaign.yaml").write_text(yaml.safe_dump(settings))
    _ok([NFW, "campaign", "--config", "campaign.yaml", "--launchpad", "my_launchpad.yaml"], root)
    client = pymongo.MongoClient(
        lp["host"],
        lp["port"],
        username=lp["username"],
        password=lp["password"],
        authSource=lp["authsource"] or name,
        directConnection=True,
    )
    return {"dir": root, "db": client[name], "lp": root / "my_launchpad.yaml"}


def _ok(cmd, cwd, timeout=600) -> str:
    p = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-3000:])
    return p.stdout + p.stderr


def _rlaunch(c: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [BIN / "rlaunch", "-l", c["lp"], "rapidfire"],
        cwd=c["dir"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait(what, timeout_s=300):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if what():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what.__doc__}")


def _running(c: dict, name: str) -> bool:
    return c["db"].fireworks.count_documents({"name": name, "state": "RUNNING"}) == 1


def _training(c: dict, k: int):
    """A check that iteration `k`'s training is under way: its Firework checked out (the
    workflow's lock released; a worker killed inside FireWorks' checkout leaves the lock set,
    which is another failure than this test's) and the ensemble's output directory made."""

    def check() -> bool:
        name = f"{c['db'].name} train_ensemble {k}"
        fw = c["db"].fireworks.find_one({"name": name, "state": "RUNNING"})
        if fw is None or c["db"].workflows.find_one({"nodes": fw["fw_id"], "locked": True}):
            return False
        return (c["dir"] / "run" / f"iter_{k:03d}" / "train_ensemble").is_dir()

    check.__doc__ = f"iteration {k}'s training under way"
    return check


def _kill(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def _state(c: dict) -> dict:
    docs = list(c["db"].nequix_fw_dataset.find())
    return {
        "fireworks": sorted((f["name"], f["state"]) for f in c["db"].fireworks.find()),
        "dataset": sorted(
            (d["structure_id"], round(d["energy"], 8), d["info"]["iteration"]) for d in docs
        ),
        "n_docs": len(docs),
        "log": json.loads((c["dir"] / "run" / "campaign.json").read_text())["iterations"],
    }


def _same_run(c: dict, want: dict) -> dict:
    """The state of campaign `c` (named crash) after its faults, checked against `want`, the
    uninterrupted run's (named ref): the same Fireworks, all completed once; the same
    dataset, no duplicates, no lost labels."""
    got = _state(c)
    assert [n.replace("crash", "ref") for n, _ in got["fireworks"]] == [
        n for n, _ in want["fireworks"]
    ]
    assert {s for _, s in got["fireworks"]} == {"COMPLETED"}
    assert got["dataset"] == want["dataset"] and got["n_docs"] == want["n_docs"] == 4 + 3
    return got


def test_killed_worker_and_server_lose_nothing(tmp_path, server):
    labelling = {
        "backend": "ase",
        "calculator": "slow_emt:SlowEMT",
        "calculator_params": {"delay_s": 1.0},
    }
    ref = _setup(tmp_path / "ref", "ref", labelling)
    _ok([BIN / "rlaunch", "-l", ref["lp"], "rapidfire"], ref["dir"])
    want = _state(ref)

    c = _setup(tmp_path / "crash", "crash", labelling)
    lost_runs = [BIN / "lpad", "-l", c["lp"], "detect_lostruns", "--time", "1", "--rerun"]
    labels0 = c["dir"] / "run" / "iter_000" / "label"
    # 1. the worker dies in the middle of labelling iteration 0
    worker = _rlaunch(c)

    def labelling_half_done():
        """iteration 0's labelling under way"""
        return _running(c, "crash label 0") and 1 <= len(list(labels0.glob("*/task.json"))) < 4

    _wait(labelling_half_done)
    _kill(worker)
    time.sleep(2)
    _ok(lost_runs, c["dir"])
    assert c["db"].fireworks.find_one({"name": "crash label 0"})["state"] == "READY"
    # 2. a new worker; the database server dies (kill -9) while it trains, and comes back
    worker = _rlaunch(c)
    _wait(_training(c, 0))
    pid = int((server / "server.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    _ok([NFW, "db", "start", "--dir", server, "--launchpad", tmp_path / "base.yaml"], tmp_path)
    # 3. the worker dies while it trains iteration 1's ensemble
    _wait(_training(c, 1))
    _kill(worker)
    time.sleep(2)
    _ok(lost_runs, c["dir"])
    _ok([BIN / "rlaunch", "-l", c["lp"], "rapidfire"], c["dir"])
    got = _same_run(c, want)
    assert got["log"][0]["n_label_reused"] >= 1  # labels done before the kill were reused
    assert [it["dataset_size"] for it in got["log"]] == [4, 7]


def test_worker_killed_as_validate_appends_and_inside_select_appends_once(tmp_path, server):
    """Issue 39: `kill -9` of the worker the moment validation has appended the next iteration
    (before its launch completes), then inside the select Firework (its stage done, before
    FireWorks appends the labelling), each followed by `lpad detect_lostruns --rerun`: the next
    iteration's workflow exists once, every structure is labelled once, and the campaign ends
    as an uninterrupted run does."""
    calls = {}

    def labelling(name: str) -> dict:
        calls[name] = tmp_path / f"{name}_calls.txt"
        params = {"delay_s": 0.0, "calls_log": str(calls[name])}
        return {"backend": "ase", "calculator": "slow_emt:SlowEMT", "calculator_params": params}

    ref = _setup(tmp_path / "ref", "ref", labelling("ref"))
    _ok([BIN / "rlaunch", "-l", ref["lp"], "rapidfire"], ref["dir"])
    want = _state(ref)
    c = _setup(tmp_path / "crash", "crash", labelling("crash"))
    lost_runs = [BIN / "lpad", "-l", c["lp"], "detect_lostruns", "--time", "1", "--rerun"]
    for k, point in enumerate(["after_add_wf:iteration 1", "after_stage:SelectTask"]):
        env = {**ENV, "NEQUIX_FW_TEST_KILL": point}
        env["NEQUIX_FW_TEST_KILL_MARKER"] = str(tmp_path / f"killed_{k}")
        p = subprocess.run(
            [str(BIN / "rlaunch"), "-l", str(c["lp"]), "rapidfire"],
            cwd=c["dir"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == -signal.SIGKILL, (point, p.stderr[-2000:])
        assert (tmp_path / f"killed_{k}").exists()
        running = [f["name"] for f in c["db"].fireworks.find({"state": "RUNNING"})]
        assert running == [["crash validate 0"], ["crash select 1"]][k]
        time.sleep(2)
        _ok(lost_runs, c["dir"])
    _ok([BIN / "rlaunch", "-l", c["lp"], "rapidfire"], c["dir"])
    got = _same_run(c, want)
    names = sorted(w["name"] for w in c["db"].workflows.find())
    assert names == ["crash iteration 0", "crash iteration 1"]  # appended once
    labelled = calls["crash"].read_text().split()
    assert sorted(labelled) == sorted(set(labelled)) and len(labelled) == 4 + 3
    assert sorted(labelled) == sorted(calls["ref"].read_text().split())
    assert [it["dataset_size"] for it in got["log"]] == [4, 7]


def _flaky_pool(n: int) -> list:
    """`n` cells for the flaky oracle, with at least two failures and one hang among them."""
    cells = make_cells(60, seed=21)
    kinds = [verdict(a) for a in cells]
    pick = [i for i, k in enumerate(kinds) if k == "fail"][:2] + [
        i for i, k in enumerate(kinds) if k == "hang"
    ][:1]
    pick += [i for i, k in enumerate(kinds) if k == "ok"][: n - len(pick)]
    assert len(pick) == n and kinds.count("hang") >= 1
    return [cells[i] for i in sorted(pick)]


def _flakyrun_campaign(tmp_path: Path, name: str, cells: list, labelling: dict) -> dict:
    """Iteration 0 of a campaign labelling `cells` with the flaky oracle, run to its end."""
    root = tmp_path / name
    root.mkdir()
    ase.io.write(root / "initial.extxyz", cells)
    c = _setup(root, name, labelling, max_iterations=0, epochs=3)
    _ok([BIN / "rlaunch", "-l", c["lp"], "rapidfire"], c["dir"])
    return c


def test_flaky_oracle_and_failure_ratio(tmp_path, server):
    oracle = f"{sys.executable} {HERE / 'standins' / 'flaky_emt.py'}"
    cells = _flaky_pool(12)
    labelling = {
        "backend": "script",
        "command": oracle,
        "timeout_s": 3.0,
        "max_failed_fraction": 0.3,
    }
    c = _flakyrun_campaign(tmp_path, "flaky", cells, labelling)
    s = _state(c)
    assert {st for _, st in s["fireworks"]} == {"COMPLETED"}
    assert s["n_docs"] == 12 - 3 and s["log"][0]["n_label_failures"] == 3
    # every failure recorded with its reason, in the task documents in MongoDB
    failed = {d["reason"] for d in c["db"].nequix_fw_label_tasks.find({"status": "failed"})}
    assert failed == {
        "command exited 1: EMT: SCF did not converge (simulated)",
        "timed out after 3.0 s",
    }
    # the same campaign with a stricter limit stops iteration 0 instead of training on the rest
    labelling["max_failed_fraction"] = 0.2
    c2 = _flakyrun_campaign(tmp_path, "strict", cells, labelling)
    s2 = _state(c2)
    states = dict(s2["fireworks"])
    assert states["strict update_dataset 0"] == "COMPLETED"
    assert states["strict train_ensemble 0"] == "DEFUSED"
    assert s2["n_docs"] == 0
    reason = s2["log"][0]["stop_reason"]
    assert reason.startswith("labelling failed for 3 of 12 structures (more than 20%")
    it = c2["db"].nequix_fw_iterations.find_one({"campaign": "strict", "iteration": 0})
    assert it["stop_reason"] == reason


def test_credentials_never_leak(tmp_path):
    secret = "pw-Zq7-never-shown"
    d = tmp_path / "srv"
    env = {**ENV, "NEQUIX_FW_DB_PASSWORD": secret}
    _ok_env = subprocess.run(
        [
            NFW,
            "db",
            "start",
            "--dir",
            d,
            "--launchpad",
            tmp_path / "base.yaml",
            "--username",
            "camp",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert _ok_env.returncode == 0, _ok_env.stderr
    try:
        c = _setup(tmp_path / "auth", "auth", {"backend": "ase", "calculator": "emt"}, epochs=3)
        p = subprocess.run(
            [BIN / "rlaunch", "-l", c["lp"], "rapidfire"],
            cwd=c["dir"],
            env=ENV,
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        s = _state(c)
        assert {st for _, st in s["fireworks"]} == {"COMPLETED"} and s["n_docs"] == 4 + 3
        assert secret not in p.stdout + p.stderr
        # in no file the campaign wrote (Firework specs, launch dirs, campaign.json, models)
        for f in tmp_path.rglob("*"):
            if f.is_file() and f.name not in ("base.yaml", "my_launchpad.yaml"):
                assert secret.encode() not in f.read_bytes(), f
        # nor in any stored document (Fireworks, launches, store collections)
        for name in c["db"].list_collection_names():
            for doc in c["db"][name].find():
                assert secret not in repr(doc), name
        # a wrong password: one line naming the file, without either password
        bad = yaml.safe_load(c["lp"].read_text())
        bad["password"] = "wrong-Xy9"
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        p = subprocess.run(
            [
                NFW,
                "update-dataset",
                "--new",
                c["dir"] / "testset.extxyz",
                "--dataset",
                "db:x",
                "--launchpad",
                tmp_path / "bad.yaml",
            ],
            env=ENV,
            capture_output=True,
            text=True,
        )
        assert p.returncode == 2 and "bad.yaml: the database 127.0.0.1" in p.stderr
        assert "refused access" in p.stderr and "wrong-Xy9" not in p.stderr
        assert secret not in p.stderr
    finally:
        subprocess.run([NFW, "db", "stop", "--dir", d], capture_output=True)
