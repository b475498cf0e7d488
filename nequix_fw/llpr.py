"""Last-layer prediction rigidity (LLPR): one model's uncertainty from its readout's posterior.

A Nequix energy is linear in its readout weights w (F scalar features h_i of the last layer,
F = 128 for `nequix-mp-1`): ``E = s sum_i h_i . w + const`` (s the model's scale). Around the
trained w*, the loss is quadratic in w with the Gauss-Newton precision ::

    A = l_E/G sum_g phi_g phi_g^T / N_g^2 + l_F/(3 N) sum_ia psi_ia psi_ia^T + l_S/(9 G) sum ...

(phi_g = s sum_i h_i the energy feature of structure g, psi_ia = d phi / d r_ia its force
feature, the stress feature likewise from the strain derivative; l_E, l_F, l_S the training's
loss weights), so that the readout's posterior is ``N(w*, alpha^2 (A + reg I)^-1)`` (Bigi et
al., "A prediction rigidity formalism for low-cost uncertainties in trained neural networks").
`alpha^2` and `reg` are fitted to the validation split's force errors (Gaussian likelihood).

The posterior is used through K heads, ``w* +- Sigma^(1/2) z_j`` with z_j orthogonal directions
of length sqrt(F) (antithetic pairs, so the heads' mean is the model itself): each head is a full
prediction of energy, forces and stress, so the ensemble engine's spread metrics
(`max_force_dev`, ...) are Monte Carlo estimates of the posterior's (exact with K = 2F).

The force and stress terms are JAX gradients of the heads' energies through the last
interaction layer, its input features held fixed (they depend on positions through the earlier
layers too; following them would cost one backward pass through the whole model per head, about
0.6 s per head for a 32-atom cell with `nequix-mp-1` on 2 CPU cores, against 0.04 s for 8 heads
through the last layer). The precision's force and stress features are taken the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import e3nn_jax as e3nn
import equinox as eqx
import jax
import jax.numpy as jnp
import jraph
import numpy as np
from nequix.data import atomic_numbers_to_indices, dict_to_graphstuple
from nequix.model import bessel_basis, node_graph_idx, polynomial_cutoff

from nequix_fw.errors import ModelError, StructureError
from nequix_fw.graphs import build_graph, pack_batches, pad_batch
from nequix_fw.models import NequixModel
from nequix_fw.structures import atomic_path
from nequix_fw.uncertainty import heads_path

logger = logging.getLogger(__name__)

#: Regularisations tried, relative to the precision's mean eigenvalue.
REGULARISATION_GRID = tuple(10.0**p for p in range(-8, 1))
#: Structures per batch of the fit (edges are capped as well).
MAX_GRAPHS = 8
MAX_EDGES = 8192


@dataclass
class LastLayerHeads:
    """The K readout-weight deviations of one checkpoint's LLPR posterior, and how they were
    fitted."""

    deviations: np.ndarray  # (K, F): w_k - w* in the units of `readout_weights`
    model_sha256: str  # the checkpoint they belong to
    alpha_sq: float  # the posterior's scale (fitted)
    regularization: float  # reg / mean eigenvalue of the precision (fitted or given)
    n_train: int  # structures in the precision
    n_valid: int  # structures alpha and reg were fitted on
    fitted_on: str  # "validation" or "training" (no validation split)
    seed: int

    @property
    def n_heads(self) -> int:
        return int(self.deviations.shape[0])

    def info(self) -> dict:
        out = asdict(self)
        out.pop("deviations")
        return {"method": "llpr", "n_heads": self.n_heads, **out}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = json.dumps(self.info())
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, deviations=self.deviations.astype(np.float32), meta=np.array(meta))
        return path

    @classmethod
    def load(cls, path: str | Path, model: NequixModel) -> LastLayerHeads:
        """Read `path`, refusing heads of another checkpoint than `model`."""
        try:
            with np.load(path) as z:
                deviations = np.asarray(z["deviations"], dtype=np.float64)
                meta = json.loads(str(z["meta"]))
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"{path}: not an LLPR heads file ({exc})") from None
        if meta.get("model_sha256") != model.info.sha256:
            raise ModelError(
                f"{path}: LLPR heads of another checkpoint (sha256 "
                f"{str(meta.get('model_sha256'))[:12]}), not of {model.info.path} (sha256 "
                f"{model.info.sha256[:12]}); fit them again (nequix-fw fit-llpr)"
            )
        if deviations.ndim != 2 or deviations.shape[1] != n_features(model.jax_module()):
            raise ModelError(f"{path}: heads of shape {deviations.shape} do not fit the model")
        keys = ("alpha_sq", "regularization", "n_train", "n_valid", "fitted_on", "seed")
        return cls(deviations, meta["model_sha256"], **{k: meta[k] for k in keys})


# -- the model's last layer ------------------------------------------------------------------


def n_features(module) -> int:
    """F, the scalar features the readout reads."""
    return int(module.readout.irreps_in.dim)


def readout_weights(module) -> np.ndarray:
    """The readout's effective weights (F,): node energy = scale * h . w + shift + e0 (an
    e3nn `Linear` scales its weights by its input's size)."""
    n = n_features(module)
    out = module.readout(e3nn.IrrepsArray(module.readout.irreps_in, jnp.eye(n)))
    return np.asarray(out.array[:, 0], dtype=np.float64)


