"""Graphs of structures for Nequix: nequix's own neighbour-list graphs, batched and padded to
size buckets so that JAX compiles once per bucket, and JAX's persistent compilation cache, so
that a compilation is reused by later processes. Shared by evaluation, MD and training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jraph
import numpy as np
import psutil
from ase import Atoms
from ase.geometry import complete_cell
from nequix.data import preprocess_graph

from nequix_fw.errors import NequixFWError

#: Structures whose graphs are built to estimate the bytes of all of them.
SAMPLE = 64


def configure_compilation_cache(cache_dir: Path | None) -> None:
    """Keep this process's JAX compilations (those over 0.5 s) in `cache_dir` and reuse those
    of earlier processes (None: no persistent cache)."""
    if cache_dir is None:
        return
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_graph(atoms: Atoms, atom_indices: dict[int, int], cutoff: float) -> dict:
    """nequix's graph dict for `atoms`, always with a cell (identity for molecules), so that
    periodic, slab and molecular structures share one compiled function (stress is reported
    for fully periodic cells only)."""
    graph = preprocess_graph(atoms, atom_indices, cutoff, False)
    graph["cell"] = complete_cell(atoms.cell).astype(np.float32)
    return graph


def available_memory() -> int:
    """Bytes this process can still use: the machine's available memory, or less under a cgroup
    limit (a batch job's)."""
    free = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return free
    return free if limit == "max" else min(free, int(limit) - used)


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def graph_bytes(graph: dict) -> int:
    return sum(np.asarray(v).nbytes for v in graph.values())


def check_graph_memory(
    structures: Sequence[Atoms],
    atom_indices: dict[int, int],
    cutoff: float,
    where: str,
    factor: float,
) -> int:
    """The estimated bytes of the graphs of `structures` (from a sample's, per atom); an error
    naming `where` when `factor` times that is more than the memory available."""
    n = len(structures)
    if n == 0:
        return 0
    rng = np.random.default_rng(0)
    sample = rng.choice(n, size=min(n, SAMPLE), replace=False)
    atoms = sum(len(structures[i]) for i in sample)
    built = sum(graph_bytes(build_graph(structures[i], atom_indices, cutoff)) for i in sample)
    total_atoms = sum(len(a) for a in structures)
    need = int(built / max(atoms, 1) * total_atoms)
    free = available_memory()
    if factor * need > free:
        raise NequixFWError(
            f"{where}: the neighbour graphs of its {n} structures ({total_atoms} atoms, cutoff "
            f"{cutoff:g} Å) need about {_size(factor * need)} and {_size(free)} are available; "
            "train where there is more memory, or on fewer structures"
        )
    return need


def pad_batch(graphs: list, n_graph: int, n_edge: int | None = None, n_node: int | None = None):
    """Batch nequix GraphsTuples and pad them to size buckets (one compilation per bucket);
    `n_edge` and `n_node` fix the capacities instead (they must hold the batch and, for nodes,
    one padding node)."""
    batch = jraph.batch_np(graphs)  # numpy: eager jnp ops would compile for every new size
    n_node = n_node or bucket_size(int(batch.n_node.sum()) + 1, 16)
    n_edge = n_edge or bucket_size(int(batch.n_edge.sum()), 64)
    return jraph.pad_with_graphs(batch, n_node=n_node, n_edge=n_edge, n_graph=n_graph)


def bucket_size(n: int, minimum: int) -> int:
    """Round `n` up to a size bucket: quarter steps between powers of two (<=25% padding)."""
    n = max(int(n), minimum)
    step = max(1, 2 ** int(math.floor(math.log2(n))) // 4)
    return int(math.ceil(n / step) * step)


def pack_batches(edge_counts: Sequence[int], max_edges: int, max_graphs: int) -> list[list[int]]:
    """Split structures into balanced batches (largest first into the emptiest batch).

    Balanced batches land in the same size bucket, so a chunk compiles once.
    """
    n = len(edge_counts)
    n_batches = max(math.ceil(sum(edge_counts) / max_edges), math.ceil(n / max_graphs), 1)
    batches: list[list[int]] = [[] for _ in range(n_batches)]
    loads = [0] * n_batches
    for i in sorted(range(n), key=lambda k: -edge_counts[k]):
        open_ = [b for b in range(n_batches) if len(batches[b]) < max_graphs]
        b = min(open_, key=lambda k: loads[k])
        batches[b].append(i)
        loads[b] += edge_counts[i]
    return [sorted(b) for b in batches if b]
