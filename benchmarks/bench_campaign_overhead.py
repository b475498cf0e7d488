"""The FireWorks and database share of a campaign's wall time, per iteration.

Runs the demo campaign (`workflows/emt_cu_au.yaml`, EMT labels, small Nequix ensembles) through
`rlaunch rapidfire` on a local MongoDB server (`nequix-fw db start`), then reads the launches:
an iteration's wall time runs from its first Firework's start to its last one's end; its stage
time is the sum of the FireTasks' own `task_wall_s` (the science, store writes included); the
rest (reservations, launch bookkeeping, Firework and workflow updates, the gaps between
launches) is what FireWorks and the database cost. Target (issue 11): under 5% per iteration.

`--scale` runs a campaign at production width instead (issue 22): 20 iterations of 200 EMT
labels each, in label groups of 20 (10 label Fireworks and one dataset Firework that waits for
all of them per iteration), with the cheapest science that keeps every stage real (2 tiny
models, 1 epoch, no MD, a pool of 6000 cells). It reports the FireWorks + database time per
Firework of each iteration (target: the last iteration at most 1.5x the first) and how long the
dataset Firework waited after its last label parent completed (target: at most 2 s).

    python benchmarks/bench_campaign_overhead.py [--max-iterations 3] [--keep DIR]
    python benchmarks/bench_campaign_overhead.py --scale [--max-iterations 20] [--keep DIR]
        [--launches-per-worker 16]
    python benchmarks/bench_campaign_overhead.py --demo-run demo_run   # after `make demo`
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from fireworks import LaunchPad

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(cmd: list, cwd: Path) -> None:
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True)


def _time(s: str | datetime.datetime) -> datetime.datetime:
    return s if isinstance(s, datetime.datetime) else datetime.datetime.fromisoformat(str(s))


def iterations(lp: LaunchPad) -> dict[int, dict]:
    """Per iteration: its first start and last end, the sum of its stages' own time, its
    number of Fireworks, and the wait of its dataset Firework after its last label parent
    completed (s), from the completed launches."""
    names = {f["fw_id"]: f["name"] for f in lp.fireworks.find({}, {"fw_id": 1, "name": 1})}
    its: dict[int, dict] = {}
    for launch in lp.launches.find({"state": "COMPLETED"}):
        name = names[launch["fw_id"]].split()
        k, stage = int(name[-1].split(".")[0]), name[-2]
        times = {h["state"]: _time(h["created_on"]) for h in launch["state_history"]}
        it = its.setdefault(
            k,
            {
                "start": times["RUNNING"],
                "end": times["COMPLETED"],
                "stages": 0.0,
                "n": 0,
                "labelled": None,
                "dataset_start": None,
            },
        )
        it["start"] = min(it["start"], times["RUNNING"])
        it["end"] = max(it["end"], times["COMPLETED"])
        it["stages"] += launch["action"]["stored_data"]["task_wall_s"]
        it["n"] += 1
        if stage == "label":
            it["labelled"] = max(it["labelled"] or times["COMPLETED"], times["COMPLETED"])
        elif stage == "update_dataset":
            it["dataset_start"] = times["RUNNING"]
    for it in its.values():
        it["fan_in_s"] = None
        if it["labelled"] and it["dataset_start"]:
            it["fan_in_s"] = (it["dataset_start"] - it["labelled"]).total_seconds()
    return its


def report(its: dict[int, dict]) -> None:
    print(f"\ncampaign of {len(its)} iterations ({os.cpu_count()} CPUs)\n")
    print(
        "| iteration | Fireworks | wall (s) | stages (s) | FireWorks + database (s) | share "
        "| per Firework (s) | dataset's wait after the last label (s) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    per_fw = {}
    for k in sorted(its):
        it = its[k]
        wall = (it["end"] - it["start"]).total_seconds()
        rest = wall - it["stages"]
        per_fw[k] = rest / it["n"]
        fan_in = "" if it["fan_in_s"] is None else f"{it['fan_in_s']:.2f}"
        print(
            f"| {k} | {it['n']} | {wall:.1f} | {it['stages']:.1f} | {rest:.2f} | "
            f"{100 * rest / wall:.1f}% | {per_fw[k]:.2f} | {fan_in} |"
        )
    later = [k for k in sorted(its) if k >= 1]
    if len(later) >= 2:
        first, last = later[0], later[-1]
        print(
            f"\nper Firework: iteration {last} / iteration {first} = "
            f"{per_fw[last] / per_fw[first]:.2f} (target <= 1.5); the dataset's longest wait "
            f"{max(its[k]['fan_in_s'] or 0 for k in later):.2f} s (target <= 2)"
        )


def scale_inputs(work: Path, py: Path, max_iterations: int) -> dict:
    """The `--scale` campaign's inputs in `work` and its settings."""
    _run([py, "-c", SCALE_STRUCTURES, work], work)
    return {
        "campaign": {
            "name": "scale",
            "directory": "campaign",
            "initial_structures": "initial_structures",
            "candidate_pool": ["candidates"],
            "testset": ["validation_set"],
            "max_iterations": max_iterations,
            "min_selected": 1,
            "label_group_size": 20,
            "target_force_rmse": None,
        },
        "explore": {"steps": 0, "n_distortions": 1},
        "train_ensemble": {
            "n_models": 2,
            "epochs": 1,
            "batch_size": 16,
            "architecture": {
                "cutoff": 4.0,
                "hidden_irreps": "4x0e + 2x1o",
                "n_layers": 1,
                "lmax": 1,
                "radial_mlp_size": 8,
            },
        },
        "select": {"lo": 0.0, "hi": 1000.0, "max_selected": 200},
        "label": {"backend": "ase", "calculator": "emt"},
    }


