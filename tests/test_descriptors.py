"""Descriptors of diverse selection (`nequix_fw.descriptors`)."""

import numpy as np
from helpers import make_cells

from nequix_fw.descriptors import LearnedFeatures
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
