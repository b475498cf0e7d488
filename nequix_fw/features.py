"""A Nequix model's learned features as the descriptor of diverse selection: invariant, and
near-identical for near-duplicate structures. (The hand-made descriptor is in
`nequix_fw.descriptors`.)"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from nequix.data import atomic_numbers_to_indices, dict_to_graphstuple

from nequix_fw.graphs import build_graph, pack_batches, pad_batch
from nequix_fw.models import NequixModel

#: Structures per batch of the learned features (one compilation per size bucket).
MAX_GRAPHS = 64


class LearnedFeatures:
    """A Nequix model's invariant per-atom features after its last layer (the input of its
    energy readout), summed per element and divided by the number of atoms: one block of
    features per element of the model, weighted by that element's share of the atoms."""

    def __init__(self, model: NequixModel, max_edges_per_batch: int = 8192):
        class _Features(eqx.Module):  # stands in for the readout: passes the features on
            def __call__(self, x):
                return x

        self.model = model
        self.max_edges = max_edges_per_batch
        module = model.jax_module()
        self._module = eqx.tree_at(lambda m: m.readout, module, _Features())
        self._fn = eqx.filter_jit(_node_features)
        self._e0 = np.asarray(module.atom_energies, dtype=np.float64)

    def __call__(self, structures: Sequence[Atoms]) -> np.ndarray:
        """One row per structure, (n elements x n features) columns."""

        zs = self.model.atomic_numbers
        index = atomic_numbers_to_indices(zs)
        graphs = [build_graph(a, index, self.model.cutoff) for a in structures]
        out: list[np.ndarray | None] = [None] * len(graphs)
        edges = [len(g["senders"]) for g in graphs]
        for batch in pack_batches(edges, self.max_edges, MAX_GRAPHS):
            padded = pad_batch([dict_to_graphstuple(graphs[i]) for i in batch], MAX_GRAPHS + 1)
            h = np.asarray(self._fn(self._module, padded), dtype=np.float64)
            start = 0
            for i in batch:
                n = len(structures[i])
                species = graphs[i]["species"]
                # the readout's shift and the atoms' reference energies are constant per element
                feats = h[start : start + n] - self._e0[species][:, None]
                block = np.zeros((len(zs), feats.shape[1]))
                np.add.at(block, species, feats)
                out[i] = (block / n).ravel()
                start += n
        return np.stack(out) if out else np.zeros((0, 0))


def _node_features(module, data):
    """`module.node_energies` of a padded periodic batch (nequix's own displacements)."""

    n_edges = data.edges["shifts"].shape[0]
    cell = jnp.repeat(data.globals["cell"], data.n_edge, axis=0, total_repeat_length=n_edges)
    offsets = jnp.einsum("ij,ijk->ik", data.edges["shifts"], cell)
    pos = data.nodes["positions"]
    r = pos[data.senders] - pos[data.receivers] + offsets
    return module.node_energies(r, data.nodes["species"], data.senders, data.receivers)
