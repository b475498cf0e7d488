"""Ensemble training on nequix's own model, loss, graph and checkpoint code.

Members differ by init seed and, by default, by their own random train/validation split
(`TrainingSettings.strategy`). Three starting points: from scratch (per-element reference
energies fitted robustly from the data), fine-tuning a foundation model (its reference energies
corrected to the data), or a warm start where member k continues from its predecessor.
Fine-tuned members can also differ by a re-initialised readout or last layer, by their
foundation model (a heterogeneous committee: member k starts from model k mod n), and the
foundation model itself can join as a frozen member. With ``uncertainty: llpr`` each member
also gets LLPR heads (`nequix_fw.llpr`).
Shift, scale and neighbour count come from the whole training set, so all members share one
architecture and the ensemble engine evaluates them stacked.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import e3nn_jax as e3nn
import equinox as eqx
import jax
import jax.numpy as jnp
import jraph
import nequix
import numpy as np
import optax
from ase.data import chemical_symbols
from ase.stress import voigt_6_to_full_3x3_stress
from nequix.data import atomic_numbers_to_indices, dict_to_graphstuple
from nequix.model import Linear, Nequix
from nequix.train import evaluate as nequix_evaluate
from nequix.train import loss as nequix_loss
from scipy.optimize import least_squares

from nequix_fw import __version__
from nequix_fw.dataset import DatasetStore, ids_hash, read_labelled
from nequix_fw.ensemble import Ensemble
from nequix_fw.epochs import EpochLog, frozen_layers, learning_rate_schedule, run_epochs
from nequix_fw.errors import ModelError, OutputError, StructureError
from nequix_fw.graphs import (
    bucket_size,
    build_graph,
    check_graph_memory,
    configure_compilation_cache,
)
from nequix_fw.labels import Labelled
from nequix_fw.llpr import fit_llpr
from nequix_fw.models import REQUIRED_CONFIG_KEYS, load_model, new_model, save_model
from nequix_fw.settings import TrainingSettings, finetune_defaults, resolve_stress_weight
from nequix_fw.structures import atomic_path, check_output, check_writable_dir
from nequix_fw.training_torch import fit_torch
from nequix_fw.uncertainty import heads_path

logger = logging.getLogger(__name__)


MEMBER_GLOB = "member_*.nqx"
#: Peak memory of a training over its graphs' own bytes (batches and the model on top).
MEMORY_FACTOR = 1.5


# -- reference energies and statistics ---------------------------------------------------------


def fit_reference_energies(
    counts: np.ndarray, energies: np.ndarray, robust: bool = True
) -> np.ndarray:
    """Per-element reference energies (eV) from composition counts (n, n_el) and energies (n,).

    Residuals are taken per atom. With `robust`, a Cauchy-loss fit scaled by the residuals' median
    absolute deviation keeps a few high-energy structures (which active learning favours) from
    pulling the references up.
    """

    n_atoms = counts.sum(axis=1, keepdims=True)
    a, b = counts / n_atoms, energies / n_atoms[:, 0]
    e0 = np.linalg.lstsq(a, b, rcond=None)[0]
    if not robust or len(b) <= counts.shape[1]:
        return e0
    resid = b - a @ e0
    scale = max(1.4826 * float(np.median(np.abs(resid - np.median(resid)))), 1e-4)
    fit = least_squares(lambda x: a @ x - b, e0, loss="cauchy", f_scale=scale)
    return fit.x


def _counts(data: list[Labelled], numbers: list[int]) -> np.ndarray:
    return np.array([[np.sum(d.frame.atoms.numbers == z) for z in numbers] for d in data], float)


# -- graphs and batches --------------------------------------------------------------------------


def _graph_dict(d: Labelled, atom_indices: dict[int, int], cutoff: float) -> dict:
    """nequix's graph dict of a labelled structure, with its labels."""

    g = build_graph(d.frame.atoms, atom_indices, cutoff)
    g["forces"] = d.forces.astype(np.float32)
    g["energy"] = np.array([d.energy], dtype=np.float32)
    stress = np.zeros((3, 3)) if d.stress is None else voigt_6_to_full_3x3_stress(d.stress)
    g["stress"] = stress.astype(np.float32)
    return g


