"""Fine-tuning nequix-mp-1 on CPU: the cost of a step by cell size, full and frozen, and one
epoch of our training step (batches padded to size buckets: one compile per bucket) beside a
naive loop (each structure its own exact shape, so each new shape compiles again).

For each cell size, `--structures` rattled fcc Cu-Au cells labelled by EMT; batches of 4.
"epoch" is one pass over the structures, compiles included (each loop jits its own step, so
it compiles anew); "steady" the median of 3 steps after it, per structure.

    python benchmarks/finetune_speed.py [--sizes 8 32 64] [--structures 8]
"""

from __future__ import annotations

import argparse
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jraph
import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from nequix.data import dict_to_graphstuple

from nequix_fw.labels import labels_of
from nequix_fw.models import load_model
from nequix_fw.settings import FINETUNE_DEFAULTS, TrainingSettings
from nequix_fw.structures import Frame
from nequix_fw.training import _batches, _optimizer, _step_impl, graph_dicts, trainable_spec

REPEATS = {8: (2, 1, 1), 32: (2, 2, 2), 64: (4, 2, 2), 108: (3, 3, 3)}
BATCH = 4


def cells(n_atoms: int, n: int, seed: int) -> list:
    """`n` rattled fcc Cu cells of `n_atoms` with a quarter of the atoms Au, EMT labels."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = bulk("Cu", "fcc", a=3.65, cubic=True).repeat(REPEATS[n_atoms])
        a.numbers[rng.choice(len(a), size=len(a) // 4, replace=False)] = 79
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        a.calc = EMT()
        labels = {"energy": a.get_potential_energy(), "forces": a.get_forces()}
        a.calc = SinglePointCalculator(a, **labels, stress=a.get_stress())
        out.append(labels_of(Frame(a, "cells", i)))
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def loop(module, graphs: list, freeze, padded: bool) -> dict:
    """One epoch of training steps: ours (`padded`: batches of 4 padded to their size bucket)
    or naive (one structure a step, padded to nothing but itself); its time, the distinct
    shapes compiled, and a steady step's time."""
    settings = TrainingSettings(**{**FINETUNE_DEFAULTS, "stress_weight": 1000.0, "freeze": freeze})
    optim, _ = _optimizer(settings, 10)
    weights = (settings.energy_weight, settings.force_weight, settings.stress_weight)
    params, rest = eqx.partition(module, trainable_spec(module, freeze))
    state = [params, params, optim.init(params)]
    step_fn = eqx.filter_jit(_step_impl)  # a fresh cache per loop

    def step(batch, i: int):
        state[0], state[1], state[2], value = step_fn(
            state[0],
            state[1],
            rest,
            state[2],
            batch,
            jnp.float32(i),
            optim,
            weights,
            settings.loss_type,
            settings.ema_decay,
        )
        return value

    if padded:
        batches = list(_batches(graphs, np.arange(len(graphs)), BATCH))
    else:
        batches = [
            jraph.pad_with_graphs(
                g, n_node=int(g.n_node[0]) + 1, n_edge=int(g.n_edge[0]), n_graph=2
            )
            for g in graphs
        ]
    shapes = {(b.nodes["positions"].shape, b.senders.shape) for b in batches}
    epoch = sum(_timed(lambda b=b, i=i: step(b, i)) for i, b in enumerate(batches))
    steady = float(np.median([_timed(lambda: step(batches[0], 0)) for _ in range(3)]))
    per_step = BATCH if padded else 1
    return {
        "epoch_s": epoch,
        "shapes": len(shapes),
        "per_structure_s": steady / per_step,
        "steps": len(batches),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, choices=list(REPEATS), default=[8, 32])
    p.add_argument("--structures", type=int, default=8)
    args = p.parse_args()
    base = load_model("nequix-mp-1")
    print(f"nequix-mp-1, {os.cpu_count()} CPUs; batches of {BATCH}, {args.structures} structures")
    print(
        "| atoms | loop | freeze | steps | shapes compiled | epoch incl. compiles (s) "
        "| steady s per structure |"
    )
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for n in args.sizes:
        data = cells(n, args.structures, seed=n)
        graphs = [dict_to_graphstuple(g) for g in graph_dicts(data, base.config)]
        runs = [("ours", f, True) for f in ("none", 2, "backbone")] + [("naive", "none", False)]
        for name, freeze, padded in runs:
            r = loop(base.module, graphs, freeze, padded)
            print(
                f"| {n} | {name} | {freeze} | {r['steps']} | {r['shapes']} | {r['epoch_s']:.1f} "
                f"| {r['per_structure_s']:.2f} |"
            )


if __name__ == "__main__":
    main()
