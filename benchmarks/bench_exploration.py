"""MD steps/s: the ensemble calculator vs. one `NequixCalculator` per member in turn (naive).

Langevin NVT at 600 K (2 fs) on a 32-atom and a 108-atom fcc Cu cell with a 4-member ensemble of
small random Nequix models (the default training architecture). Naive: each member is nequix's own
`NequixCalculator` (its own neighbour list, its own padded graph) called in turn, forces
averaged. Engine: `EnsembleCalculator` (one neighbour list with a skin, members stacked under
`vmap` or `lax.map`, fixed edge capacity). The first `--warmup` steps (compilation) are timed
apart; then both sides advance
in turns of 10 steps, so that noise on the machine hits both alike.

Walkers table: aggregate MD steps/s of N trajectories of one cell (different seeds) advanced as
batched walkers (`run_walkers`: every step one compiled call over all walkers) vs the path
before them, one trajectory at a time (`EnsembleCalculator`, `walkers: 1`). Each batched run
first runs `--warmup` steps (compilation, timed apart), then `--walker-steps` steps.

Usage: python benchmarks/bench_exploration.py [--steps 200] [--warmup 5] [--members 4]
       [--tables naive walkers] [--walkers 1 8 64 256] [--walker-steps 20]
       [--max-batch-atoms 30000] [--cells Cu32 Cu108] [--member-mapping auto|vmap|map]
       [--xla-option xla_gpu_autotune_level=0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from ase.units import fs


class NaiveEnsemble(Calculator):
    """The naive loop: one nequix `NequixCalculator` per member, evaluated in turn."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, paths: list[Path]):
        from nequix.calculator import NequixCalculator

        super().__init__()
        self.calcs = [
            NequixCalculator(model_path=str(p), backend="jax", use_kernel=False) for p in paths
        ]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        e, f = [], []
        for c in self.calcs:
            c.calculate(self.atoms, ["energy", "forces"], system_changes)
            e.append(c.results["energy"])
            f.append(c.results["forces"])
        self.results = {"energy": float(np.mean(e)), "forces": np.mean(f, axis=0)}


def make_md(atoms, calc):
    a = atoms.copy()
    a.calc = calc
    rng = np.random.default_rng(0)
    thermalize_momenta(a, 600.0, rng=rng)
    return Langevin(a, 2 * fs, temperature_K=600.0, friction=0.01 / fs, fixcm=False, rng=rng)


def timed(dyn, steps: int) -> float:
    t0 = time.perf_counter()
    dyn.run(steps)
    return time.perf_counter() - t0