def _geometry(module, data, positions, eps):
    """Spherical harmonics and radial basis of the edges of `data` with `positions` and the
    cell under the symmetric strain `eps`: nequix's `Nequix.__call__` with a cell."""
    eps = (eps + eps.swapaxes(1, 2)) / 2
    n_nodes, n_edges = positions.shape[0], data.edges["shifts"].shape[0]
    positions = positions + jnp.einsum(
        "ik,ikj->ij", positions, jnp.repeat(eps, data.n_node, axis=0, total_repeat_length=n_nodes)
    )
    cell = data.globals["cell"] + jnp.einsum("bij,bjk->bik", data.globals["cell"], eps)
    cell = jnp.repeat(cell, data.n_edge, axis=0, total_repeat_length=n_edges)
    r = (
        positions[data.senders]
        - positions[data.receivers]
        + jnp.einsum("ij,ijk->ik", data.edges["shifts"], cell)
    )
    # padding edges have length 0: give them a unit length, so that no gradient is NaN
    zero = jnp.sum(r**2, axis=-1) == 0.0
    r = jnp.where(zero[:, None], 1.0, r)
    norm = jnp.sqrt(jnp.sum(r**2, axis=-1))
    radial = (
        bessel_basis(norm, module.radial_basis_size, module.cutoff)
        * polynomial_cutoff(norm, module.cutoff, module.radial_polynomial_p)[:, None]
    )
    sh = e3nn.spherical_harmonics(
        e3nn.s2_irreps(module.lmax), r, normalize=True, normalization="component"
    )
    return sh, radial


def _layer(module, layer, features, data, sh, radial):
    return layer(features, data.nodes["species"], sh, radial, data.senders, data.receivers)


def _mean_and_last_input(module, data):
    """The model's own energies (G,), position and strain gradients of the total energy, and
    the input features of its last interaction layer (held fixed below)."""
    species = data.nodes["species"]

    def total(positions_eps):
        sh, radial = _geometry(module, data, *positions_eps)
        x = e3nn.IrrepsArray(
            e3nn.Irreps(f"{module.n_species}x0e"), jax.nn.one_hot(species, module.n_species)
        )
        for layer in module.layers[:-1]:
            x = _layer(module, layer, x, data, sh, radial)
        h = _layer(module, module.layers[-1], x, data, sh, radial)
        node = module.readout(h).array * module.scale + module.shift
        node = node + module.atom_energies[species, None]
        return jnp.sum(node), (node[:, 0], x)

    eps = jnp.zeros_like(data.globals["cell"])
    (g_pos, g_eps), (node, x) = eqx.filter_grad(total, has_aux=True)((data.nodes["positions"], eps))
    return node, g_pos, g_eps, jax.lax.stop_gradient(x)


def _last_layer(module, data, x):
    """The last layer's features (N, F) times the model's scale, and their VJP with respect to
    (positions, strain), its input features `x` fixed."""

    def last(positions_eps):
        sh, radial = _geometry(module, data, *positions_eps)
        return _layer(module, module.layers[-1], x, data, sh, radial).array * module.scale

    eps = jnp.zeros_like(data.globals["cell"])
    return jax.vjp(last, (data.nodes["positions"], eps))


def _per_graph(data, node_values):
    return jraph.segment_sum(
        node_values,
        node_graph_idx(data),
        num_segments=data.n_node.shape[0],
        indices_are_sorted=True,
    )


