"""Property-driven campaigns on many systems with default settings: do V0, B0 and the elastic
constants converge, in how many iterations and labels?

For each fcc metal of ASE's EMT (Cu, Al, Ni, Pd, Pt, Au) and each mode (`scratch`: the presets'
small architecture trained from scratch; `finetune`: fine-tuned from nequix-mp-1), a campaign
runs through `nequix-fw campaign`, `lpad` and `rlaunch rapidfire` on a local MongoDB server,
from 6 rattled 8-atom cells at one volume, with only the tolerances (V0 0.5 %, B0 5 %, elastic
10 %), the reference (EMT) and the check structure given: every other setting is a default.

The reference values are computed here, apart from the project: EMT's lattice constant and B0
by ASE's equation of state, C11, C12 and C44 by central differences of ASE's stresses (±0.5 %).
The final ensemble is measured the same way, beside the errors the campaign recorded.

    python benchmarks/properties.py [--systems Cu Al] [--modes scratch finetune]
        [--workdir properties_run] [--max-iterations 6] [--campaign property_labels=6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.eos import EquationOfState
from ase.units import GPa

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SYSTEMS = ("Cu", "Al", "Ni", "Pd", "Pt", "Au")
TOLERANCES = {"v0_percent": 0.5, "bulk_modulus_percent": 5, "elastic_percent": 10}
#: The presets' small architecture (workflows/emt_cu_au.yaml), for the scratch mode.
SMALL = yaml.safe_load((ROOT / "workflows" / "emt_cu_au.yaml").read_text())["train_ensemble"][
    "architecture"
]
STRAIN = 0.005


def equilibrium(element: str, calc) -> tuple[float, float]:
    """The fcc lattice constant (Å) and bulk modulus (GPa) of `calc`, by ASE's E-V fit."""
    a0 = bulk(element, "fcc", cubic=True).cell[0, 0]
    volumes, energies = [], []
    for s in np.linspace(0.97, 1.03, 9):
        atoms = bulk(element, "fcc", a=a0 * s, cubic=True)
        atoms.calc = calc
        volumes.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
    v0, _, b = EquationOfState(volumes, energies).fit()
    return float((v0) ** (1 / 3)), float(b / GPa)


def cubic_elastic(element: str, a: float, calc) -> dict[str, float]:
    """C11, C12 and C44 (GPa) of the fcc cell at lattice constant `a`, by central
    differences of the stress under ±`STRAIN` (xx, then the engineering shear yz)."""

    def stress(deformation: np.ndarray) -> np.ndarray:
        atoms = bulk(element, "fcc", a=a, cubic=True)
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + deformation).T, scale_atoms=True)
        atoms.calc = calc
        return atoms.get_stress(voigt=True) / GPa

    xx, yz = np.zeros((3, 3)), np.zeros((3, 3))
    xx[0, 0] = STRAIN
    yz[1, 2] = yz[2, 1] = STRAIN / 2
    dxx = (stress(xx) - stress(-xx)) / (2 * STRAIN)
    dyz = (stress(yz) - stress(-yz)) / (2 * STRAIN)
    return {"C11": float(dxx[0]), "C12": float(dxx[1]), "C44": float(dyz[3])}


def inputs(element: str, a: float, work: Path) -> None:
    """6 rattled 8-atom cells at one volume (initial structures), 6 more labelled by EMT
    (the test set), and the ideal cubic cell of the checks."""
    rng = np.random.default_rng(7)
    for name, n in (("initial_structures", 6), ("validation_set", 6)):
        (work / name).mkdir()
        cells = []
        for _ in range(n):
            atoms = bulk(element, "fcc", a=a, cubic=True).repeat((2, 1, 1))
            atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)
            if name == "validation_set":
                atoms.calc = EMT()
                results = {
                    "energy": atoms.get_potential_energy(),
                    "forces": atoms.get_forces(),
                    "stress": atoms.get_stress(),
                }
                atoms.calc = SinglePointCalculator(atoms, **results)
            cells.append(atoms)
        ase.io.write(work / name / "cells.extxyz", cells)
    ase.io.write(work / "ideal.vasp", bulk(element, "fcc", a=a, cubic=True), format="vasp")


def settings(element: str, mode: str, max_iterations: int, overrides: dict) -> dict:
    """The campaign file: only the tolerances, the reference and the check structure (and
    `overrides` of the campaign section, for a comparison run)."""
    campaign = {
        "name": f"props_{element.lower()}_{mode}",
        "directory": "campaign",
        "initial_structures": "initial_structures",
        "testset": ["validation_set"],
        "max_iterations": max_iterations,
        "property_tolerances": TOLERANCES,
        **overrides,
    }
    out = {
        "campaign": campaign,
        "validate": {"reference": "emt", "structure": "ideal.vasp", "elastic": True},
    }
    if mode == "finetune":
        campaign["finetune_from"] = "nequix-mp-1"
    else:
        out["train_ensemble"] = {"architecture": SMALL}
    return out


def _run(cmd: list, cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True)
    return time.perf_counter() - t0


