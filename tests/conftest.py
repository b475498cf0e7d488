"""Shared fixtures: small random Nequix models, Cu/Au cells, the real foundation model."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from ase.build import bulk  # noqa: E402

from nequix_fw.models import new_model, save_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MP1 = SHARED / "models" / "nequix-mp-1.nqx"


def make_cells(n: int = 10, seed: int = 0, au_every: int = 3) -> list:
    """Rattled fcc Cu cells of 4-16 atoms, every `au_every`-th with one Au."""
    rng = np.random.default_rng(seed)
    cells = []
    for i in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1 + i % 2, 1 + (i // 2) % 2, 1))
        if au_every and i % au_every == 0:
            a.numbers[0] = 79
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        cells.append(a)
    return cells


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """Three small random Cu/Au models (different seeds) saved as .nqx."""
    d = tmp_path_factory.mktemp("models")
    for seed in range(3):
        module, config = new_model([29, 79], seed=seed, atom_energies={29: -3.7, 79: -3.2})
        save_model(d / f"m{seed}.nqx", module, config)
    return d


@pytest.fixture(scope="session")
def model_paths(model_dir) -> list[Path]:
    return sorted(model_dir.glob("m*.nqx"))


@pytest.fixture
def cells() -> list:
    return make_cells()


@pytest.fixture(scope="session")
def mp1() -> Path:
    if not MP1.is_file():
        pytest.skip(f"{MP1} not available")
    return MP1
