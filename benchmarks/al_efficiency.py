"""Does our selection need fewer labels than random? Pool-mode active learning with EMT as the
oracle on Cu-Au, three arms side by side.

The pool: EMT MD frames of 32-atom Cu-Au cells (0-50 % Au) at 300, 900 and 1500 K, plus
strained and rattled cells. Every arm starts from the same small labelled set and adds the same
number of labels per iteration, with the same training settings:

- *uncertainty*: the product's selection (`run-ensemble` + `select`: candidates above `lo`,
  farthest-point sampling relative to the training set);
- *uncertainty_weighted*: the same, each pick the candidate of largest max_force_dev x
  distance (`select.diverse_weighting: uncertainty`), not the farthest alone;
- *weighted_llpr*: that, with members that also carry LLPR heads (`train_ensemble.uncertainty:
  llpr`);
- *random*: `select.method: random` (the control);
- *every_nth*: every N-th pool structure in pool order (what a user without an ensemble does).

Two held-out sets from other seeds than the pool: *in-distribution* (the pool's mix) and *tail*
(1500 K MD, cells rattled by 0.2 Å, a vacancy, a (111) surface slab). Each iteration records the
ensemble mean's force and energy RMSE on both, and the Spearman correlation and ROC AUC of
`max_force_dev` against the true max force error (`validate`). At the end, the MD stability of
each arm's final ensemble at 1500 K from the tail set's bulk starts. Prints the tables, writes
`al_efficiency.json` and `al_efficiency.png` (learning curves) into `--output`.

Usage: python benchmarks/al_efficiency.py [--quick] [--seeds 0 1 2] [--arms ...] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms, units
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

from nequix_fw.exploration import distorted_copies

ARMS = (
    "uncertainty",
    "uncertainty_learned",
    "uncertainty_weighted",
    "weighted_llpr",
    "random",
    "every_nth",
)


def _alloy(rng: np.random.Generator, au_fraction: float) -> Atoms:
    a = bulk("Cu", "fcc", a=3.61 + 0.47 * au_fraction, cubic=True).repeat((2, 2, 2))
    n_au = int(round(au_fraction * len(a)))
    a.numbers[rng.choice(len(a), n_au, replace=False)] = 79
    return a


def _md(start: Atoms, temperature: float, n: int, rng, every: int = 40) -> list[Atoms]:
    a = start.copy()
    a.calc = EMT()
    thermalize_momenta(a, temperature, rng=rng)
    dyn = Langevin(a, 2 * units.fs, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False)
    out = []
    for _ in range(n):
        dyn.run(every)
        out.append(Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc))
    return out


def structures(kind: str, seed: int, scale: int) -> list[Atoms]:
    """The pool or a held-out set (`kind`: pool, in_dist, tail), EMT-labelled."""
    rng = np.random.default_rng(seed)
    out: list[Atoms] = []
    fractions = (0.0, 0.125, 0.25, 0.5)
    if kind in ("pool", "in_dist"):
        for x in fractions:
            start = _alloy(rng, x)
            for t in (300, 900, 1500):
                out += _md(start, t, scale, rng)
            for rattle in np.linspace(0.02, 0.2, scale):  # mild to strong
                out += distorted_copies(
                    start, 1, rattle_std=rattle, strain_max=0.05, seed=int(rng.integers(1 << 30))
                )
    else:  # the tail: hotter, more distorted, defects and a surface
        for x in fractions:
            start = _alloy(rng, x)
            out += _md(start, 1500, max(2, scale // 2), rng)
            out += distorted_copies(
                start,
                max(2, scale // 2),
                rattle_std=0.2,
                strain_max=0.05,
                seed=int(rng.integers(1 << 30)),
            )
            vac = start.copy()
            del vac[int(rng.integers(len(vac)))]
            out += _md(vac, 900, 2, rng)
        slab = fcc111("Cu", size=(2, 2, 4), a=3.61, vacuum=6.0, periodic=True)
        slab.numbers[rng.choice(len(slab), 4, replace=False)] = 79
        out += _md(slab, 600, 4, rng)
    return _label(out)


def _validate(models: list[Path], testset: Path, out: Path) -> dict:
    from nequix_fw.validation import validate

    r = validate([str(m) for m in models], [testset], out, plots=False)
    q = r.get("uncertainty") or {}
    mean = r["ensemble_mean"]
    return {
        "force_rmse": mean["forces_eV_per_A"]["rmse"],
        "energy_rmse_meV": mean["energy_per_atom_meV"]["rmse"],
        "spearman": q.get("spearman_max_force_dev_vs_max_force_error"),
        "roc_auc": q.get("roc_auc"),
    }


def _label(frames: list[Atoms]) -> list[Atoms]:
    """`frames` with EMT's energy, forces and (periodic cells) stress as single-point labels."""
    for a in frames:
        a.calc = EMT()
        labels = dict(energy=a.get_potential_energy(), forces=a.get_forces())
        if a.pbc.all():
            labels["stress"] = a.get_stress()
        a.calc = SinglePointCalculator(a, **labels)
    return frames


