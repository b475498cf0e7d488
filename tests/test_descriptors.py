"""Descriptors of diverse selection (`nequix_fw.descriptors`, `nequix_fw.features`)."""

import numpy as np
from ase.build import molecule
from helpers import make_cells
from nequix.data import atomic_numbers_to_indices

from nequix_fw.descriptors import geometry, graph_geometry
from nequix_fw.features import LearnedFeatures
from nequix_fw.graphs import build_graph
from nequix_fw.models import load_model


def test_learned_features_are_invariant_and_batched(model_paths):
    """The learned descriptor: the same vector for a rotated, translated and permuted copy,
    the same in a batch as alone, one block of features per element weighted by its share."""

    model = load_model(model_paths[0])
    describe = LearnedFeatures(model)
    cells = make_cells(5, seed=41)
    a = cells[3]
    b = a.copy()
    b.rotate(37, "x", rotate_cell=True)
    b.rotate(71, "z", rotate_cell=True)
    b.translate([0.3, -1.1, 2.0])
    b = b[np.random.default_rng(0).permutation(len(b))]
    x = describe(cells + [b])
    assert x.shape == (6, 2 * (x.shape[1] // 2))
    np.testing.assert_allclose(x[5], x[3], atol=2e-5)
    np.testing.assert_allclose(describe([a])[0], x[3], atol=1e-5)
    # an all-Cu cell has nothing in the Au block; a near-copy is far closer than another cell
    cu = next(i for i, c in enumerate(cells) if 79 not in c.numbers)
    assert np.all(x[cu].reshape(2, -1)[1] == 0) and np.any(x[cu] != 0)
    c = a.copy()
    c.rattle(0.002, seed=1)
    near = np.linalg.norm(describe([c])[0] - x[3])
    assert near < 0.05 * min(np.linalg.norm(x[i] - x[3]) for i in range(5) if i != 3)


def test_geometry_from_a_models_graph_is_the_geometry():
    """The hand-made descriptor's geometry from a model's neighbour graph (cutoff 6 Å or more)
    equals its own neighbour list's, for periodic cells and a molecule; a shorter cutoff
    cannot give it."""
    index = atomic_numbers_to_indices([1, 6, 8, 29, 79])
    water = molecule("CH3CH2OH")
    for a in [*make_cells(4, seed=7), water]:
        for cutoff in (6.0, 7.5):
            g = graph_geometry(a, build_graph(a, index, cutoff), cutoff)
            np.testing.assert_allclose(g, geometry(a), rtol=1e-12, atol=1e-12)
        assert graph_geometry(a, build_graph(a, index, 5.0), 5.0) is None


def test_geometry_is_the_gaussian_distance_histogram():
    """The geometry's histogram (distances shared out on a grid first) against the exact sum
    of Gaussians over every pair distance within 6 Å, computed here from ASE's own neighbour
    list; the last entry is the volume per atom over 20 Å³."""
    from ase.neighborlist import neighbor_list

    from nequix_fw.descriptors import DESCRIPTOR_BINS, DESCRIPTOR_R

    centres = np.linspace(*DESCRIPTOR_R, DESCRIPTOR_BINS)
    width = (DESCRIPTOR_R[1] - DESCRIPTOR_R[0]) / DESCRIPTOR_BINS
    for a in make_cells(3, seed=11):
        d = neighbor_list("d", a, DESCRIPTOR_R[1])
        exact = np.exp(-0.5 * ((d[:, None] - centres) / width) ** 2).sum(axis=0) / len(a)
        exact /= max(1.0, exact.sum()) / 10.0
        g = geometry(a)
        np.testing.assert_allclose(g[:-1], exact, rtol=0, atol=2e-4 * exact.max())
        assert g[-1] == a.get_volume() / len(a) / 20.0