def _volume(data):
    det = jnp.abs(jnp.linalg.det(data.globals["cell"]))[:, None, None]
    return jnp.where(det > 0.0, det, 1.0)  # padded graphs have det = 0


def apply_heads(module, deviations, data):
    """Energies (K, G) in eV, forces (K, N, 3) in eV/Å and stresses (K, G, 3, 3) in eV/Å³ of
    the K heads ``w* + deviations[k]`` on a padded batch: the model's own prediction plus each
    head's deviation, whose gradients go through the last layer.

    The heads' VJPs run one after another (`lax.map`): under `jax.jit` on CPU (JAX 0.10.2),
    `vmap` over them gave wrong deviations for all heads but the first on models of two or more
    layers (eager `vmap` and jitted `lax.map` agree with one VJP per head;
    `tests/test_llpr.py` checks the jitted path)."""
    node_mask = jraph.get_node_padding_mask(data)
    graph_mask = jraph.get_graph_padding_mask(data)
    node, g_pos, g_eps, x = _mean_and_last_input(module, data)
    h, vjp = _last_layer(module, data, x)
    h = jnp.where(node_mask[:, None], h, 0.0)

    def deviation(w):
        (d_pos, d_eps) = vjp(jnp.where(node_mask[:, None], w[None, :], 0.0))[0]
        return d_pos, d_eps

    d_pos, d_eps = jax.lax.map(deviation, deviations)  # vmap: wrong heads under jit (below)
    energy = _per_graph(data, jnp.where(node_mask, node, 0.0))
    d_energy = _per_graph(data, h @ deviations.T).T  # (K, G)
    forces = -(g_pos[None] + d_pos)
    forces = jnp.where(node_mask[None, :, None], forces, 0.0)
    stress = (g_eps[None] + d_eps) / _volume(data)[None]
    stress = jnp.where(graph_mask[None, :, None, None], stress, 0.0)
    return energy[None] + d_energy, forces, stress


def _features(module, data):
    """Per batch: energy features (G, F), the model's forces (N, 3) and stresses (G, 3, 3),
    force features (F, N, 3) and stress features (F, G, 3, 3) (eV/Å³ per unit weight)."""
    node_mask = jraph.get_node_padding_mask(data)
    node, g_pos, g_eps, x = _mean_and_last_input(module, data)
    h, vjp = _last_layer(module, data, x)
    h = jnp.where(node_mask[:, None], h, 0.0)
    eye = jnp.eye(h.shape[1], dtype=h.dtype)
    d_pos, d_eps = jax.lax.map(
        lambda w: vjp(jnp.where(node_mask[:, None], w[None, :], 0.0))[0], eye
    )
    volume = _volume(data)
    return _per_graph(data, h), -g_pos, g_eps / volume, -d_pos, d_eps / volume[None]


_features_jit = eqx.filter_jit(_features)


# -- the fit ----------------------------------------------------------------------------------


@dataclass
class _Rows:
    """What the fit needs of a set of labelled structures."""

    energy: list  # (F,) per structure, divided by its atoms
    force: list  # (F, N_s, 3) per structure
    stress: list  # (F, 9) per periodic structure with a stress label
    force_error: list  # (N_s, 3) model minus label per structure
    n_atoms: int


def _rows(module, model: NequixModel, data: Sequence, want_stress: bool) -> _Rows:
    index = atomic_numbers_to_indices(model.atomic_numbers)
    graphs = [build_graph(d.frame.atoms, index, model.cutoff) for d in data]
    out = _Rows([], [], [], [], 0)
    for batch in pack_batches([int(g["n_edge"][0]) for g in graphs], MAX_EDGES, MAX_GRAPHS):
        padded = pad_batch([dict_to_graphstuple(graphs[i]) for i in batch], MAX_GRAPHS + 1)
        phi, forces, _, psi, sig = (
            np.asarray(v, dtype=np.float64) for v in _features_jit(module, padded)
        )
        start = 0
        for k, i in enumerate(batch):
            d, n = data[i], len(data[i].frame.atoms)
            out.energy.append(phi[k] / n)
            out.force.append(psi[:, start : start + n])
            out.force_error.append(forces[start : start + n] - d.forces)
            if want_stress and d.stress is not None and d.frame.atoms.pbc.all():
                out.stress.append(sig[:, k].reshape(len(sig), 9))  # as nequix's loss: 9
            start += n
        out.n_atoms += sum(len(data[i].frame.atoms) for i in batch)
    return out


