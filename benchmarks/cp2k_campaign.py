"""The CP2K preset campaign (`workflows/cp2k_si.yaml`) run for real: silicon labelled by CP2K
(Debian's cp2k.psmp through custodian), Nequix fine-tuned from nequix-mp-1, on a local MongoDB
server through `lpad` and `rlaunch rapidfire`. Prints the campaign's table (labels, errors,
structural checks against the E-V set CP2K labels once) and the wall time of each stage per
iteration.

    python benchmarks/cp2k_campaign.py [--workdir cp2k_run] [--max-iterations 2]
        [--property-exploration 0]

The inputs are made here, from seeds nothing else uses: 6 initial Si8 cells (strained up to
2 %, rattled 0.03-0.1 Å), a held-out set of 6 more (the ideal cell first), labelled with the
campaign's own CP2K settings before the campaign starts, and the ideal cubic cell
(`si8_ideal.vasp`) whose E-V curve, elastic constants and phonons the checks compare.
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
PRESET = ROOT / "workflows" / "cp2k_si.yaml"
STAGES = (
    "label",
    "update_dataset",
    "train_ensemble",
    "validate",
    "explore",
    "run_ensemble",
    "select",
)


def si_cells(n: int, seed: int, ideal_first: bool = False) -> list:
    """Si8 diamond cells (a = 5.47 Å) strained isotropically by up to 2 % and rattled."""
    rng = np.random.default_rng(seed)
    cells = []
    for i in range(n):
        a = bulk("Si", "diamond", a=5.47, cubic=True)
        if not (ideal_first and i == 0):
            a.set_cell(a.cell[:] * (1 + rng.uniform(-0.02, 0.02)), scale_atoms=True)
            a.positions += rng.normal(0, rng.uniform(0.03, 0.1), a.positions.shape)
        cells.append(a)
    return cells


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
    p.add_argument("--workdir", type=Path, default=Path("cp2k_run"))
    p.add_argument("--max-iterations", type=int, help="override the preset's max_iterations")
    p.add_argument(
        "--property-exploration",
        type=int,
        help="override campaign.property_exploration (0: off, for the comparison run)",
    )
    args = p.parse_args()
    if shutil.which("cp2k.psmp") is None:
        sys.exit("cp2k.psmp not found: install Debian's cp2k (make sysdeps)")
    work = args.workdir.resolve()
    if work.exists():
        sys.exit(f"{work} exists: give another --workdir")
    work.mkdir(parents=True)
    nfw = BIN / "nequix-fw"
    settings = yaml.safe_load(PRESET.read_text())
    if args.max_iterations is not None:
        settings["campaign"]["max_iterations"] = args.max_iterations
    if args.property_exploration is not None:
        settings["campaign"]["property_exploration"] = args.property_exploration
    (work / "campaign.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (work / "initial_structures").mkdir()
    (work / "validation_structures").mkdir()
    for i, a in enumerate(si_cells(6, seed=101)):
        ase.io.write(work / "initial_structures" / f"si8_{i}.vasp", a, format="vasp")
    for i, a in enumerate(si_cells(6, seed=202, ideal_first=True)):
        ase.io.write(work / "validation_structures" / f"si8_{i}.vasp", a, format="vasp")
    ase.io.write(work / "si8_ideal.vasp", si_cells(1, seed=0, ideal_first=True)[0], format="vasp")
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
            "cp2k_si",
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
    print("| iteration | " + " | ".join(STAGES) + " |")
    print("| ---: |" + " ---: |" * len(STAGES))
    for k in sorted(times):
        cells = [f"{times[k][s]:.0f}" if s in times[k] else "-" for s in STAGES]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("(seconds of each stage's launches; validate 0 includes labelling the E-V set)")


if __name__ == "__main__":
    main()
