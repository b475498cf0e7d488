"""Many workers on one campaign: labelling throughput, and nothing lost or done twice when
workers and the database server are killed (issue 22).

A campaign's iteration 0 labels 400 cells of 16 atoms in 40 label Fireworks (label_group_size
10) with a stand-in oracle that takes 0.5 s a structure (tests/standins/slow_emt.py: EMT after
a sleep, logging every call).
Workers: 8 `rlaunch rapidfire` processes, plus `qlaunch rapidfire` of 4 SLURM jobs that each run
`rlaunch rapidfire` when a local SLURM runs (`make sysdeps`); on a 2-core node SLURM runs 2 of
them at a time. Two runs, each on its own database of one local MongoDB server:

1. uninterrupted: the labelling window (first label start to last label end) against the ideal
   (400 x 0.5 s over the workers that ran labels); every structure labelled exactly once;
2. interrupted: when 40 % of the structures are labelled, two `rlaunch` workers are killed
   (`kill -9`) and so is the server, which is started again on its directory; once the other
   workers are done, `lpad detect_lostruns --rerun` puts the killed workers' Fireworks back,
   and the live workers finish them. The final dataset must equal the uninterrupted run's;
   the oracle may run again only for the structures the killed workers were labelling.

    python benchmarks/bench_workers.py [--keep DIR] [--structures 400] [--delay 0.5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pymongo
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NFW = BIN / "nequix-fw"
STANDINS = ROOT / "tests" / "standins"
N_RLAUNCH, N_JOBS = 8, 4

STRUCTURES = """
import sys
from pathlib import Path
import ase.io
import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from nequix_fw.exploration import distorted_copies
work, n = Path(sys.argv[1]), int(sys.argv[2])
cells = []
for k, (el, a) in enumerate([("Cu", 3.61), ("Ni", 3.52)]):
    cell = bulk(el, "fcc", a=a, cubic=True).repeat((2, 2, 1))
    cells += distorted_copies(cell, n // 2 + 4, rattle_std=0.1, strain_max=0.03, seed=k)
cells = [cells[i] for i in np.random.default_rng(0).permutation(len(cells))]
ase.io.write(work / "initial.extxyz", cells[:n])
for a in cells[n:]:
    a.calc = EMT(); a.get_forces(); a.get_stress()
ase.io.write(work / "testset.extxyz", cells[n:])
"""


def _ok(cmd: list, cwd: Path, env: dict | None = None) -> str:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def _time(s) -> datetime.datetime:
    return s if isinstance(s, datetime.datetime) else datetime.datetime.fromisoformat(str(s))


def _wait(what, timeout_s: float = 600, every: float = 0.3) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if what():
            return
        time.sleep(every)
    sys.exit(f"timed out waiting for {what.__doc__}")


class Run:
    """One campaign (its own directory and database) and its workers."""

    def __init__(self, work: Path, name: str, base_lp: dict, args, slurm: bool):
        self.dir = work / name
        self.dir.mkdir()
        self.name, self.slurm, self.args = name, slurm, args
        lp = dict(base_lp, name=name)
        self.lp = self.dir / "my_launchpad.yaml"
        self.lp.write_text(yaml.safe_dump(lp))
        client = pymongo.MongoClient(
            lp["host"],
            lp["port"],
            username=lp.get("username"),
            password=lp.get("password"),
            authSource=lp.get("authsource") or name,
            directConnection=True,
        )
        self.db = client[name]
        paths = [str(STANDINS), str(ROOT)]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        for f in ("initial.extxyz", "testset.extxyz"):
            shutil.copy(work / f, self.dir / f)
        settings = {
            "campaign": {
                "name": name,
                "directory": "run",
                "initial_structures": "initial.extxyz",
                "candidate_pool": ["initial.extxyz"],
                "testset": ["testset.extxyz"],
                "max_iterations": 0,
                "explore": False,
                "label_group_size": 10,
                "target_force_rmse": None,
            },
            "train_ensemble": {
                "n_models": 2,
                "epochs": 1,
                "batch_size": 16,
                "architecture": {
                    "hidden_irreps": "4x0e + 2x1o",
                    "n_layers": 1,
                    "lmax": 1,
                    "radial_mlp_size": 8,
                },
            },
            "label": {
                "backend": "ase",
                "calculator": "slow_emt:SlowEMT",
                "calculator_params": {"delay_s": args.delay, "calls_log": str(work / "calls.log")},
            },
        }
        (self.dir / "campaign.yaml").write_text(yaml.safe_dump(settings))
        _ok([NFW, "campaign", "--config", "campaign.yaml", "--launchpad", self.lp], self.dir)
        self.workers: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        for i in range(N_RLAUNCH):
            fw = self.dir / f"w{i}.yaml"
            fw.write_text(f"name: w{i}\ncategory: ''\nquery: '{{}}'\n")
            self.workers[f"w{i}"] = subprocess.Popen(
                [BIN / "rlaunch", "-l", self.lp, "-w", fw, "rapidfire", "--sleep", "1"],
                cwd=self.dir,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        if self.slurm:
            fw = self.dir / "slurm.yaml"
            fw.write_text("name: slurm\ncategory: ''\nquery: '{}'\n")
            qa = yaml.safe_load((ROOT / "my_qadapter.yaml").read_text())
            qa.update(
                rocket_launch=f"{BIN}/rlaunch -l {self.lp} -w {fw} rapidfire --sleep 1",
                pre_rocket=f"export PYTHONPATH={self.env['PYTHONPATH']}",
                cpus_per_task=None,
                job_name=f"bench_{self.name}",
            )
            (self.dir / "qadapter.yaml").write_text(yaml.safe_dump(qa))
            (self.dir / "jobs").mkdir()
            # qlaunch waits QUEUE_UPDATE_INTERVAL (5 s) after each submission; SLURM here
            # answers at once
            (self.dir / "FW_config.yaml").write_text("QUEUE_UPDATE_INTERVAL: 1\n")
            qlaunch = [BIN / "qlaunch", "-l", self.lp, "-w", fw, "-q", self.dir / "qadapter.yaml"]
            qlaunch += ["--launch_dir", self.dir / "jobs", "rapidfire", "--nlaunches", N_JOBS]
            qlaunch += ["--maxjobs_queue", N_JOBS, "--sleep", "1"]
            self.workers["qlaunch"] = subprocess.Popen(
                [str(c) for c in qlaunch],
                cwd=self.dir,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

    def calls(self) -> Counter:
        log = self.dir.parent / "calls.log"
        lines = log.read_text().split() if log.is_file() else []
        return Counter(lines)

    def state(self) -> str:
        wf = self.db.workflows.find_one({}, {"state": 1})
        return wf["state"] if wf else "?"

    def stop(self) -> None:
        for p in self.workers.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.slurm:
            subprocess.run(["scancel", "--name", f"bench_{self.name}"], capture_output=True)

    def labelling(self) -> dict:
        """The labelling window and who ran the label Fireworks."""
        names = {f["fw_id"]: f["name"] for f in self.db.fireworks.find({}, {"name": 1, "fw_id": 1})}
        starts, ends, workers = [], [], set()
        for launch in self.db.launches.find({"state": "COMPLETED"}):
            if " label " not in names[launch["fw_id"]]:
                continue
            t = {h["state"]: _time(h["created_on"]) for h in launch["state_history"]}
            starts.append(t["RUNNING"])
            ends.append(t["COMPLETED"])
            workers.add((launch["fworker"]["name"], launch["host"], launch["launch_dir"]))
        label_fws = [f for f in self.db.fireworks.find({}) if " label " in f["name"]]
        owners: dict[int, list[int]] = {}
        for f in label_fws:
            for launch_id in f.get("launches", []):
                owners.setdefault(launch_id, []).append(f["fw_id"])
        return {
            "window_s": (max(ends) - min(starts)).total_seconds(),
            "n_launches": len(starts),
            "n_fireworks": sum(f["state"] == "COMPLETED" for f in label_fws),
            "shared": {k: v for k, v in owners.items() if len(v) > 1},
            "rlaunch": len({w for w, _, _ in workers if w != "slurm"}),
            "slurm_jobs": len(
                {
                    "/launcher_".join(d.split("/launcher_")[:2])
                    for w, _, d in workers
                    if w == "slurm"
                }
            ),
        }

    def dataset(self) -> list:
        docs = self.db.nequix_fw_dataset.find({}, {"structure_id": 1, "energy": 1})
        return sorted((d["structure_id"], round(d["energy"], 8)) for d in docs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", help="run in this directory and keep it (default: a temp dir)")
    p.add_argument("--structures", type=int, default=400)
    p.add_argument("--delay", type=float, default=0.5, help="the oracle's seconds a structure")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_workers_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    _ok([sys.executable, "-c", STRUCTURES, work, args.structures], work)
    slurm = shutil.which("sinfo") and subprocess.run(["sinfo"], capture_output=True).returncode == 0
    slurm_cpus = 0
    if slurm:  # the jobs SLURM runs at once here: one per CPU
        out = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout
        slurm_cpus = int(out.split()[0].rstrip("+"))
    if not slurm:
        print("no running SLURM: rlaunch workers only (as root, `make sysdeps` starts one)")
    server = work / "db"
    _ok([NFW, "db", "start", "--dir", server, "--launchpad", work / "base.yaml"], work)
    base_lp = yaml.safe_load((work / "base.yaml").read_text())
    n = args.structures
    try:
        # 1. uninterrupted
        a = Run(work, "whole", base_lp, args, bool(slurm))
        a.start()
        _wait(lambda: a.state() == "COMPLETED")
        a.stop()
        calls_a = a.calls()
        (work / "calls.log").rename(work / "calls_whole.log")
        # 2. interrupted
        b = Run(work, "killed", base_lp, args, bool(slurm))
        b.start()

        def forty_percent() -> bool:
            """40 % labelled"""
            return sum(b.calls().values()) >= 0.4 * n

        _wait(forty_percent, every=0.05)
        for w in ("w0", "w1"):
            os.killpg(b.workers[w].pid, signal.SIGKILL)
            b.workers[w].wait()
        os.kill(int((server / "server.pid").read_text()), signal.SIGKILL)
        killed_at = sum(b.calls().values())
        time.sleep(1)
        _ok([NFW, "db", "start", "--dir", server, "--launchpad", work / "base.yaml"], work)

        def only_lost_ones_left() -> bool:
            """every Firework not of a dead worker done"""
            running = [f["fw_id"] for f in b.db.fireworks.find({"state": "RUNNING"})]
            ready = b.db.fireworks.count_documents({"state": "READY"})
            owners = {
                launch["fworker"]["name"]
                for launch in b.db.launches.find({"fw_id": {"$in": running}, "state": "RUNNING"})
            }
            alive = {w for w, p in b.workers.items() if w.startswith("w") and p.poll() is None}
            jobs = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
            if slurm and jobs.strip():
                alive.add("slurm")
            return ready == 0 and not owners & alive

        _wait(only_lost_ones_left)
        lost = _ok([BIN / "lpad", "-l", b.lp, "detect_lostruns", "--time", "1", "--rerun"], b.dir)
        _wait(lambda: b.state() == "COMPLETED")
        b.stop()
        calls_b = b.calls()
        la, lb = a.labelling(), b.labelling()
        workers = N_RLAUNCH + (min(N_JOBS, slurm_cpus) if slurm else 0)
        ideal = n * args.delay / workers
        print(
            f"\n{n} structures, oracle {args.delay} s each, label groups of 10; "
            f"{os.cpu_count()} CPUs"
        )
        print(
            "\n| run | label Fireworks completed | their launch records | rlaunch workers "
            "| SLURM jobs | labelling window (s) |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, lab in (("uninterrupted", la), ("two workers and the server killed", lb)):
            print(
                f"| {name} | {lab['n_fireworks']} | {lab['n_launches']} | {lab['rlaunch']} | "
                f"{lab['slurm_jobs']} | {lab['window_s']:.1f} |"
            )
        for name, lab in (("uninterrupted", la), ("interrupted", lb)):
            for launch_id, fw_ids in lab["shared"].items():
                print(
                    f"{name}: launch id {launch_id} was given to Fireworks {fw_ids}: one "
                    "launch record overwrote the other (the server's findAndModify, see "
                    "benchmarks/README.md)"
                )
        print(
            f"\nthroughput (uninterrupted): ideal {ideal:.1f} s ({n} x {args.delay} s over "
            f"{workers} workers: {N_RLAUNCH} rlaunch and the {min(N_JOBS, slurm_cpus)} SLURM jobs "
            f"that run at once here), measured {la['window_s']:.1f} s: "
            f"{100 * ideal / la['window_s']:.0f} % of the ideal (target >= 70 %)"
        )
        once = all(v == 1 for v in calls_a.values()) and len(calls_a) == n
        print(f"uninterrupted: {len(calls_a)} structures, each labelled once: {once}")
        extra = sum(calls_b.values()) - len(calls_b)
        print(
            f"interrupted (killed at {killed_at} labels): {len(calls_b)} structures, "
            f"{extra} labelled twice (finished by the oracle, not yet stored when killed)"
        )
        print("detect_lostruns:", *[ln.split(" INFO ")[-1] for ln in lost.splitlines()], sep="\n  ")
        same = a.dataset() == b.dataset() and len(a.dataset()) == n
        print(
            f"final datasets equal ({len(a.dataset())} and {len(b.dataset())} structures): {same}"
        )
        if not (once and same and extra <= 2 and len(calls_b) == n):
            sys.exit("FAILED: labels lost or repeated")
    finally:
        _ok([NFW, "db", "stop", "--dir", server], work)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
