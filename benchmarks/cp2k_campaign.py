"""A CP2K preset campaign run for real: silicon (`workflows/cp2k_si.yaml`) or silicon carbide
(`workflows/cp2k_sic.yaml`, `--system sic`) labelled by CP2K (Debian's cp2k.psmp through
custodian), Nequix fine-tuned from nequix-mp-1, on a local MongoDB server through `lpad` and
`rlaunch rapidfire`. Prints the campaign's table (labels, errors, property checks against the
sets CP2K labels once) and the wall time of each stage per iteration.

    python benchmarks/cp2k_campaign.py [--system si|sic] [--workdir cp2k_run]
        [--max-iterations 2] [--property-exploration 0] [--resume]

The inputs are made here, from seeds nothing else uses: 6 initial 8-atom cubic cells (strained
up to 2 %, rattled 0.03-0.1 Å), a held-out set of 6 more (the ideal cell first), labelled with
the campaign's own CP2K settings before the campaign starts, and the ideal cubic cell
(`si8_ideal.vasp`, `sic8_ideal.vasp`) whose E-V curve, elastic constants and phonons the
checks compare.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import ase.io
import numpy as np
import yaml
from ase.build import bulk
from fireworks import LaunchPad

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Per system: the preset, the file names' tag, the ideal cubic cell (a in Å, about PBE's).
SYSTEMS = {
    "si": ("cp2k_si.yaml", "si8", lambda: bulk("Si", "diamond", a=5.47, cubic=True)),
    "sic": ("cp2k_sic.yaml", "sic8", lambda: bulk("SiC", "zincblende", a=4.38, cubic=True)),
}
STAGES = (
    "label",
    "update_dataset",
    "train_ensemble",
    "validate",
    "explore",
    "run_ensemble",
    "select",
)


def strained_cells(ideal, n: int, seed: int, ideal_first: bool = False) -> list:
    """`n` copies of the `ideal()` cell strained isotropically by up to 2 % and rattled."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = ideal()
        if not (ideal_first and i == 0):
            a.set_cell(a.cell[:] * (1 + rng.uniform(-0.02, 0.02)), scale_atoms=True)
            a.positions += rng.normal(0, rng.uniform(0.03, 0.1), a.positions.shape)
        out.append(a)
    return out


def _run(cmd: list, cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True)
    return time.perf_counter() - t0