def graph_dicts(data: list[Labelled], config: dict, cache: dict | None = None) -> list[dict]:
    """nequix's graph dicts (with labels) of `data` for a model of `config` (its elements and
    cutoff), built once per training: `cache` keeps them by (elements, cutoff) for the
    statistics and every member."""
    cache = {} if cache is None else cache
    key = (tuple(sorted(int(z) for z in config["atomic_numbers"])), float(config["cutoff"]))
    if key not in cache:
        index = atomic_numbers_to_indices(list(key[0]))
        sources = sorted({str(d.frame.source) for d in data})
        where = sources[0] + (f" and {len(sources) - 1} more" if len(sources) > 1 else "")
        atoms = [d.frame.atoms for d in data]
        check_graph_memory(atoms, index, key[1], where, MEMORY_FACTOR)
        cache[key] = [_graph_dict(d, index, key[1]) for d in data]
    return cache[key]


def _batches(graphs: list, idx: np.ndarray, batch_size: int) -> Iterator:
    """Padded batches of `graphs[idx]`, all padded to the largest batch's size bucket, made
    one at a time."""

    groups = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    n_node = max(sum(int(graphs[i].n_node[0]) for i in g) for g in groups)
    n_edge = max(sum(int(graphs[i].n_edge[0]) for i in g) for g in groups)
    n_node, n_edge = bucket_size(n_node + 1, 16), bucket_size(n_edge, 64)
    return (
        jraph.pad_with_graphs(
            jraph.batch_np([graphs[i] for i in g]),
            n_node=n_node,
            n_edge=n_edge,
            n_graph=batch_size + 1,
        )
        for g in groups
    )


# -- member plans ---------------------------------------------------------------------------------


@dataclass
class MemberPlan:
    """Everything one member's training needs; plain data so it can go to another process."""

    index: int
    seed: int
    train_idx: list[int]
    valid_idx: list[int]
    start: str  # "scratch" | "finetune" | "warm_start" | "foundation" (frozen, not trained)
    config: dict  # nequix model config of the starting model
    init_path: str | None = None  # checkpoint to start from (finetune, warm start, foundation)
    atom_energies: dict[str, float] = field(default_factory=dict)  # overrides (eV)
    reinitialise: str = "none"  # fine-tuning: "readout" | "last_layer" re-initialised