def _stability(models: list[Path], sets: dict[str, Path], args) -> float:
    """Fraction of NVT runs at 1500 K of the ensemble mean, from the tail set's bulk
    structures, that stay physical for `args.md_steps` steps."""
    from nequix_fw.ensemble import Ensemble
    from nequix_fw.settings import ValidationSettings
    from nequix_fw.validation import md_stability

    starts = [a for a in ase.io.read(sets["tail"], ":") if a.pbc.all()][: args.md_runs]
    s = ValidationSettings(
        md_stability=True, md_temperature_K=1500, md_steps=args.md_steps, md_n_runs=len(starts)
    )
    return md_stability(starts, Ensemble.from_specs(models), s)["stable_fraction"]


def _train_point(
    d: Path,
    train: list[Atoms],
    previous: Path | None,
    sets: dict[str, Path],
    seed: int,
    args,
    arm: str = "",
) -> tuple[list[Path], dict]:
    """Train the ensemble on `train` into `d`/models; validate it on the held-out sets."""
    from nequix_fw.settings import ArchitectureSettings, TrainingSettings
    from nequix_fw.training import train_ensemble

    d.mkdir(parents=True, exist_ok=True)
    ase.io.write(d / "train.extxyz", train)
    arch = ArchitectureSettings(
        hidden_irreps="16x0e + 8x1o", n_layers=2, lmax=1, radial_mlp_size=16
    )
    training = TrainingSettings(
        n_models=args.members,
        epochs=args.epochs,
        batch_size=4,
        patience=15,
        seed=seed,
        architecture=arch,
        uncertainty="llpr" if arm.endswith("_llpr") else "ensemble",
    )
    t0 = time.perf_counter()
    train_ensemble(
        [d / "train.extxyz"],
        d / "models",
        training,
        warm_start=previous,
        overwrite=True,
        progress=False,
    )
    models = sorted((d / "models").glob("member_*.nqx"))
    point = {"labels": len(train), "train_s": time.perf_counter() - t0}
    for name, path in sets.items():
        point[name] = _validate(models, path, d / f"validate_{name}.json")
    return models, point


def _selection(arm: str, seed: int, it: int, n: int, **kw):
    from nequix_fw.settings import SelectionSettings

    return SelectionSettings(
        method="random" if arm == "random" else "uncertainty",
        seed=seed * 1000 + it,
        lo=0.0,
        max_selected=n,
        diverse=arm not in ("random", "every_nth"),
        diverse_weighting="uncertainty" if "weighted" in arm else "none",
        descriptor="learned" if arm == "uncertainty_learned" else "structure",
        format="extxyz",
        **kw,
    )