def precision(rows: _Rows, weights: tuple[float, float, float]) -> np.ndarray:
    """The Gauss-Newton precision A (F, F) of the readout under nequix's loss with `weights`
    (energy per atom, force component, stress component)."""
    w_e, w_f, w_s = weights
    e = np.stack(rows.energy)
    a = w_e * e.T @ e / len(rows.energy)
    f = np.concatenate([p.reshape(p.shape[0], -1) for p in rows.force], axis=1)
    a += w_f * f @ f.T / (3 * rows.n_atoms)
    if rows.stress and w_s > 0:
        s = np.concatenate(rows.stress, axis=1)
        a += w_s * s @ s.T / (9 * len(rows.stress))
    return (a + a.T) / 2


def _component_variances(eig: np.ndarray, vecs: np.ndarray, rows: _Rows, reg: float):
    """Per force component of `rows`: psi^T (A + reg I)^-1 psi, and the squared errors."""
    f = np.concatenate([p.reshape(p.shape[0], -1) for p in rows.force], axis=1)
    proj = vecs.T @ f  # (F, components)
    var = ((proj**2) / (eig + reg)[:, None]).sum(axis=0)
    err2 = np.concatenate([e.ravel() for e in rows.force_error]) ** 2
    return var, err2


def fit_llpr(
    model: NequixModel,
    train: Sequence,
    valid: Sequence,
    weights: tuple[float, float, float],
    n_heads: int,
    regularization: float | None = None,
    seed: int = 0,
) -> LastLayerHeads:
    """LLPR heads for `model` from its training structures `train` and held-out `valid`
    (`labels.Labelled`, with forces): the precision from `train` under the loss `weights`, the
    scale alpha^2 and (when `regularization` is None) the regularisation by the Gaussian
    likelihood of the force errors on `valid` (on `train` when `valid` is empty)."""
    if n_heads < 2 or n_heads % 2:
        raise ModelError(f"LLPR needs an even number of heads >= 2, got {n_heads}")
    if not train:
        raise StructureError(f"LLPR of {model.info.path} needs training structures, got none")
    missing = [d.where for d in [*train, *valid] if d.forces is None]
    if missing:
        raise StructureError(f"{missing[0]}: no force labels, which LLPR needs")
    module = model.jax_module()
    t_rows = _rows(module, model, train, weights[2] > 0)
    a = precision(t_rows, weights)
    eig, vecs = np.linalg.eigh(a)
    eig = np.clip(eig, 0.0, None)
    mean_eig = max(float(eig.mean()), 1e-30)
    v_rows = _rows(module, model, valid, False) if valid else t_rows
    grid = REGULARISATION_GRID if regularization is None else (regularization,)
    best = None
    for rho in grid:
        var, err2 = _component_variances(eig, vecs, v_rows, rho * mean_eig)
        keep = var > 0
        var, err2 = var[keep], err2[keep]
        alpha_sq = float(np.mean(err2 / var))  # the likelihood's optimum for this reg
        nll = 0.5 * float(np.mean(np.log(alpha_sq * var) + err2 / (alpha_sq * var)))
        if best is None or nll < best[0]:
            best = (nll, rho, alpha_sq)
    _, rho, alpha_sq = best
    n = len(eig)
    root = vecs @ np.diag(np.sqrt(alpha_sq / (eig + rho * mean_eig))) @ vecs.T  # Sigma^(1/2)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    z = np.sqrt(n) * q[:, : n_heads // 2]  # orthogonal directions, E[z z^T] = I
    half = (root @ z).T
    deviations = np.concatenate([half, -half])  # antithetic: the heads' mean is the model
    logger.info(
        "LLPR of %s: %d heads, alpha^2 %.3g, regularisation %.0e of the mean eigenvalue",
        model.info.path,
        n_heads,
        alpha_sq,
        rho,
    )
    return LastLayerHeads(
        deviations=deviations,
        model_sha256=model.info.sha256,
        alpha_sq=alpha_sq,
        regularization=float(rho),
        n_train=len(train),
        n_valid=len(valid),
        fitted_on="validation" if valid else "training",
        seed=seed,
    )


def load_heads(model: NequixModel) -> LastLayerHeads | None:
    """The heads beside `model`'s checkpoint, if it has any."""
    path = heads_path(model.info.path)
    return LastLayerHeads.load(path, model) if path.is_file() else None