def stage_times(lp: LaunchPad) -> dict[int, dict[str, float]]:
    """Per iteration, the running time (s) of each stage's launches, FireWorks' own measure
    (labelling groups summed)."""
    names = {f["fw_id"]: f["name"] for f in lp.fireworks.find({}, {"fw_id": 1, "name": 1})}
    out: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for launch in lp.launches.find({"state": "COMPLETED"}):
        *_, stage, k = names[launch["fw_id"]].split()
        out[int(k.split(".")[0])][stage] += launch["runtime_secs"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", choices=list(SYSTEMS), default="si")
    p.add_argument("--workdir", type=Path, default=Path("cp2k_run"))
    p.add_argument("--max-iterations", type=int, help="override the preset's max_iterations")
    p.add_argument(
        "--property-exploration",
        type=int,
        help="override campaign.property_exploration (0: off, for the comparison run)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on with the campaign in an existing --workdir (after a crash or a fix): "
        "restart its database, rerun its FIZZLED Fireworks and those it left RUNNING, and "
        "launch again",
    )
    args = p.parse_args()
    if shutil.which("cp2k.psmp") is None:
        sys.exit("cp2k.psmp not found: install Debian's cp2k (make sysdeps)")
    work = args.workdir.resolve()
    nfw = BIN / "nequix-fw"
    if args.resume:
        if not (work / "my_launchpad.yaml").is_file():
            sys.exit(f"{work}: no campaign to resume (my_launchpad.yaml missing)")
        _run([nfw, "db", "start", "--dir", "db", "--launchpad", "my_launchpad.yaml"], work)
        try:
            lpad = [BIN / "lpad", "-l", "my_launchpad.yaml"]
            _run([*lpad, "rerun_fws", "-s", "FIZZLED"], work)
            _run([*lpad, "rerun_fws", "-s", "RUNNING"], work)  # those a crash left running
            t_campaign = _run([BIN / "rlaunch", "-l", "my_launchpad.yaml", "rapidfire"], work)
            _run([nfw, "campaign-status", "campaign"], work)
            times = stage_times(LaunchPad.from_file(str(work / "my_launchpad.yaml")))
        finally:
            _run([nfw, "db", "stop", "--dir", "db"], work)
        print(f"\nresumed: {t_campaign / 60:.1f} min more ({os.cpu_count()} CPUs)\n")
        print_times(times)
        return
    if work.exists():
        sys.exit(f"{work} exists: give another --workdir (or --resume)")
    work.mkdir(parents=True)
    preset, tag, ideal = SYSTEMS[args.system]
    settings = yaml.safe_load((ROOT / "workflows" / preset).read_text())
    if args.max_iterations is not None:
        settings["campaign"]["max_iterations"] = args.max_iterations
    if args.property_exploration is not None:
        settings["campaign"]["property_exploration"] = args.property_exploration
    (work / "campaign.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (work / "initial_structures").mkdir()
    (work / "validation_structures").mkdir()
    for i, a in enumerate(strained_cells(ideal, 6, seed=101)):
        ase.io.write(work / "initial_structures" / f"{tag}_{i}.vasp", a, format="vasp")
    for i, a in enumerate(strained_cells(ideal, 6, seed=202, ideal_first=True)):
        ase.io.write(work / "validation_structures" / f"{tag}_{i}.vasp", a, format="vasp")
    ase.io.write(work / f"{tag}_ideal.vasp", ideal(), format="vasp")
    today = datetime.date.today().isoformat()
    lpad = [BIN / "lpad", "-l", "my_launchpad.yaml"]
    _run(
        [
            nfw,
            "db",
            "start",
            "--dir",
            "db",
            "--launchpad",
            "my_launchpad.yaml",
            "--name",
            settings["campaign"]["name"],
        ],
        work,
    )
    try:
        t_val = _run(
            [
                nfw,
                "label",
                "--config",
                "campaign.yaml",
                "--structures",
                "validation_structures",
                "--output",
                "validation_labels",
            ],
            work,
        )
        _run(
            [nfw, "update-dataset", "--new", "validation_labels", "--dataset", "validation_set"],
            work,
        )
        _run(
            [
                nfw,
                "campaign",
                "--config",
                "campaign.yaml",
                "--launchpad",
                "my_launchpad.yaml",
                "--write",
                "wf.yaml",
            ],
            work,
        )
        _run([*lpad, "reset", "--password", today], work)
        _run([*lpad, "add", "wf.yaml"], work)
        t_campaign = _run([BIN / "rlaunch", "-l", "my_launchpad.yaml", "rapidfire"], work)
        _run([nfw, "campaign-status", "campaign"], work)
        times = stage_times(LaunchPad.from_file(str(work / "my_launchpad.yaml")))
    finally:
        _run([nfw, "db", "stop", "--dir", "db"], work)
    print(
        f"\nheld-out set labelled in {t_val:.0f} s; campaign {t_campaign / 60:.1f} min "
        f"({os.cpu_count()} CPUs)\n"
    )
    print_times(times)


def print_times(times: dict[int, dict[str, float]]) -> None:
    """The stage times as a Markdown table, one row per iteration."""
    print("| iteration | " + " | ".join(STAGES) + " |")
    print("| ---: |" + " ---: |" * len(STAGES))
    for k in sorted(times):
        row = [f"{times[k][s]:.0f}" if s in times[k] else "-" for s in STAGES]
        print(f"| {k} | " + " | ".join(row) + " |")
    print("(seconds of each stage's launches; validate 0 includes labelling the E-V set)")


if __name__ == "__main__":
    main()
