"""The hand-made structure descriptor of diverse selection: composition fractions, a smeared
pair-distance histogram and the volume per atom. Invariant, cheap, and near-identical for
near-duplicate structures. (A model's learned features, the other descriptor, are in
`nequix_fw.features`.)
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.geometry import complete_cell
from matscipy.neighbours import neighbour_list

#: Radial range (Å) and bins of the distance histogram in the structural descriptor.
DESCRIPTOR_R = (0.5, 6.0)
DESCRIPTOR_BINS = 24


#: Spacing (Å) of the grid the pair distances are shared out on (linearly) before the
#: histogram's Gaussians are applied: each Gaussian is then off by at most 1e-4 of its height.
DISTANCE_GRID_A = 0.005


def _kernel() -> np.ndarray:
    """The histogram's Gaussians (one column per bin) at the distance grid's points."""
    r0, r1 = DESCRIPTOR_R
    centres = np.linspace(r0, r1, DESCRIPTOR_BINS)
    width = (r1 - r0) / DESCRIPTOR_BINS
    grid = np.arange(int(np.ceil(r1 / DISTANCE_GRID_A)) + 2) * DISTANCE_GRID_A
    return np.exp(-0.5 * ((grid[:, None] - centres[None, :]) / width) ** 2)


_KERNEL = _kernel()

#: The name under which a structure's `geometry` is kept (e.g. in the store or the ensemble
#: results): it changes with the descriptor's parameters, so that a kept one is never of
#: other parameters (``g<grid>``: the distance grid; without it, the exact Gaussians).
GEOMETRY_KEY = (
    f"geometry_{DESCRIPTOR_R[0]:g}_{DESCRIPTOR_R[1]:g}_{DESCRIPTOR_BINS}_g{DISTANCE_GRID_A:g}"
).replace(".", "p")


def structural(atoms: Atoms, elements: list[int]) -> np.ndarray:
    """Composition fractions + Gaussian-smeared pair-distance histogram per atom + volume/atom."""
    return np.concatenate([composition(atoms.numbers, elements), geometry(atoms)])


def composition(numbers: np.ndarray, elements: list[int]) -> np.ndarray:
    """The fraction of the atoms of each of `elements` (the first part of `structural`)."""
    numbers = np.asarray(numbers)
    return (numbers[None, :] == np.asarray(elements)[:, None]).mean(axis=1)


def geometry(atoms: Atoms) -> np.ndarray:
    """The element-free part of `structural`: the pair-distance histogram per atom and the
    volume per atom (what costs; the same for any elements, so it can be kept)."""
    d = neighbour_list(
        "d",
        positions=atoms.positions,
        cell=complete_cell(atoms.cell),
        pbc=atoms.pbc,
        cutoff=DESCRIPTOR_R[1],
    )
    return _geometry(atoms, d)


def graph_geometry(atoms: Atoms, graph: dict, cutoff: float) -> np.ndarray | None:
    """`geometry(atoms)` from the neighbour graph a model built for `atoms` with `cutoff` (Å;
    nequix's graph dict: `receivers`, `senders`, `shifts`), without a neighbour list of its
    own; None when that cutoff is shorter than the descriptor's range."""
    if cutoff < DESCRIPTOR_R[1]:
        return None
    pos = atoms.positions
    shifts = np.asarray(graph["shifts"], dtype=np.float64) @ complete_cell(atoms.cell)
    d = np.linalg.norm(pos[graph["senders"]] - pos[graph["receivers"]] + shifts, axis=1)
    return _geometry(atoms, d[d < DESCRIPTOR_R[1]])


def _geometry(atoms: Atoms, d: np.ndarray) -> np.ndarray:
    """`geometry` from the pair distances `d` (Å, both directions) within the range: each
    distance shared between its two neighbouring grid points, then the Gaussians."""
    x = d / DISTANCE_GRID_A
    j = x.astype(np.int64)
    f = x - j
    n = len(_KERNEL)
    counts = np.bincount(j, 1.0 - f, minlength=n) + np.bincount(j + 1, f, minlength=n)
    hist = counts[:n] @ _KERNEL / len(atoms)
    hist /= max(1.0, hist.sum()) / 10.0  # scale to ~unit weight against the composition part
    vol = [atoms.get_volume() / len(atoms) / 20.0] if atoms.pbc.all() else [0.0]
    return np.concatenate([hist, vol])