def split_members(
    n: int, settings: TrainingSettings, n_members: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """(train, valid) indices per member (`n_members`, by default `settings.n_models`)
    according to the strategy."""
    out = []
    n_valid = (
        0 if settings.valid_fraction == 0 or n < 2 else max(1, round(n * settings.valid_fraction))
    )
    for k in range(settings.n_models if n_members is None else n_members):
        split_seed = settings.seed if settings.strategy == "seeds" else settings.seed + k
        perm = np.random.default_rng(split_seed).permutation(n)
        valid, train = perm[:n_valid], perm[n_valid:]
        if settings.strategy == "bootstrap":
            rng = np.random.default_rng(settings.seed + 1000 + k)
            train = rng.choice(train, size=len(train), replace=True)
        out.append((sorted(int(i) for i in train), sorted(int(i) for i in valid)))
    return out


def _check_outdir(outdir: Path, overwrite: bool) -> None:
    """Refuse an output directory that holds models (unless `overwrite`) or cannot be made;
    creates nothing."""
    check_output(outdir, "directory")
    existing = sorted(outdir.glob(MEMBER_GLOB)) if outdir.is_dir() else []
    if existing and not overwrite:
        raise OutputError(
            f"{outdir}: already holds models ({', '.join(p.name for p in existing[:3])}); "
            "set overwrite (command line: --overwrite) or choose another directory"
        )


def plan_members(
    data: list[Labelled],
    settings: TrainingSettings,
    finetune_from: str | Path | Sequence[str | Path] | None = None,
    warm_start: str | Path | None = None,
    graphs: dict | None = None,
) -> tuple[list[MemberPlan], dict]:
    """Starting models, data subsets and seeds of all members; plus dataset facts for metadata.
    `finetune_from`: one foundation model, or several (member k starts from model k mod n).
    `graphs`: the training's graph cache (see `graph_dicts`)."""
    if isinstance(finetune_from, (str, Path)):
        finetune_from = [finetune_from]
    if finetune_from is not None and not finetune_from:
        finetune_from = None
    if (
        settings.reinitialise != "none" or settings.foundation_member or settings.freeze != "none"
    ) and not (finetune_from or warm_start):
        raise ModelError(
            "train_ensemble.reinitialise, freeze and foundation_member are for fine-tuning: "
            "give finetune_from (command line: --finetune-from)"
        )
    if not data:
        raise StructureError("the training set is empty")
    if finetune_from is not None and warm_start is not None:
        raise ModelError(
            "finetune_from and warm_start exclude each other (command line: "
            "--finetune-from, --warm-start): give one"
        )
    if len(data) < 2 and settings.valid_fraction > 0:
        raise StructureError(
            f"{data[0].where}: the training set holds 1 structure; training needs at least 2 "
            "(the validation split that picks the best epoch takes one)"
        )
    numbers = sorted({int(z) for d in data for z in d.frame.atoms.numbers})
    n_frozen = len(finetune_from or []) if settings.foundation_member else 0
    splits = split_members(len(data), settings, settings.n_models + n_frozen)
    if settings.stress_weight > 0:
        missing = [d.where for d in data if d.stress is None]
        if missing:
            raise StructureError(f"{missing[0]}: no stress label, but stress_weight > 0")
    facts: dict[str, Any] = {"elements_z": numbers, "n_structures": len(data)}
    if warm_start is not None:
        plans = _warm_start_plans(data, settings, Path(warm_start), numbers, splits)
    elif finetune_from is not None:
        plans = _finetune_plans(data, settings, finetune_from, numbers, splits, facts)
    else:
        plans = _scratch_plans(data, settings, numbers, splits, facts, graphs)
    return plans, facts


def _warm_start_plans(
    data: list[Labelled],
    settings: TrainingSettings,
    warm_start: Path,
    numbers: list[int],
    splits: list,
) -> list[MemberPlan]:
    """Members that start from the previous iteration's (`warm_start`), frozen foundation
    members staying frozen."""
    plans = []
    if not warm_start.is_dir():
        raise ModelError(f"{warm_start}: warm-start directory not found")
    prev = sorted(warm_start.glob(MEMBER_GLOB), key=_member_index)
    frozen = [p for p in prev if _member_start(p) == "foundation"]
    trained = [p for p in prev if p not in frozen]
    if len(trained) < settings.n_models:
        raise ModelError(
            f"{warm_start}: warm start needs {settings.n_models} member_*.nqx, found {len(trained)}"
        )
    if settings.foundation_member:
        splits = split_members(len(data), settings, settings.n_models + len(frozen))
    starts = trained[: settings.n_models] + (frozen if settings.foundation_member else [])
    for k, ((tr, va), path) in enumerate(zip(splits, starts, strict=False)):
        m = load_model(path)
        _check_covers(m.atomic_numbers, numbers, path)
        _check_freeze(settings, m.config, path)
        start = "foundation" if path in frozen else "warm_start"
        plans.append(MemberPlan(k, settings.seed + k, tr, va, start, m.config, str(path)))
    return plans


def _finetune_plans(
    data: list[Labelled],
    settings: TrainingSettings,
    finetune_from: Sequence[str | Path],
    numbers: list[int],
    splits: list,
    facts: dict,
) -> list[MemberPlan]:
    """Members fine-tuned from the foundation model(s) (member k from model k mod n), each
    model's reference energies corrected to the labels (recorded in `facts`); frozen
    foundation members after them."""
    counts = _counts(data, numbers)
    plans = []
    bases = [load_model(spec) for spec in finetune_from]
    _check_committee(bases)
    for base in bases:
        _check_freeze(settings, base.config, base.info.path)
    corrections, overrides = {}, []
    for base in bases:
        _check_covers(base.atomic_numbers, numbers, base.info.path)
        delta = _reference_correction(base, data, counts, numbers)
        e0 = {str(z): float(base.config["atom_energies"][str(z)]) for z in numbers}
        overrides.append(
            {str(z): e0[str(z)] + float(d) for z, d in zip(numbers, delta, strict=True)}
        )
        corrections[base.info.name] = dict(zip(map(str, numbers), delta.tolist(), strict=True))
    # one foundation model: {element: eV}, as before; a committee: per model
    facts["reference_energy_correction"] = (
        next(iter(corrections.values())) if len(bases) == 1 else corrections
    )
    for k, (tr, va) in enumerate(splits):
        frozen = k >= settings.n_models
        b = (k - settings.n_models) if frozen else k % len(bases)
        plans.append(
            MemberPlan(
                k,
                settings.seed + k,
                tr,
                va,
                "foundation" if frozen else "finetune",
                bases[b].config,
                bases[b].info.path,
                overrides[b],
                "none" if frozen else settings.reinitialise,
            )
        )
    return plans


def _scratch_plans(
    data: list[Labelled],
    settings: TrainingSettings,
    numbers: list[int],
    splits: list,
    facts: dict,
    graphs: dict | None,
) -> list[MemberPlan]:
    """Members trained from scratch: reference energies fitted to the labels and the data's
    statistics (recorded in `facts`), a seed each."""
    counts = _counts(data, numbers)
    energies = np.array([d.energy for d in data])
    plans = []
    e0 = fit_reference_energies(counts, energies)
    arch = settings.architecture.model_dump()
    own = graph_dicts(data, {"atomic_numbers": numbers, "cutoff": arch["cutoff"]}, graphs)
    stats = _statistics(data, numbers, e0, own)
    facts["reference_energies"] = dict(zip(map(str, numbers), e0.tolist(), strict=True))
    facts["statistics"] = stats
    for k, (tr, va) in enumerate(splits):
        _, config = new_model(
            numbers,
            seed=settings.seed + k,
            atom_energies=dict(zip(numbers, e0, strict=True)),
            **arch,
            **stats,
        )
        plans.append(MemberPlan(k, settings.seed + k, tr, va, "scratch", config))
    return plans


def _member_index(path: Path) -> int:
    """k of member_<k>.nqx (numeric order: member_10 after member_9)."""
    try:
        return int(path.stem.removeprefix("member_"))
    except ValueError:
        return 1 << 30


def _member_start(path: Path) -> str | None:
    """How a trained member started (its metadata's `start`), if its metadata is there."""
    meta = path.with_suffix(".json")
    try:
        return json.loads(meta.read_text()).get("start")
    except (OSError, ValueError, AttributeError):
        return None


def _warm_start_defaults(settings: TrainingSettings, warm_start: Path) -> TrainingSettings:
    """Unless set: as many members as the previous ensemble trained, with LLPR heads if its
    members have them (a fine-tuned campaign's one member with heads continues as such)."""
    prev = [p for p in warm_start.glob(MEMBER_GLOB) if _member_start(p) != "foundation"]
    update: dict[str, Any] = {}
    if prev and "n_models" not in settings.model_fields_set:
        update["n_models"] = len(prev)
    if prev and "uncertainty" not in settings.model_fields_set:
        update["uncertainty"] = (
            "llpr" if all(heads_path(p).is_file() for p in prev) else settings.uncertainty
        )
    return settings.model_copy(update=update)


def _check_committee(bases: list) -> None:
    """Foundation models of one committee must cover the same elements (the ensemble engine
    evaluates its members on one neighbour graph), and share their cutoff."""
    first = bases[0]
    for b in bases[1:]:
        only = sorted(set(first.atomic_numbers) ^ set(b.atomic_numbers))
        if only:
            z = only[0]
            has, lacks = (first, b) if z in first.atomic_numbers else (b, first)
            raise ModelError(
                f"finetune_from: {lacks.info.path} does not cover {chemical_symbols[z]}, which "
                f"{has.info.path} covers: the members of one committee cover the same elements"
            )
        if b.cutoff != first.cutoff:
            raise ModelError(
                f"finetune_from: {b.info.path} has a cutoff of {b.cutoff} Å and "
                f"{first.info.path} {first.cutoff} Å: the members of one committee share one"
            )


def _check_freeze(settings: TrainingSettings, config: dict, where) -> None:
    """`settings.freeze` fits a starting model of `config` and leaves a re-initialised layer
    free to train."""
    n = int(config["n_layers"])
    k = frozen_layers(settings.freeze, n, str(where))
    if settings.reinitialise == "last_layer" and k == n:
        raise ModelError(
            f"train_ensemble.freeze keeps all {n} interaction layers of {where} as they are, "
            "but reinitialise: last_layer draws the last anew: freeze fewer, or reinitialise "
            "the readout only"
        )


def _check_covers(model_numbers: list[int], numbers: list[int], where) -> None:
    missing = sorted(set(numbers) - set(model_numbers))
    if missing:
        raise StructureError(
            f"the training set contains {', '.join(chemical_symbols[z] for z in missing)}, "
            f"which the starting model {where} does not cover"
        )


def _statistics(data: list[Labelled], numbers: list[int], e0: np.ndarray, graphs: list) -> dict:
    """nequix's shift (eV/atom), scale (eV/Å) and average neighbour count, on the whole set:
    the values of nequix's `dataset_stats` (a test compares them), computed here in process
    because `dataset_stats` needs a nequix `Dataset`, forks DataLoader workers and prints."""

    counts = _counts(data, numbers)
    n_atoms = counts.sum(axis=1)
    resid = (np.array([d.energy for d in data]) - counts @ e0) / n_atoms
    forces = np.concatenate([d.forces.ravel() for d in data])
    n_edges = sum(int(g["n_edge"][0]) for g in graphs)
    return {
        "shift": float(np.mean(resid)),
        "scale": float(np.sqrt(np.mean(forces**2))) or 1.0,
        "avg_n_neighbors": float(n_edges / n_atoms.sum()),
    }


def _reference_correction(base, data, counts, numbers) -> np.ndarray:
    """Per-element shift (eV) of a foundation model's reference energies to fit the data."""

    preds = Ensemble([base]).predict([d.frame.atoms for d in data])
    resid = np.array([d.energy - p.energies[0] for d, p in zip(data, preds, strict=True)])
    return fit_reference_energies(counts, resid)


# -- one member ---------------------------------------------------------------------------------


def _start_module(plan: MemberPlan):
    config = dict(plan.config)
    if plan.init_path is None:
        zs = config["atomic_numbers"]
        module = Nequix(
            key=jax.random.key(plan.seed),
            n_species=len(zs),
            **{k: config[k] for k in REQUIRED_CONFIG_KEYS if k != "atomic_numbers"},
            atom_energies=[config["atom_energies"][str(z)] for z in zs],
        )
        return module, config
    module = load_model(plan.init_path).jax_module()
    if plan.atom_energies:
        zs = sorted(int(z) for z in config["atomic_numbers"])
        config["atom_energies"] = {**config["atom_energies"], **plan.atom_energies}
        e0 = jnp.array([config["atom_energies"][str(z)] for z in zs], dtype=jnp.float32)
        module = eqx.tree_at(lambda m: m.atom_energies, module, e0)
    if plan.reinitialise != "none":
        module = _reinitialised(module, config, plan)
    return module, config


def _reinitialised(module, config: dict, plan: MemberPlan):
    """`module` with its readout (and, for 'last_layer', its last interaction layer) drawn anew
    from the member's seed, as nequix initialises them."""
    fresh = Nequix(
        key=jax.random.key(plan.seed),
        n_species=len(config["atomic_numbers"]),
        **{k: config[k] for k in REQUIRED_CONFIG_KEYS if k != "atomic_numbers"},
    )
    module = eqx.tree_at(lambda m: m.readout, module, fresh.readout)
    if plan.reinitialise == "last_layer":
        module = eqx.tree_at(lambda m: m.layers[-1], module, fresh.layers[-1])
    return module


_TEMPLATES: dict[str, Any] = {}


def _canonical(module, config: dict):
    """Re-hang `module`'s parameters on the first module of the same architecture, so that
    members share compiled training steps (e3nn's static parts compare by identity)."""

    key = repr([(k, config[k]) for k in REQUIRED_CONFIG_KEYS])
    template = _TEMPLATES.setdefault(key, module)
    if template is module:
        return module
    params, static = eqx.partition(template, eqx.is_array)
    leaves = jax.tree_util.tree_leaves(eqx.filter(module, eqx.is_array))
    params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)
    return eqx.combine(params, static)