#: 200 initial cells, a pool of 6000 candidates and 20 labelled held-out cells (EMT, 16 atoms).
SCALE_STRUCTURES = """
import sys
from pathlib import Path
import ase.io
import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from nequix_fw.exploration import distorted_copies
work = Path(sys.argv[1])
cells = []
for k, (el, a) in enumerate([("Cu", 3.61), ("Ni", 3.52), ("Al", 4.05)]):
    cell = bulk(el, "fcc", a=a, cubic=True).repeat((2, 2, 1))
    cells += distorted_copies(cell, 2100, rattle_std=0.1, strain_max=0.03, seed=k)
cells = [cells[i] for i in np.random.default_rng(0).permutation(len(cells))]
for name, part in (("initial_structures", cells[:200]), ("candidates", cells[200:6200])):
    (work / name).mkdir(exist_ok=True)
    ase.io.write(work / name / "cells.extxyz", part)
held_out = cells[6200:6220]
for a in held_out:
    a.calc = EMT(); a.get_forces(); a.get_stress()
(work / "validation_set").mkdir(exist_ok=True)
ase.io.write(work / "validation_set" / "cells.extxyz", held_out)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-iterations", type=int, default=3)
    p.add_argument("--keep", help="run in this directory and keep it (default: a temp dir)")
    p.add_argument("--demo-run", help="read the database of a finished `make demo` instead")
    p.add_argument("--scale", action="store_true", help="20 iterations x 200 labels (issue 22)")
    p.add_argument(
        "--launches-per-worker",
        type=int,
        help="a fresh rlaunch process every N Fireworks (default: one for the whole campaign)",
    )
    args = p.parse_args()
    if args.scale and "--max-iterations" not in sys.argv:
        args.max_iterations = 19  # iterations 0-19
    nfw = BIN / "nequix-fw"
    if args.demo_run:
        demo = Path(args.demo_run).resolve()
        _run(
            [
                nfw,
                "db",
                "start",
                "--dir",
                demo / "db",
                "--launchpad",
                demo / "my_launchpad.yaml",
                "--name",
                "nequix_fw_demo",
            ],
            demo,
        )
        try:
            report(iterations(LaunchPad.from_file(str(demo / "my_launchpad.yaml"))))
        finally:
            _run([nfw, "db", "stop", "--dir", demo / "db"], demo)
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_overhead_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = BIN / "python"
    if args.scale:
        cfg = scale_inputs(work, py, args.max_iterations)
    else:
        for kind, out in (
            ("initial", "initial_structures"),
            ("candidates", "candidates"),
            ("testset", "validation_set"),
        ):
            _run([py, ROOT / "examples" / "make_structures.py", kind, work / out], work)
        cfg = yaml.safe_load((ROOT / "workflows" / "emt_cu_au.yaml").read_text())
        cfg["campaign"]["max_iterations"] = args.max_iterations
        cfg["campaign"]["target_force_rmse"] = None
    (work / "campaign.yaml").write_text(yaml.safe_dump(cfg))
    _run(
        [
            nfw,
            "db",
            "start",
            "--dir",
            work / "db",
            "--launchpad",
            work / "my_launchpad.yaml",
            "--name",
            "bench_overhead",
        ],
        work,
    )
    try:
        _run(
            [nfw, "campaign", "--config", "campaign.yaml", "--launchpad", "my_launchpad.yaml"], work
        )
        rlaunch = [BIN / "rlaunch", "-l", "my_launchpad.yaml", "rapidfire"]
        if args.launches_per_worker:  # a fresh worker process every N Fireworks
            lp = LaunchPad.from_file(str(work / "my_launchpad.yaml"))
            while lp.future_run_exists():
                # the worker also ends after a few seconds with nothing to run
                more = ["--nlaunches", args.launches_per_worker, "--max_loops", 3, "--sleep", 1]
                _run([*rlaunch, *more], work)
        else:
            _run(rlaunch, work)
        report(iterations(LaunchPad.from_file(str(work / "my_launchpad.yaml"))))
    finally:
        _run([nfw, "db", "stop", "--dir", work / "db"], work)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
