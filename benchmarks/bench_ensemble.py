"""Ensemble engine vs. the naive loop of the original design.

40 rattled fcc Cu/Al/Ni cells of 4-32 atoms (cubic cells repeated 1-2 times per axis), 3 models
(copies of nequix-mp-1). Naive: one `NequixCalculator` per model, one structure at a time.
Engine: `Ensemble.predict` (shared neighbour lists, stacked members, padded size buckets).
Each side runs in a fresh process with an empty JAX compilation cache, so wall times include
compilation. Prints wall time, model evaluations/s, peak memory and the max difference.

Usage: python benchmarks/bench_ensemble.py [--model PATH] [--n 40] [--models 3] [--only engine]
       [--cold-only] [--member-mapping auto|vmap|map] [--xla-option xla_gpu_autotune_level=0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "nequix-mp-1.nqx"


def structures(n: int, seed: int = 0):
    from ase.build import bulk

    from nequix_fw.exploration import distorted_copies

    rng = np.random.default_rng(seed)
    lattice = {"Cu": 3.61, "Al": 4.05, "Ni": 3.52}
    out = []
    for i in range(n):
        el = list(lattice)[i % 3]
        reps = tuple(int(r) for r in rng.integers(1, 3, size=3))
        cell = bulk(el, "fcc", a=lattice[el], cubic=True).repeat(reps)
        out.append(distorted_copies(cell, 1, rattle_std=0.05, seed=seed + i)[0])
    return out


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(
    mode: str, model: str, n: int, n_models: int, out: Path, cache: str, engine_options: dict
) -> None:
    import jax

    atoms_list = structures(n)
    t0 = time.perf_counter()
    if mode == "naive":
        from nequix.calculator import NequixCalculator

        calcs = [
            NequixCalculator(model_path=model, backend="jax", use_kernel=False)
            for _ in range(n_models)
        ]
        energies = np.zeros((n_models, n))
        forces = []
        for j, atoms in enumerate(atoms_list):
            f = []
            for m, calc in enumerate(calcs):
                a = atoms.copy()
                a.calc = calc
                energies[m, j] = a.get_potential_energy()
                f.append(a.get_forces())
            forces.append(np.array(f))
    else:
        from nequix_fw.ensemble import Ensemble
        from nequix_fw.settings import EnsembleSettings

        settings = EnsembleSettings(compilation_cache_dir=Path(cache), **engine_options)
        ens = Ensemble.from_specs([model] * n_models, settings)
        preds = ens.predict(atoms_list)
        energies = np.stack([p.energies for p in preds], axis=1)
        forces = [p.forces for p in preds]
    wall = time.perf_counter() - t0
    np.savez(
        out,
        energies=energies,
        n_atoms=np.array([len(a) for a in atoms_list]),
        forces=np.concatenate([f.reshape(n_models, -1) for f in forces], axis=1),
    )
    print(
        json.dumps(
            {
                "wall_s": wall,
                "evals_per_s": n * n_models / wall,
                "peak_rss_mb": _peak_mb(),
                "device": str(jax.devices()[0]),
                "n_atoms_total": int(sum(len(a) for a in atoms_list)),
            }
        )
    )


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--side", choices=["naive", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--engine-options", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["naive", "engine"], help="run one side only")
    p.add_argument("--cold-only", action="store_true", help="no engine-warm run")
    p.add_argument("--member-mapping", choices=["auto", "vmap", "map"], default="auto")
    p.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="XLA option of the engine's compiled call (xla_options)",
    )
    args = p.parse_args()
    options = {
        "member_mapping": args.member_mapping,
        "xla_options": {k: _number(v) for k, v in (o.split("=", 1) for o in args.xla_option)}
        or None,
    }
    if args.side:
        run_side(
            args.side,
            args.model,
            args.n,
            args.models,
            Path(args.out),
            args.cache,
            json.loads(args.engine_options),
        )
        return
    res = {}
    sides = {"engine": "engine", "engine-warm": "engine", "naive": "naive"}
    if args.only:
        sides = {k: v for k, v in sides.items() if v == args.only}
    if args.cold_only:
        sides.pop("engine-warm", None)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": ""}
        for name, side in sides.items():
            # "engine" starts with an empty compilation cache; "engine-warm" is a second
            # process that finds the first one's compilations in the persistent cache.
            out = Path(tmp) / f"{name}.npz"
            cmd = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--out",
                str(out),
                "--model",
                args.model,
                "--n",
                str(args.n),
                "--models",
                str(args.models),
                "--cache",
                str(Path(tmp) / "jax-cache"),
                "--engine-options",
                json.dumps(options),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            res[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            res[name]["data"] = dict(np.load(out))
    first = next(iter(res.values()))
    print(
        f"{args.n} structures ({first['n_atoms_total']} atoms), {args.models} models, "
        f"device {first['device']}"
    )
    print(f"{'':12s}{'wall (s)':>10s}{'evals/s':>10s}{'peak RSS (MB)':>15s}{'speed-up':>10s}")
    for name, r in res.items():
        speedup = res["naive"]["wall_s"] / r["wall_s"] if "naive" in res else float("nan")
        print(
            f"{name:12s}{r['wall_s']:10.1f}{r['evals_per_s']:10.2f}{r['peak_rss_mb']:15.0f}"
            f"{speedup:9.1f}x"
        )
    if "naive" in res:
        b = res["naive"]["data"]
        for name in [k for k in ("engine", "engine-warm") if k in res]:
            a = res[name]["data"]
            de = np.abs((a["energies"] - b["energies"]) / a["n_atoms"]).max()
            df = np.abs(a["forces"] - b["forces"]).max()
            print(f"{name}: max |dE|/atom {de:.2e} eV/atom, max |dF| {df:.2e} eV/Å vs naive")


if __name__ == "__main__":
    main()