def run_arm(
    arm: str, seed: int, pool: list[Atoms], sets: dict[str, Path], work: Path, args
) -> dict:
    """Pool mode, one arm, one seed: iterations of train -> validate -> select -> label."""
    from nequix_fw.evaluation import run_ensemble
    from nequix_fw.selection import select_from_results

    rng = np.random.default_rng(seed)
    labelled = sorted(rng.choice(len(pool), args.initial, replace=False).tolist())
    curve = []
    previous = None
    for it in range(args.iterations + 1):
        d = work / f"{arm}_s{seed}" / f"iter_{it}"
        models, point = _train_point(
            d, [pool[i] for i in labelled], previous, sets, seed, args, arm
        )
        previous = d / "models"
        curve.append({"iteration": it, **point})
        print(
            f"  {arm} seed {seed} it {it}: {len(labelled)} labels, force RMSE "
            f"{point['in_dist']['force_rmse']:.3f} / {point['tail']['force_rmse']:.3f} eV/Å "
            f"(in-dist / tail)",
            flush=True,
        )
        if it == args.iterations:
            break
        unlabelled = [i for i in range(len(pool)) if i not in set(labelled)]
        if arm == "every_nth":
            step = max(1, len(unlabelled) // args.per_iteration)
            picks = unlabelled[::step][: args.per_iteration]
        else:
            ase.io.write(d / "pool.extxyz", [pool[i] for i in unlabelled])
            run_ensemble(
                [str(m) for m in models], [d / "pool.extxyz"], d / "pool.json", progress=False
            )
            sel = _selection(arm, seed, it, args.per_iteration)
            manifest = select_from_results(
                d / "pool.json", d / "selected", sel, training_set=[pool[i] for i in labelled]
            )
            # frames of pool.extxyz, i.e. positions in `unlabelled`
            picks = [unlabelled[e["frame"]] for e in manifest["structures"] if e["selected"]]
        labelled = sorted(set(labelled) | set(picks))
    md = _stability(models, sets, args) if args.md_steps else None
    return {
        "mode": "pool",
        "arm": arm,
        "seed": seed,
        "curve": curve,
        "md_stable_fraction_1500K": md,
    }


def initial_set(seed: int, n: int) -> list[Atoms]:
    """`n` mildly distorted cells (the 4 compositions in turn), EMT-labelled: what a user
    starts an exploration campaign from."""
    rng = np.random.default_rng(seed)
    fractions = (0.0, 0.125, 0.25, 0.5)
    out = []
    for k in range(n):
        start = _alloy(rng, fractions[k % len(fractions)])
        out += distorted_copies(
            start, 1, rattle_std=0.03, strain_max=0.01, seed=int(rng.integers(1 << 30))
        )
    return _label(out)


def run_explore_arm(arm: str, seed: int, sets: dict[str, Path], work: Path, args) -> dict:
    """Exploration mode, one arm, one seed: each iteration trains, validates (errors and MD
    stability at 1500 K), explores with its own ensemble (NVT at 300/900/1500 K from the four
    ideal alloy cells, stopping where the uncertainty passes `explore.stop_force_dev`),
    selects from the frames by the arm's method and labels the picks with EMT."""
    from nequix_fw.ensemble import Ensemble
    from nequix_fw.evaluation import run_ensemble
    from nequix_fw.exploration import explore
    from nequix_fw.selection import select_from_results
    from nequix_fw.settings import ExplorationSettings
    from nequix_fw.structures import Frame

    rng = np.random.default_rng(10_000 + seed)
    starts = [Frame(_alloy(rng, x), "start", k) for k, x in enumerate((0.0, 0.125, 0.25, 0.5))]
    train = initial_set(20_000 + seed, args.initial)
    curve = []
    previous = None
    for it in range(args.iterations + 1):
        d = work / f"explore_{arm}_s{seed}" / f"iter_{it}"
        models, point = _train_point(d, train, previous, sets, seed, args, arm)
        previous = d / "models"
        point["md_stable_fraction_1500K"] = _stability(models, sets, args)
        curve.append({"iteration": it, **point})
        print(
            f"  explore {arm} seed {seed} it {it}: {len(train)} labels, force RMSE "
            f"{point['in_dist']['force_rmse']:.3f} / {point['tail']['force_rmse']:.3f} eV/Å "
            f"(in-dist / tail), MD stable {point['md_stable_fraction_1500K']:.2f}",
            flush=True,
        )
        if it == args.iterations:
            break
        ensemble = Ensemble.from_specs(models)
        settings = ExplorationSettings(
            temperatures_K=[300.0, 900.0, 1500.0],
            steps=args.explore_steps,
            sample_every=20,
            thermostat="langevin",
            seeds=[seed * 100 + it],
            stop_force_dev=args.explore_hi,
        )
        manifest = explore(ensemble, starts, d / "explore", settings, progress=False)
        curve[-1]["explored_frames"] = len(manifest["frames"])
        run_ensemble(
            [str(m) for m in models],
            [d / "explore" / "candidates.extxyz"],
            d / "candidates.json",
            progress=False,
        )
        sel = _selection(arm, seed, it, args.per_iteration, min_distance_A=1.5)
        chosen = select_from_results(d / "candidates.json", d / "selected", sel, training_set=train)
        picked = [
            ase.io.read(d / "selected" / e["file"]) for e in chosen["structures"] if e["selected"]
        ]
        train = train + _label(picked)
    return {
        "mode": "explore",
        "arm": arm,
        "seed": seed,
        "curve": curve,
        "md_stable_fraction_1500K": curve[-1]["md_stable_fraction_1500K"],
    }


def labels_to_reach(curve: list[dict], target: float, which: str) -> float | None:
    """Labels at which the force RMSE first falls to `target` (linear between iterations)."""
    pts = [(c["labels"], c[which]["force_rmse"]) for c in curve]
    for (n0, e0), (n1, e1) in zip(pts[:-1], pts[1:], strict=True):
        if e0 <= target:
            return float(n0)
        if e1 <= target:
            return n0 + (n1 - n0) * (e0 - target) / (e0 - e1)
    return float(pts[-1][0]) if pts[-1][1] <= target else None


def labels_to_stable(curve: list[dict]) -> float | None:
    """Labels at the first iteration whose every MD run at 1500 K stayed physical."""
    return next((float(c["labels"]) for c in curve if c["md_stable_fraction_1500K"] == 1.0), None)


def _ms(values) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def _mean_labels(values: list[float | None]) -> str:
    got = [x for x in values if x is not None]
    return f"{np.mean(got):.0f} ({len(got)}/{len(values)} seeds)" if got else "not reached"


def report(results: list[dict], out: Path) -> None:
    """Learning curves (PNG, one row per mode) and the tables of each mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("pool", "explore") if any(r["mode"] == m for r in results)]
    fig, axes = plt.subplots(len(modes), 4, figsize=(20, 4 * len(modes)), squeeze=False)
    colours = dict(zip(ARMS, ("C0", "C3", "C4", "C5", "C1", "C2"), strict=True))
    for row, mode in zip(axes, modes, strict=True):
        rs = [r for r in results if r["mode"] == mode]
        for r in rs:
            c = r["curve"]
            n = [p["labels"] for p in c]
            kw = dict(
                color=colours[r["arm"]],
                alpha=0.8,
                label=r["arm"] if r["seed"] == rs[0]["seed"] else None,
            )
            row[0].plot(n, [p["in_dist"]["force_rmse"] for p in c], "o-", **kw)
            row[1].plot(n, [p["tail"]["force_rmse"] for p in c], "o-", **kw)
            row[2].plot(n, [p["in_dist"]["energy_rmse_meV"] for p in c], "o-", **kw)
            if mode == "explore":
                row[3].plot(n, [p["md_stable_fraction_1500K"] for p in c], "o-", **kw)
        titles = ("forces, in-distribution", "forces, tail", "energies, in-distribution")
        for ax, title, unit in zip(row, titles, ("eV/Å", "eV/Å", "meV/atom"), strict=False):
            ax.set(xlabel="labels", ylabel=f"RMSE ({unit})", title=f"{mode}: {title}", yscale="log")
            ax.legend()
        if mode == "explore":
            row[3].set(
                xlabel="labels",
                ylabel="fraction stable",
                ylim=(-0.05, 1.05),
                title="explore: MD stable at 1500 K",
            )
            row[3].legend()
        else:
            row[3].axis("off")
    fig.tight_layout()
    fig.savefig(out / "al_efficiency.png", dpi=120)
    for mode in modes:
        print(f"\n{mode} mode (mean ± std over seeds)\n")
        # label savings: the labels each arm needs to reach the final in-distribution RMSE of
        # random (same seed), which random reaches at its full budget
        match = {
            r["seed"]: r["curve"][-1]["in_dist"]["force_rmse"]
            for r in results
            if r["arm"] == "random" and r["mode"] == mode
        }
        print(
            "| arm | seeds | final force RMSE in-dist (eV/Å) | tail (eV/Å) | energy in-dist "
            "(meV/atom) | labels to random's final in-dist RMSE | labels to 0.10 eV/Å "
            "(tail) | labels to 0.05 (tail) | Spearman (last) | ROC AUC (last) | MD stable "
            "1500 K (final) | labels to all stable |"
        )
        print(
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        )
        for arm in ARMS:
            rs = [r for r in results if r["arm"] == arm and r["mode"] == mode]
            if not rs:
                continue
            last = [r["curve"][-1] for r in rs]
            savings = _mean_labels(
                [
                    labels_to_reach(r["curve"], match[r["seed"]], "in_dist")
                    if r["seed"] in match
                    else None
                    for r in rs
                ]
            )
            stable = (
                _mean_labels([labels_to_stable(r["curve"]) for r in rs])
                if mode == "explore"
                else "n/a"
            )
            print(
                f"| {arm} | {len(rs)} | {_ms(p['in_dist']['force_rmse'] for p in last)} | "
                f"{_ms(p['tail']['force_rmse'] for p in last)} | "
                f"{_ms(p['in_dist']['energy_rmse_meV'] for p in last)} | {savings} | "
                f"{_mean_labels([labels_to_reach(r['curve'], 0.10, 'tail') for r in rs])} | "
                f"{_mean_labels([labels_to_reach(r['curve'], 0.05, 'tail') for r in rs])} | "
                f"{_ms(p['in_dist']['spearman'] for p in last)} | "
                f"{_ms(p['in_dist']['roc_auc'] for p in last)} | "
                f"{_ms(r['md_stable_fraction_1500K'] for r in rs)} | {stable} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["pool", "explore"], default="pool")
    p.add_argument("--quick", action="store_true", help="a few minutes: 1 seed, small everything")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (--quick: 0)")
    p.add_argument("--arms", nargs="+", choices=ARMS, help="default: all (explore: no every_nth)")
    p.add_argument("--output", default="al_efficiency")
    p.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="only print the tables and plot of earlier runs (their al_efficiency.json)",
    )
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        results = [r for f in args.report for r in json.loads(Path(f).read_text())]
        report([{"mode": "pool", **r} for r in results], out)
        return
    args.scale, args.initial, args.iterations, args.per_iteration = 16, 12, 4, 12
    args.members, args.epochs, args.md_steps, args.md_runs = 3, 40, 1500, 8
    args.explore_steps, args.explore_hi = 500, 2.0
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.arms is None:
        args.arms = [a for a in ARMS if args.mode == "pool" or a != "every_nth"]
    if args.quick:
        args.scale, args.iterations, args.per_iteration = 4, 2, 8
        args.members, args.epochs, args.md_steps, args.md_runs = 2, 20, 500, 4
        args.explore_steps = 200
    t0 = time.perf_counter()
    sets = {}
    for name, seed in (("in_dist", 2000), ("tail", 3000)):
        sets[name] = out / f"{name}.extxyz"
        ase.io.write(sets[name], structures(name, seed, args.scale))
    sizes = ", ".join(f"{k} {len(ase.io.read(v, index=':'))}" for k, v in sets.items())
    pool = structures("pool", 1000, args.scale) if args.mode == "pool" else []
    print(
        f"{args.mode} mode: pool {len(pool)} structures; held-out {sizes}; {args.initial} "
        f"initial labels + {args.iterations} x {args.per_iteration}"
    )
    results = []
    for seed in args.seeds:
        for arm in args.arms:
            if args.mode == "pool":
                results.append(run_arm(arm, seed, pool, sets, out / "runs", args))
            else:
                results.append(run_explore_arm(arm, seed, sets, out / "runs", args))
            (out / "al_efficiency.json").write_text(json.dumps(results, indent=1))
    report(results, out)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; plots: {out / 'al_efficiency.png'}")


if __name__ == "__main__":
    main()
