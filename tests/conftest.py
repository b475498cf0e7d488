"""Shared fixtures: small random Nequix models, Cu/Au cells, the real foundation model."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from ase.build import bulk  # noqa: E402

from nequix_fw.models import new_model, save_model  # noqa: E402

NFW = str(Path(sys.executable).parent / "nequix-fw")
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


def emt_labelled(n: int, seed: int, max_au: int = 4, rattle: float = 0.1) -> list:
    """Rattled/strained 16-atom fcc Cu cells with up to `max_au` Au, labelled by ASE's EMT."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    from nequix_fw.exploration import distorted_copies

    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    out = []
    for a in distorted_copies(base, n, rattle_std=rattle, strain_max=0.03, seed=seed):
        a.numbers[rng.choice(len(a), size=rng.integers(0, max_au + 1), replace=False)] = 79
        a.calc = EMT()
        labels = dict(energy=a.get_potential_energy(), forces=a.get_forces(), stress=a.get_stress())
        a.calc = SinglePointCalculator(a, **labels)
        out.append(a)
    return out


TINY_ARCH = {"hidden_irreps": "16x0e + 8x1o", "n_layers": 2, "lmax": 1, "radial_mlp_size": 16}


@pytest.fixture(scope="session")
def emt_data(tmp_path_factory) -> dict:
    import ase.io

    d = tmp_path_factory.mktemp("emt")
    ase.io.write(d / "train.extxyz", emt_labelled(48, seed=0))
    ase.io.write(d / "test.extxyz", emt_labelled(16, seed=1))
    return {"train": d / "train.extxyz", "test": d / "test.extxyz", "dir": d}


@pytest.fixture(scope="session")
def trained(emt_data, tmp_path_factory) -> dict:
    """A 2-member tiny ensemble trained for 20 epochs on EMT data (shared by several tests)."""
    from nequix_fw.settings import TrainingSettings
    from nequix_fw.training import train_ensemble

    out = tmp_path_factory.mktemp("trained")
    settings = TrainingSettings(
        n_models=2, epochs=20, batch_size=4, patience=None, architecture=TINY_ARCH
    )
    metas = train_ensemble([emt_data["train"]], out, settings, progress=False)
    return {"dir": out, "metas": metas, "settings": settings}


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory) -> dict:
    """One local MongoDB server for the test run, started and stopped with `nequix-fw db`;
    its LaunchPad settings."""
    d = tmp_path_factory.mktemp("mongo")
    lp = d / "launchpad.yaml"
    subprocess.run(
        [NFW, "db", "start", "--dir", str(d / "server"), "--launchpad", str(lp)],
        check=True,
        capture_output=True,
    )
    yield {**yaml.safe_load(lp.read_text()), "directory": d / "server"}
    subprocess.run([NFW, "db", "stop", "--dir", str(d / "server")], capture_output=True)


@pytest.fixture
def launchpad_file(mongo_server, tmp_path, request) -> Path:
    """`tmp_path/my_launchpad.yaml`: a database of this test's own on the test server."""
    config = {k: v for k, v in mongo_server.items() if k != "directory"}
    test = re.sub(r"[^A-Za-z0-9]", "_", request.node.name)[:40]
    config["name"] = f"{test}_{uuid.uuid4().hex[:6]}"
    path = tmp_path / "my_launchpad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def preset_inputs(d: Path, element: str) -> None:
    """initial_structures/, candidates/ and validation_set/ for a preset run in `d`."""
    for sub in ("initial_structures", "candidates", "validation_set"):
        (d / sub).mkdir()
    if element == "Si":
        cells = [bulk("Si", "diamond", a=5.43, cubic=True) for _ in range(3)]
        for k, a in enumerate(cells):
            a.rattle(0.05, seed=k)
        ase.io.write(d / "initial_structures" / "si.extxyz", cells)
        ase.io.write(d / "validation_set" / "si.extxyz", emt_labelled(2, seed=1))  # any labels
    else:
        ase.io.write(d / "initial_structures" / "cells.extxyz", make_cells(5, seed=3))
        ase.io.write(d / "candidates" / "pool.extxyz", make_cells(4, seed=5))
        ase.io.write(d / "validation_set" / "test.extxyz", emt_labelled(4, seed=9))