def _optimizer(settings: TrainingSettings, steps_per_epoch: int):
    """AdamW with gradient clipping on the learning-rate schedule (shared across members)."""
    return _optimizer_cached(
        learning_rate_schedule(settings, steps_per_epoch),
        settings.grad_clip_norm,
        settings.weight_decay,
    )


def _decay_mask(params):
    """nequix's weight-decay mask (the weights of linear layers, not their biases), for the
    trainable part of a model (`trainable_spec`): frozen parts are None there."""

    def is_layer(x) -> bool:
        return isinstance(x, (Linear, e3nn.equinox.Linear))

    def set_mask(x):
        mask = jax.tree.map(lambda _: is_layer(x), x)
        if isinstance(x, Linear) and x.bias is not None:
            mask = eqx.tree_at(lambda m: m.bias, mask, False)
        return mask

    return jax.tree.map(set_mask, params, is_leaf=is_layer)


@functools.lru_cache(maxsize=8)
def _optimizer_cached(schedule, clip, wd):
    optim = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, weight_decay=wd, mask=_decay_mask),
    )
    return optim, schedule


def trainable_spec(module, freeze: str | int):
    """A filter spec of `module` (True: trains) for `TrainingSettings.freeze`: the first k
    interaction layers frozen, the readout and the reference energies always trained."""
    spec = jax.tree.map(eqx.is_array, module)
    k = frozen_layers(freeze, len(module.layers), "the model")
    if k == 0:
        return spec
    return eqx.tree_at(
        lambda m: m.layers[:k],
        spec,
        replace=[jax.tree.map(lambda _: False, layer) for layer in spec.layers[:k]],
    )


