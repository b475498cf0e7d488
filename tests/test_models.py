import hashlib
import shutil

import equinox as eqx
import jax
import numpy as np
import pytest
from ase.build import bulk

from nequix_fw.errors import ModelError
from nequix_fw.models import convert_checkpoint, load_model, new_model, save_model


def test_info_reports_path_hash_elements_cutoff_params(model_paths):
    m = load_model(model_paths[0])
    info = m.info
    assert info.path == str(model_paths[0].resolve())
    assert info.sha256 == hashlib.sha256(model_paths[0].read_bytes()).hexdigest()
    assert info.backend == "jax"
    assert info.elements == ["Cu", "Au"]
    assert info.cutoff == 5.0
    leaves = jax.tree_util.tree_leaves(eqx.filter(m.module, eqx.is_array))
    assert info.n_params == sum(x.size for x in leaves) - 2 > 1000  # minus 2 reference energies


def test_nqx_and_pt_give_same_energies(model_paths, tmp_path):
    pt = convert_checkpoint(model_paths[0], tmp_path / "m0.pt")
    jax_model, torch_model = load_model(model_paths[0]), load_model(pt)
    assert torch_model.info.backend == "torch"
    assert torch_model.info.n_params == jax_model.info.n_params
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.numbers[1] = 79
    atoms.rattle(0.1, seed=3)
    results = []
    for model, backend in [(jax_model, "jax"), (torch_model, "torch"), (jax_model, "torch")]:
        a = atoms.copy()
        a.calc = model.calculator(backend=backend)
        results.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    for e, f, s in results[1:]:
        assert e == pytest.approx(results[0][0], abs=1e-5)
        np.testing.assert_allclose(f, results[0][1], atol=1e-5)
        np.testing.assert_allclose(s, results[0][2], atol=1e-6)


def test_pretrained_name_from_nequix_cache(mp1, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = tmp_path / ".cache" / "nequix" / "models"
    cache.mkdir(parents=True)
    shutil.copy(mp1, cache / "nequix-mp-1.nqx")
    info = load_model("nequix-mp-1").info
    assert info.name == "nequix-mp-1"
    assert info.sha256 == "1647af8e627e1afa11e2bfadeab0797326513a521afd7dd01606a96f56783eee"
    assert info.cutoff == 6.0
    assert len(info.elements) == 89 and "Cu" in info.elements


def test_pretrained_missing_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"nequix-oam-1 is not in .*\.cache/nequix/models.*copy"):
        load_model("nequix-oam-1")


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(ModelError, match="neither a model file nor a known pretrained name"):
        load_model("no-such-model")
    with pytest.raises(ModelError, match="model file not found"):
        load_model(tmp_path / "absent.nqx")


@pytest.mark.parametrize("suffix", [".nqx", ".pt"])
def test_truncated_checkpoint(model_paths, tmp_path, suffix):
    src = model_paths[0]
    if suffix == ".pt":
        src = convert_checkpoint(src, tmp_path / "a.pt")
    data = src.read_bytes()
    bad = tmp_path / f"cut{suffix}"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelError, match=r"cut\.\w+: truncated or corrupted checkpoint"):
        load_model(bad)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.nqx"
    bad.write_text("these are not weights\n")
    with pytest.raises(ModelError, match="notes.nqx: not a Nequix checkpoint"):
        load_model(bad)
    other = tmp_path / "cfg.nqx"
    other.write_text('{"cutoff": 5.0}\nxx')
    with pytest.raises(ModelError, match="config lacks atomic_numbers"):
        load_model(other)


def test_new_models_differ_by_seed(tmp_path):
    a, ca = new_model([29], seed=0)
    b, _ = new_model([29], seed=1)
    la = jax.tree_util.tree_leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree_util.tree_leaves(eqx.filter(b, eqx.is_array))
    assert any(not np.allclose(x, y) for x, y in zip(la, lb, strict=True))
    path = save_model(tmp_path / "a.nqx", a, ca)
    assert load_model(path).config["seed"] == 0
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file
