"""Shared fixtures: small random Nequix models, Cu/Au cells, the real foundation model."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import re  # noqa: E402
import subprocess  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import ase.io  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from helpers import MP1, NFW, TINY_ARCH, emt_labelled, make_cells  # noqa: E402

from nequix_fw.models import new_model, save_model  # noqa: E402

#: What a test run may add to the checkout: caches and the installed package's metadata.
_RUN_DEBRIS = ("__pycache__/", ".pytest_cache/", ".ruff_cache/", ".egg-info/", ".venv/")
_BEFORE = pytest.StashKey[set | None]()


def _checkout_entries(config) -> set[str] | None:
    """`git status` of the checkout holding these tests, ignored files too (None outside git)."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"],
        cwd=config.rootpath,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        return None
    return {e for e in out.stdout.splitlines() if not any(d in e for d in _RUN_DEBRIS)}


def pytest_configure(config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        config.stash[_BEFORE] = _checkout_entries(config)


def pytest_sessionfinish(session, exitstatus) -> None:
    """A test run that leaves files in the checkout (or changes committed ones) fails: tests
    write in temporary directories only."""
    before = session.config.stash.get(_BEFORE, None)
    after = _checkout_entries(session.config) if before is not None else None
    left = sorted(after - before) if after is not None else []
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nthe test run left files in the checkout:\n  " + "\n  ".join(left))


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


@pytest.fixture(scope="session")
def emt_data(tmp_path_factory) -> dict:

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