def run(element: str, mode: str, work: Path, max_iterations: int, overrides: dict) -> dict:
    """One campaign; its iterations' property errors, labels, stop reason, wall time, and the
    final ensemble's properties measured here."""
    from nequix_fw.ensemble import Ensemble, EnsembleCalculator

    work.mkdir(parents=True)
    a_ref, b_ref = equilibrium(element, EMT())
    c_ref = cubic_elastic(element, a_ref, EMT())
    inputs(element, a_ref, work)
    (work / "campaign.yaml").write_text(
        yaml.safe_dump(settings(element, mode, max_iterations, overrides))
    )
    nfw = BIN / "nequix-fw"
    db = [nfw, "db", "start", "--dir", "db", "--launchpad", "my_launchpad.yaml"]
    _run([*db, "--name", f"props_{element.lower()}_{mode}"], work)
    try:
        _run(
            [nfw, "campaign", "--config", "campaign.yaml", "--launchpad", "my_launchpad.yaml"], work
        )
        wall = _run([BIN / "rlaunch", "-l", "my_launchpad.yaml", "rapidfire"], work)
        _run([nfw, "campaign-status", "campaign"], work)
    finally:
        _run([nfw, "db", "stop", "--dir", "db"], work)
    log = json.loads((work / "campaign" / "campaign.json").read_text())["iterations"]
    last = max(it["iteration"] for it in log if it.get("dataset_size") is not None)
    members = sorted(
        str(p) for p in (work / "campaign").glob(f"iter_{last:03d}/train_ensemble/member_*.nqx")
    )
    calc = EnsembleCalculator(Ensemble.from_specs(members))
    a_m, b_m = equilibrium(element, calc)
    c_m = cubic_elastic(element, a_ref, calc)
    return {
        "system": element,
        "mode": mode + "".join(f", {k} {v}" for k, v in overrides.items()),
        "wall_s": wall,
        "iterations": [
            {
                "iteration": it["iteration"],
                "labels": it.get("dataset_size"),
                "properties": it.get("properties"),
                "stalled": sorted(it.get("stalled") or {}),
            }
            for it in log
        ],
        "stop_reason": next(
            (it["stop_reason"] for it in reversed(log) if it.get("stop_reason")), None
        ),
        "reference": {"a_A": a_ref, "B0_GPa": b_ref, **c_ref},
        "final": {"a_A": a_m, "B0_GPa": b_m, **c_m},
    }


def report(results: list[dict]) -> None:
    """Markdown: one row per run (labels and iterations to the stop, the campaign's last
    errors, the final ensemble's errors measured here), then each run's errors per iteration."""
    print(
        "| system | mode | converged | iterations | labels | V0 / B0 / elastic (campaign, %) "
        "| a / B0 / C11 / C12 / C44 (measured here, %) | wall (min) |"
    )
    print("| --- | --- | --- | ---: | ---: | --- | --- | ---: |")
    for r in results:
        its = r["iterations"]
        props = next((it["properties"] for it in reversed(its) if it["properties"]), {}) or {}
        last = [it for it in its if it["labels"] is not None][-1]
        ref, fin = r["reference"], r["final"]
        measured = " / ".join(
            f"{100 * (fin[k] - ref[k]) / ref[k]:+.1f}"
            for k in ("a_A", "B0_GPa", "C11", "C12", "C44")
        )
        campaign = " / ".join(
            "-" if props.get(k) is None else f"{props[k]:+.1f}" for k in TOLERANCES
        )
        converged = "yes" if (r["stop_reason"] or "").startswith("converged") else "no"
        print(
            f"| {r['system']} | {r['mode']} | {converged} | {last['iteration']} | {last['labels']} "
            f"| {campaign} | {measured} | {r['wall_s'] / 60:.0f} |"
        )
    for r in results:
        print(f"\n{r['system']} {r['mode']}: {r['stop_reason']}")
        for it in r["iterations"]:
            props = it["properties"] or {}
            errors = ", ".join(f"{k} {v:+.2f}" for k, v in props.items() if v is not None)
            stalled = f"; stalled: {', '.join(it['stalled'])}" if it["stalled"] else ""
            print(f"  iteration {it['iteration']}: {it['labels']} labels; {errors}{stalled}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument(
        "--modes", nargs="+", choices=("scratch", "finetune"), default=["scratch", "finetune"]
    )
    p.add_argument("--workdir", type=Path, default=Path("properties_run"))
    p.add_argument("--max-iterations", type=int, default=6)
    p.add_argument(
        "--campaign",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="campaign settings over the defaults, for a comparison run (YAML values)",
    )
    p.add_argument("--report", nargs="+", type=Path, metavar="JSON", help="only print earlier runs")
    args = p.parse_args()
    if args.report:
        report([r for f in args.report for r in json.loads(f.read_text())])
        return
    work = args.workdir.resolve()
    if work.exists():
        sys.exit(f"{work} exists: give another --workdir")
    overrides = {}
    for item in args.campaign:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--campaign {item}: give KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    results = []
    for element in args.systems:
        for mode in args.modes:
            results.append(
                run(element, mode, work / f"{element}_{mode}", args.max_iterations, overrides)
            )
            (work / "properties.json").write_text(json.dumps(results, indent=1))
    report(results)
    print(f"\n({os.cpu_count()} CPUs; results in {work / 'properties.json'})")


if __name__ == "__main__":
    main()