def walker_table(paths: list[Path], args) -> None:
    """Aggregate steps/s of batched walkers vs one trajectory at a time."""
    import jax

    from nequix_fw.ensemble import Ensemble, EnsembleCalculator
    from nequix_fw.exploration import run_md
    from nequix_fw.exploration.walkers import run_nvt_walkers
    from nequix_fw.settings import EnsembleSettings, ExplorationSettings

    device = jax.devices()[0].device_kind
    xla = {k: int(v) for k, v in (o.split("=", 1) for o in args.xla_option)}
    options = {"member_mapping": args.member_mapping, "xla_options": xla or None}
    ens = Ensemble.from_specs(paths, EnsembleSettings(compilation_cache_dir=None, **options))
    # every walker runs to the end: no uncertainty or physics stops (random-weight models)
    common = dict(
        temperatures_K=[600.0],
        timestep_fs=2.0,
        check_every=args.warmup,
        sample_every=args.warmup,
        stop_force_dev=None,
        stop_min_distance_A=0.01,
        max_temperature_factor=1e6,
    )
    print(
        f"\nwalkers on {device}: {args.walker_steps} steps after {args.warmup} warm-up steps, "
        f"engine {options}"
    )
    print(
        "| cell | walkers | one at a time: steps/s | batched: walker-steps/s | speed-up | "
        "batched s/step | waiting on the ensemble | batched warm-up (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for reps in [{"Cu32": (2, 2, 2), "Cu108": (3, 3, 3)}[c] for c in args.cells]:
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
        atoms.rattle(0.02, seed=1)
        calc = EnsembleCalculator(ens)
        warm = ExplorationSettings(steps=args.warmup, **common)
        run_md(atoms, calc, 600.0, warm, seed=0)
        t0 = time.perf_counter()
        run_md(atoms, calc, 600.0, ExplorationSettings(steps=args.walker_steps, **common))
        single = args.walker_steps / (time.perf_counter() - t0)
        for n in args.walkers:
            if n * len(atoms) > args.max_batch_atoms:
                print(
                    f"| Cu{len(atoms)} | {n} | {single:.1f} | not run (> --max-batch-atoms) "
                    "| | | | |"
                )
                continue
            jobs = [(atoms, 600.0, None, seed, "bench") for seed in range(n)]
            t0 = time.perf_counter()
            run_nvt_walkers(ens, jobs, ExplorationSettings(steps=args.warmup, walkers=n, **common))
            warmup = time.perf_counter() - t0
            s = ExplorationSettings(steps=args.walker_steps, walkers=n, **common)
            t0 = time.perf_counter()
            trajs, batch = run_nvt_walkers(ens, jobs, s)
            wall = time.perf_counter() - t0
            assert all(t.stop_reason == "completed" for t in trajs), "a walker stopped early"
            rate = n * args.walker_steps / wall
            print(
                f"| Cu{len(atoms)} | {n} | {single:.1f} | {rate:.1f} | **{rate / single:.1f}x** "
                f"| {wall / args.walker_steps:.4f} | {batch.seconds / wall:.0%} | {warmup:.1f} |",
                flush=True,
            )


def main() -> None:
    from nequix_fw.ensemble import Ensemble, EnsembleCalculator
    from nequix_fw.models import new_model, save_model
    from nequix_fw.settings import ArchitectureSettings, EnsembleSettings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--members", type=int, default=4)
    p.add_argument(
        "--tables", nargs="+", choices=["naive", "walkers"], default=["naive", "walkers"]
    )
    p.add_argument("--walkers", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--walker-steps", type=int, default=20)
    p.add_argument("--cells", nargs="+", choices=["Cu32", "Cu108"], default=["Cu32", "Cu108"])
    p.add_argument("--member-mapping", choices=["auto", "vmap", "map"], default="auto")
    p.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="XLA option of the engine's compiled call (xla_options)",
    )
    p.add_argument(
        "--max-batch-atoms",
        type=int,
        default=30000,
        help="skip walker counts whose batch holds more atoms",
    )
    args = p.parse_args()
    arch = ArchitectureSettings().model_dump()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for seed in range(args.members):
            module, config = new_model([29], seed=seed, atom_energies={29: -3.7}, **arch)
            paths.append(Path(tmp) / f"m{seed}.nqx")
            save_model(paths[-1], module, config)
        settings = EnsembleSettings(compilation_cache_dir=None)
        print(
            f"{args.members} members ({arch['hidden_irreps']}, {arch['n_layers']} layers), "
            f"{args.steps} Langevin steps after {args.warmup} warm-up steps"
        )
        if "walkers" in args.tables:
            walker_table(paths, args)
        if "naive" not in args.tables:
            return
        print(
            "| cell | naive steps/s | engine steps/s | speed-up | naive warm-up (s) | "
            "engine warm-up (s) | max |Δx| (Å) |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for reps in ((2, 2, 2), (3, 3, 3)):
            atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
            atoms.rattle(0.02, seed=1)
            calc = EnsembleCalculator(Ensemble.from_specs(paths, settings))
            naive, engine = make_md(atoms, NaiveEnsemble(paths)), make_md(atoms, calc)
            nw, ew = timed(naive, args.warmup), timed(engine, args.warmup)
            nt = et = 0.0
            for _ in range(args.steps // 10):  # interleaved, so machine noise hits both sides
                nt += timed(naive, 10)
                et += timed(engine, 10)
            ns, es = args.steps // 10 * 10 / nt, args.steps // 10 * 10 / et
            dx = np.abs(naive.atoms.positions - engine.atoms.positions).max()
            print(
                f"| Cu{len(atoms)} | {ns:.2f} | {es:.2f} | **{es / ns:.1f}x** | {nw:.1f} | "
                f"{ew:.1f} | {dx:.1e} |"
            )
            calls = args.steps + args.warmup + 1
            print(
                f"  engine: {calc.neighbours.builds} neighbour-list builds in {calls} calls, "
                f"edge capacity {calc.edge_capacity}"
            )


if __name__ == "__main__":
    main()
