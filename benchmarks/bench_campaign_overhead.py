"""The FireWorks and database share of a campaign's wall time, per iteration.

Runs the demo campaign (`workflows/emt_cu_au.yaml`, EMT labels, small Nequix ensembles) through
`rlaunch rapidfire` on a local MongoDB server (`nequix-fw db start`), then reads the launches:
an iteration's wall time runs from its first Firework's start to its last one's end; its stage
time is the sum of the FireTasks' own `task_wall_s` (the science, store writes included); the
rest (reservations, launch bookkeeping, Firework and workflow updates, the gaps between
launches) is what FireWorks and the database cost. Target (issue 11): under 5% per iteration.

    python benchmarks/bench_campaign_overhead.py [--max-iterations 3] [--keep DIR]
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
    """Per iteration: its first start and last end, the sum of its stages' own time and its
    number of Fireworks, from the completed launches."""
    names = {f["fw_id"]: f["name"] for f in lp.fireworks.find({}, {"fw_id": 1, "name": 1})}
    its: dict[int, dict] = {}
    for launch in lp.launches.find({"state": "COMPLETED"}):
        k = int(names[launch["fw_id"]].split()[-1].split(".")[0])
        times = {h["state"]: _time(h["created_on"]) for h in launch["state_history"]}
        it = its.setdefault(
            k, {"start": times["RUNNING"], "end": times["COMPLETED"], "stages": 0.0, "n": 0}
        )
        it["start"] = min(it["start"], times["RUNNING"])
        it["end"] = max(it["end"], times["COMPLETED"])
        it["stages"] += launch["action"]["stored_data"]["task_wall_s"]
        it["n"] += 1
    return its


def report(its: dict[int, dict]) -> None:
    print(f"\ncampaign of {len(its)} iterations ({os.cpu_count()} CPUs)\n")
    print("| iteration | Fireworks | wall (s) | stages (s) | FireWorks + database (s) | share |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in sorted(its):
        it = its[k]
        wall = (it["end"] - it["start"]).total_seconds()
        rest = wall - it["stages"]
        print(
            f"| {k} | {it['n']} | {wall:.1f} | {it['stages']:.1f} | {rest:.2f} | "
            f"{100 * rest / wall:.1f}% |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-iterations", type=int, default=3)
    p.add_argument("--keep", help="run in this directory and keep it (default: a temp dir)")
    p.add_argument("--demo-run", help="read the database of a finished `make demo` instead")
    args = p.parse_args()
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
        _run([BIN / "rlaunch", "-l", "my_launchpad.yaml", "rapidfire"], work)
        report(iterations(LaunchPad.from_file(str(work / "my_launchpad.yaml"))))
    finally:
        _run([nfw, "db", "stop", "--dir", work / "db"], work)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
