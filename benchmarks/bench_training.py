"""Ensemble training: members in sequence vs in parallel processes; member strategies.

Data: EMT-labelled, rattled/strained 32-atom fcc Cu cells with random Au substitutions (200 for
training, 50 held out). Trains a 4-member ensemble of the default (small) architecture for a
fixed number of epochs, once with members in sequence and once in parallel processes, and prints
wall time per member, compile share (first epoch minus a typical epoch), structures/s, peak
memory and the held-out force RMSE. `--strategies` also compares how members differ
(seeds / splits / bootstrap) by the held-out Spearman correlation between `max_force_dev` and the
true max force error. `--compilation-cache` instead times what each training process of a
campaign (one per iteration's Firework) pays to compile: `nequix-fw train-ensemble` (1 member,
1 epoch) in a fresh process without the persistent compilation cache, with an empty one, and
with the one the previous process filled.

Usage: python benchmarks/bench_training.py [--epochs 5] [--workers 2] [--strategies]
       python benchmarks/bench_training.py --compilation-cache
"""

from __future__ import annotations

import argparse
import csv
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def emt_set(n: int, seed: int):
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    from nequix_fw.exploration import distorted_copies

    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    out = []
    for a in distorted_copies(base, n, rattle_std=0.12, strain_max=0.03, seed=seed):
        a.numbers[rng.choice(len(a), size=rng.integers(0, 9), replace=False)] = 79
        a.calc = EMT()
        labels = dict(energy=a.get_potential_energy(), forces=a.get_forces(), stress=a.get_stress())
        a.calc = SinglePointCalculator(a, **labels)
        out.append(a)
    return out


def held_out(outdir: Path, test_path: Path) -> dict:
    from nequix_fw.validation import validate

    rep = validate(
        sorted(outdir.glob("member_*.nqx")), [test_path], outdir / "val.json", plots=False
    )
    return {
        "force_rmse": rep["ensemble_mean"]["forces_eV_per_A"]["rmse"],
        "spearman": rep["uncertainty"]["spearman_max_force_dev_vs_max_force_error"],
    }


def run(train: Path, test: Path, outdir: Path, **overrides) -> dict:
    from nequix_fw.settings import TrainingSettings
    from nequix_fw.training import train_ensemble

    settings = TrainingSettings(patience=None, **overrides)
    t0 = time.perf_counter()
    metas = train_ensemble([train], outdir, settings, progress=False)
    wall = time.perf_counter() - t0
    compile_share = []
    for m in metas:
        rows = list(csv.DictReader((outdir / f"member_{m['member']}_log.csv").open()))
        t = [float(r["epoch_s"]) for r in rows]
        compile_share.append(max(t[0] - float(np.median(t[1:])), 0.0) / sum(t) if len(t) > 1 else 0)
    n_train = metas[0]["n_train"]
    return {
        "wall_s": wall,
        "per_member_s": [m["wall_time_s"] for m in metas],
        "compile_share": float(np.mean(compile_share)),
        "structures_per_s": n_train * settings.epochs * len(metas) / wall,
        "peak_rss_mb": max(  # this process, or the largest worker process
            resource.getrusage(who).ru_maxrss / 1024
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        ),
        **held_out(outdir, test),
    }


def compilation_cache(train: Path, tmp: Path) -> None:
    """Wall time of a fresh `train-ensemble` process: no cache, an empty cache, a filled one."""
    nfw = Path(sys.executable).parent / "nequix-fw"
    rows = []
    for name, cache in (
        ("no cache", None),
        ("empty cache", tmp / "cache"),
        ("filled cache", tmp / "cache"),
    ):
        cfg = tmp / "train.yaml"
        cfg.write_text(f"train_ensemble: {{compilation_cache_dir: {cache or 'null'}}}\n")
        t0 = time.perf_counter()
        subprocess.run(
            [
                nfw,
                "train-ensemble",
                "--dataset",
                train,
                "--outdir",
                tmp / "m",
                "--config",
                cfg,
                "--n-models",
                "1",
                "--epochs",
                "1",
                "--no-progress",
                "--overwrite",
                "--no-torch",
            ],
            check=True,
            capture_output=True,
        )
        rows.append((name, time.perf_counter() - t0))
    print("train-ensemble, 1 member, 1 epoch, default architecture, a fresh process each")
    print(f"{'':14s}{'wall (s)':>9s}{'saved':>7s}")
    for name, wall in rows:
        print(f"{name:14s}{wall:9.1f}{rows[0][1] - wall:7.1f}")


def main() -> None:
    import ase.io

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--strategies", action="store_true")
    p.add_argument("--compilation-cache", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ase.io.write(tmp / "train.extxyz", emt_set(args.n_train, 0))
        if args.compilation_cache:
            return compilation_cache(tmp / "train.extxyz", tmp)
        ase.io.write(tmp / "test.extxyz", emt_set(50, 1))
        common = dict(n_models=4, epochs=args.epochs, batch_size=4)
        rows = {
            "sequential": run(tmp / "train.extxyz", tmp / "test.extxyz", tmp / "seq", **common),
            f"parallel x{args.workers}": run(
                tmp / "train.extxyz",
                tmp / "test.extxyz",
                tmp / "par",
                n_workers=args.workers,
                **common,
            ),
        }
        if args.strategies:
            for strategy in ("seeds", "splits", "bootstrap"):
                rows[f"strategy {strategy}"] = run(
                    tmp / "train.extxyz",
                    tmp / "test.extxyz",
                    tmp / strategy,
                    strategy=strategy,
                    n_workers=args.workers,
                    **common,
                )
    print(f"4 members, {args.n_train} structures of 32 atoms, {args.epochs} epochs")
    head = f"{'':20s}{'wall (s)':>9s}{'s/member':>9s}{'compile':>8s}{'struct/s':>9s}"
    print(head + f"{'RSS (MB)':>9s}{'F RMSE':>8s}{'Spearman':>9s}")
    for name, r in rows.items():
        print(
            f"{name:20s}{r['wall_s']:9.1f}{np.mean(r['per_member_s']):9.1f}"
            f"{100 * r['compile_share']:7.0f}%{r['structures_per_s']:9.1f}{r['peak_rss_mb']:9.0f}"
            f"{r['force_rmse']:8.3f}{r['spearman']:9.2f}"
        )


if __name__ == "__main__":
    main()