def _step_impl(params, ema, rest, opt_state, batch, i, optim, weights, loss_type, ema_decay):
    """One optimiser step on the trainable `params` (the rest of the model, `rest`, held as
    it is); returns the new params, their moving average, the optimiser state and the loss."""

    def objective(p):
        return nequix_loss(eqx.combine(p, rest), batch, *weights, loss_type)

    (value, _), grads = eqx.filter_value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optim.update(grads, opt_state, params)
    params = eqx.apply_updates(params, updates)
    decay = jnp.minimum(ema_decay, (1.0 + i) / (10.0 + i))
    ema = jax.tree.map(lambda e, m: e * decay + m * (1 - decay), ema, params)
    return params, ema, opt_state, value


_train_step = eqx.filter_jit(_step_impl)


def _fit_jax(
    module,
    config: dict,
    plan: MemberPlan,
    graph_dicts: list[dict],
    settings: TrainingSettings,
    progress: bool,
):
    """Train `module` with JAX; returns (best EMA module, best epoch, its validation metrics,
    the per-epoch log rows)."""

    module = _canonical(module, config)
    graphs = [dict_to_graphstuple(g) for g in graph_dicts]
    bs = settings.batch_size
    optim, _ = _optimizer(settings, max(1, -(-len(plan.train_idx) // bs)))
    weights = (settings.energy_weight, settings.force_weight, settings.stress_weight)
    valid_idx = np.array(plan.valid_idx)
    valid_batches = list(_batches(graphs, valid_idx, bs)) if len(valid_idx) else []
    params, rest = eqx.partition(module, trainable_spec(module, settings.freeze))
    state = {"params": params, "ema": params, "opt": optim.init(params)}

    def step(batch, i: int) -> float:
        state["params"], state["ema"], state["opt"], value = _train_step(
            state["params"],
            state["ema"],
            rest,
            state["opt"],
            batch,
            jnp.float32(i),
            optim,
            weights,
            settings.loss_type,
            settings.ema_decay,
        )
        return float(value)

    def validate() -> dict | None:
        """nequix's loss and metrics of the EMA model, weighted by the structures."""
        if not valid_batches:
            return None
        metrics = nequix_evaluate(ema(), valid_batches, *weights, settings.loss_type)
        return {k: float(v) for k, v in metrics.items()}

    def ema():
        return eqx.combine(state["ema"], rest)

    return run_epochs(
        plan,
        settings,
        lambda order: _batches(graphs, order, bs),
        step,
        validate,
        ema,
        f"member {plan.index}",
        progress,
    )


def _frozen(module, config: dict, plan: MemberPlan, graph_dicts: list[dict], settings):
    """A foundation member as it is: (module, 0, its validation metrics, one log row)."""
    graphs = [dict_to_graphstuple(g) for g in graph_dicts]
    idx = np.array(plan.valid_idx or plan.train_idx)
    weights = (settings.energy_weight, settings.force_weight, settings.stress_weight)
    module = _canonical(module, config)
    batches = list(_batches(graphs, idx, settings.batch_size))
    val = {
        k: float(v)
        for k, v in nequix_evaluate(module, batches, *weights, settings.loss_type).items()
    }
    log = EpochLog(plan.index, None)
    log.update(0, val["loss"], val, 0.0, 0.0, lambda: module)
    return log.result()


def train_member(
    plan: MemberPlan,
    data: list[Labelled],
    settings: TrainingSettings,
    outdir: Path,
    facts: dict,
    progress: bool = True,
    graphs: dict | None = None,
) -> dict:
    """Train one member; write `member_<k>.nqx` (and `.pt` for the torch backend or on
    request), its metadata JSON and training-curve CSV. `graphs`: the training's graph cache
    (see `graph_dicts`)."""
    t_start = time.perf_counter()
    if settings.backend == "jax":
        configure_compilation_cache(settings.compilation_cache_dir)
    module, config = _start_module(plan)
    dicts = graph_dicts(data, config, graphs)
    if plan.start == "foundation":  # frozen: its validation loss, no training
        best_model, best_epoch, best_val, log_rows = _frozen(module, config, plan, dicts, settings)
    elif settings.backend == "torch":
        best_model, best_epoch, best_val, log_rows = fit_torch(
            module, config, plan, dicts, data, settings, progress
        )
    else:
        best_model, best_epoch, best_val, log_rows = _fit_jax(
            module, config, plan, dicts, settings, progress
        )
    stem = f"member_{plan.index}"
    config = {**config, "seed": plan.seed}
    save_model(outdir / f"{stem}.nqx", best_model, config)
    if settings.save_torch or settings.backend == "torch":
        save_model(outdir / f"{stem}.pt", best_model, config)
    llpr_info = None
    heads_file = heads_path(outdir / f"{stem}.nqx")
    if settings.uncertainty == "llpr":
        t_llpr = time.perf_counter()
        heads = fit_llpr(
            load_model(outdir / f"{stem}.nqx"),
            [data[j] for j in plan.train_idx],
            [data[j] for j in plan.valid_idx],
            (settings.energy_weight, settings.force_weight, settings.stress_weight),
            settings.llpr_heads,
            settings.llpr_regularization,
            seed=plan.seed,
        )
        heads.save(heads_file)
        llpr_info = {**heads.info(), "wall_time_s": time.perf_counter() - t_llpr}
    else:
        heads_file.unlink(missing_ok=True)  # an older training's heads would not fit
    with atomic_path(outdir / f"{stem}_log.csv") as tmp:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(log_rows[0]))
        writer.writeheader()
        writer.writerows(log_rows)
        tmp.write_text(buf.getvalue())

    meta = {
        "member": plan.index,
        "checkpoint": f"{stem}.nqx",
        "seed": plan.seed,
        "strategy": settings.strategy,
        "start": plan.start,
        "start_checkpoint": plan.init_path,
        "n_train": len(plan.train_idx),
        "n_valid": len(plan.valid_idx),
        "train_subset_hash": ids_hash(data[j].id for j in plan.train_idx),
        "valid_subset_hash": ids_hash(data[j].id for j in plan.valid_idx),
        "training_set_hash": ids_hash(d.id for d in data),
        "backend": settings.backend,
        "epochs_run": len(log_rows),
        "best_epoch": best_epoch,
        "best_valid": best_val,
        "first_epoch_train_loss": log_rows[0]["train_loss"],
        "final_train_loss": log_rows[-1]["train_loss"],
        "wall_time_s": time.perf_counter() - t_start,
        "reinitialise": plan.reinitialise,
        "llpr": llpr_info,
        "nequix_version": getattr(nequix, "__version__", _dist_version("nequix")),
        "nequix_fw_version": __version__,
        "settings": settings.model_dump(mode="json"),
        **facts,
    }
    with atomic_path(outdir / f"{stem}.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return meta


def _dist_version(name: str) -> str:
    return version(name)


def _train_member_worker(args) -> dict:
    plan, data, settings, outdir, facts, graphs = args
    return train_member(plan, data, settings, outdir, facts, progress=False, graphs=graphs)


def train_ensemble(
    dataset: list[str | Path],
    outdir: str | Path,
    settings: TrainingSettings | None = None,
    finetune_from: str | Path | Sequence[str | Path] | None = None,
    warm_start: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    store: DatasetStore | None = None,
    allow_mixed: bool = False,
) -> list[dict]:
    """Train `settings.n_models` members on the labelled structures in `dataset` (files,
    directories, store datasets ``db:NAME`` of `store`; one level of theory unless
    `allow_mixed`)."""
    settings = settings or TrainingSettings()
    if finetune_from:
        settings, chosen = finetune_defaults(settings)
        if chosen:
            logger.info("fine-tuning defaults: %s", chosen)
    elif warm_start is not None:
        settings = _warm_start_defaults(settings, Path(warm_start))
    outdir = Path(outdir)
    _check_outdir(outdir, overwrite)
    data = read_labelled(dataset, store, allow_mixed)
    if settings.stress_weight == "auto":
        settings = resolve_stress_weight(settings, all(d.stress is not None for d in data))
        logger.info("stress_weight auto: %g", settings.stress_weight)
    graphs: dict = {}  # each structure's graph built once, for the statistics and all members
    plans, facts = plan_members(data, settings, finetune_from, warm_start, graphs)
    check_writable_dir(outdir)  # inputs and starting models are fine: now make the output
    if settings.n_workers > 1:
        for p in plans:  # built here, not once per worker process
            graph_dicts(data, p.config, graphs)
        jobs = [(p, data, settings, outdir, facts, graphs) for p in plans]
        with ProcessPoolExecutor(settings.n_workers, mp_context=get_context("spawn")) as pool:
            metas = list(pool.map(_train_member_worker, jobs))
    else:
        metas = [
            train_member(p, data, settings, outdir, facts, progress=progress, graphs=graphs)
            for p in plans
        ]
    for i, m in enumerate(metas):
        logger.info(
            "member %d of %s: best validation loss %.4g", i, outdir, m["best_valid"]["loss"]
        )
    return metas
