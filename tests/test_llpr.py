"""LLPR (`nequix_fw.llpr`): the readout's posterior against brute force, its heads in the
ensemble engine, and what it refuses."""

import json
import shutil

import ase.io
import e3nn_jax as e3nn
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.stress import voigt_6_to_full_3x3_stress
from helpers import TINY_ARCH
from nequix.data import atomic_numbers_to_indices, dict_to_graphstuple
from nequix.train import loss as nequix_loss

from nequix_fw import llpr
from nequix_fw.cli import main
from nequix_fw.ensemble import Ensemble
from nequix_fw.errors import ModelError
from nequix_fw.evaluation import run_ensemble
from nequix_fw.graphs import build_graph, pad_batch
from nequix_fw.labels import Labelled
from nequix_fw.models import ModelInfo, NequixModel, load_model, new_model, save_model
from nequix_fw.results import read_results
from nequix_fw.selection import select_from_results
from nequix_fw.settings import SelectionSettings, TrainingSettings
from nequix_fw.structures import Frame
from nequix_fw.training import train_ensemble
from nequix_fw.uncertainty import heads_path
from nequix_fw.validation import validate

WEIGHTS = (300.0, 10.0, 5.0)  # energy, force, stress loss weights


class _Readout(eqx.Module):
    """A readout h . w with w a plain array: brute force differentiates through it."""

    w: jax.Array

    def __call__(self, x):
        return e3nn.IrrepsArray("0e", x.array @ self.w[:, None])


def _labelled(n: int) -> list[Labelled]:
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.numbers[k % 4] = 79
        a.rattle(0.1, seed=k)
        a.calc = EMT()
        f, e, s = a.get_forces(), a.get_potential_energy(), a.get_stress()
        out.append(Labelled(Frame(a.copy(), "cells.extxyz", k), e, f, s))
    return out


def _batch(data, cutoff):
    index = atomic_numbers_to_indices([29, 79])
    graphs = []
    for d in data:
        g = build_graph(d.frame.atoms, index, cutoff)
        g["forces"] = d.forces.astype(np.float32)
        g["energy"] = np.array([d.energy], np.float32)
        g["stress"] = voigt_6_to_full_3x3_stress(d.stress).astype(np.float32)
        graphs.append(dict_to_graphstuple(g))
    return pad_batch(graphs, len(graphs) + 1)


def test_llpr_is_the_loss_hessian_and_its_heads_give_the_posterior_force_variance():
    # one interaction layer: its input (one-hot species) does not move with the atoms, so the
    # last-layer gradients are the model's whole force Jacobian and brute force can check all
    module, config = new_model(
        [29, 79], seed=1, n_layers=1, hidden_irreps="6x0e + 2x1o", lmax=1, cutoff=4.0
    )
    model = NequixModel(
        ModelInfo("tiny", "tiny.nqx", "sha", "jax", ["Cu", "Au"], 4.0, 0), config, module
    )
    data = _labelled(5)
    batch = _batch(data, 4.0)
    w0 = jnp.asarray(llpr.readout_weights(module), jnp.float32)
    n_f = len(w0)

    def with_w(w):
        return eqx.tree_at(lambda m: m.readout, module, _Readout(w))

    # the readout's effective weights reproduce the model
    e_model = np.asarray(module(batch)[0])[:5]
    assert np.asarray(with_w(w0)(batch)[0])[:5] == pytest.approx(e_model, abs=1e-4)
    # precision = half the Hessian of nequix's own loss in the readout weights
    a = llpr.precision(llpr._rows(module, model, data, True), WEIGHTS)
    hessian = np.asarray(
        jax.hessian(lambda w: nequix_loss(with_w(w), batch, *WEIGHTS, "mse")[0])(w0)
    )
    assert np.abs(hessian - 2 * a).max() < 1e-5 * np.abs(hessian).max()
    for weights in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)):  # each term alone
        a = llpr.precision(llpr._rows(module, model, data, True), weights)
        h = jax.hessian(lambda w, wt=weights: nequix_loss(with_w(w), batch, *wt, "mse")[0])(w0)
        assert np.abs(np.asarray(h) - 2 * a).max() < 1e-4 * np.abs(np.asarray(h)).max()

    # 2F heads (F antithetic pairs along orthogonal directions): the posterior exactly
    heads = llpr.fit_llpr(model, data[:4], data[4:], WEIGHTS, n_heads=2 * n_f)
    dev = jnp.asarray(heads.deviations, jnp.float32)
    energies, forces, stresses = (
        np.asarray(x, np.float64) for x in llpr.apply_heads(module, dev, batch)
    )
    a_train = llpr.precision(llpr._rows(module, model, data[:4], True), WEIGHTS)
    reg = heads.regularization * np.linalg.eigvalsh(a_train).clip(0).mean()
    sigma = heads.alpha_sq * np.linalg.inv(a_train + reg * np.eye(n_f))
    jac = np.asarray(jax.jacfwd(lambda w: with_w(w)(batch)[1])(w0), np.float64)  # (N, 3, F)
    n = 20  # real atoms (5 cells of 4)
    want = np.einsum("naf,fg,nag->n", jac, sigma, jac)[:n]
    got = ((forces - forces.mean(0)) ** 2).sum(-1).mean(0)[:n]
    assert got == pytest.approx(want, rel=1e-3)
    # energies: the variance of phi . w; heads average to the model itself
    phi = np.asarray(jax.jacfwd(lambda w: with_w(w)(batch)[0])(w0), np.float64)[:5]
    assert energies.var(0)[:5] == pytest.approx(np.einsum("gf,fh,gh->g", phi, sigma, phi), rel=1e-3)
    assert energies.mean(0)[:5] == pytest.approx(e_model, abs=1e-4)
    assert forces.mean(0)[:n] == pytest.approx(np.asarray(module(batch)[1])[:n], abs=1e-5)
    # alpha^2 is the likelihood's optimum: the validation errors over the predicted variances
    v = llpr._rows(module, model, data[4:], False)
    var, err2 = llpr._component_variances(*np.linalg.eigh(a_train), v, reg)
    assert heads.alpha_sq == pytest.approx(np.mean(err2 / var), rel=1e-6)
    assert heads.fitted_on == "validation" and heads.n_train == 4


def test_heads_of_a_deeper_model_average_to_the_model_jitted_or_not():
    module, config = new_model([29, 79], seed=2, **TINY_ARCH)
    data = _labelled(3)
    batch = _batch(data, config["cutoff"])
    rng = np.random.default_rng(0)
    half = rng.normal(size=(3, llpr.n_features(module)))
    dev = jnp.asarray(np.concatenate([half, -half]), jnp.float32)
    e, f, s = (np.asarray(x) for x in eqx.filter_jit(llpr.apply_heads)(module, dev, batch))
    e0, f0, s0 = (np.asarray(x) for x in module(batch))
    assert e.mean(0)[:3] == pytest.approx(e0[:3], abs=1e-4)
    assert f.mean(0)[:12] == pytest.approx(f0[:12], abs=1e-5)
    assert s.mean(0)[:3] == pytest.approx(s0[:3], abs=1e-6)
    assert e.std(0)[:3].min() > 0 and np.abs(f - f0).max() > 1e-4  # the heads do differ
    for k in range(6):  # each compiled head is that head alone, computed eagerly
        _, fk, sk = (np.asarray(x) for x in llpr.apply_heads(module, dev[k : k + 1], batch))
        assert f[k, :12] == pytest.approx(fk[0, :12], abs=1e-5)
        assert s[k, :3] == pytest.approx(sk[0, :3], abs=1e-6)


@pytest.fixture(scope="module")
def llpr_member(emt_data, tmp_path_factory):
    """One tiny member trained with LLPR heads."""
    out = tmp_path_factory.mktemp("llpr")
    s = TrainingSettings(
        n_models=1,
        epochs=10,
        uncertainty="llpr",
        llpr_heads=8,
        architecture=TINY_ARCH,
        patience=None,
        save_torch=False,
    )
    (meta,) = train_ensemble([emt_data["train"]], out, s, progress=False)
    return {"dir": out, "meta": meta, "model": out / "member_0.nqx"}


def test_one_member_with_heads_is_an_ensemble(llpr_member, emt_data, tmp_path):
    meta = llpr_member["meta"]
    assert meta["llpr"]["n_heads"] == 8 and meta["llpr"]["alpha_sq"] > 0
    assert (llpr_member["dir"] / "member_0.llpr.npz").is_file()
    out = tmp_path / "r.json"
    run_ensemble([llpr_member["model"]], [emt_data["test"]], out, progress=False)
    header, records = read_results(out)
    records = list(records)
    assert header["uncertainty_method"] == "llpr"
    assert header["models"][0]["llpr"]["n_heads"] == 8
    model = load_model(llpr_member["model"])
    atoms = [Atoms(**r["structure"]) for r in records]
    plain = Ensemble([model]).predict(atoms)
    for rec, p in zip(records, plain, strict=True):
        assert len(rec["energies"]) == 8  # a row per head
        assert rec["metrics"]["max_force_dev"] > 0
        assert np.mean(rec["energies"]) == pytest.approx(p.energies[0], abs=1e-4)
        assert rec["forces"].mean(0) == pytest.approx(p.forces[0], abs=1e-4)
    # selection takes the heads' spread as the uncertainty: the most uncertain first
    manifest = select_from_results(out, tmp_path / "sel", SelectionSettings(lo=0.0, max_selected=3))
    devs = sorted((r["metrics"]["max_force_dev"] for r in records), reverse=True)
    picked = [e["metrics"]["max_force_dev"] for e in manifest["structures"] if e["selected"]]
    assert sorted(picked, reverse=True) == pytest.approx(devs[:3])
    assert len(list((tmp_path / "sel").glob("*.vasp"))) == 3
    # the uncertainty ranks the errors of the model on held-out structures
    report = validate([llpr_member["model"]], [emt_data["test"]], tmp_path / "v.json")
    assert list(report["per_model"]) == ["0:member_0"]
    assert report["uncertainty"]["spearman_max_force_dev_vs_max_force_error"] > 0.3


def test_heads_of_another_checkpoint_and_a_lone_model_are_refused(
    llpr_member, model_paths, emt_data, tmp_path, capsys
):
    other = tmp_path / "other.nqx"
    shutil.copy(model_paths[0], other)
    shutil.copy(llpr_member["dir"] / "member_0.llpr.npz", tmp_path / "other.llpr.npz")
    with pytest.raises(
        ModelError, match=r"other.llpr.npz: LLPR heads of another checkpoint .*other.nqx"
    ):
        Ensemble.from_specs([other])
    (tmp_path / "other.llpr.npz").unlink()
    code = main(
        [
            "run-ensemble",
            "--models",
            str(other),
            "--structures",
            str(emt_data["test"]),
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "at least 2 models, or a model with LLPR heads" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--llpr-heads", "3"], "antithetic pairs: give an even number, not 3"),
        (["--llpr-heads", "0"], "llpr_heads"),
        (["--uncertainty", "dropout"], "invalid choice: 'dropout'"),
        (
            ["--reinitialise", "readout"],
            "reinitialise, freeze and foundation_member are for fine-tuning",
        ),
    ],
)
def test_bad_uncertainty_settings_exit_2_and_write_nothing(
    flags, message, emt_data, tmp_path, capsys
):
    out = tmp_path / "models"
    argv = ["train-ensemble", "--dataset", str(emt_data["train"]), "--outdir", str(out), *flags]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses a choice itself
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_dataset_without_forces_is_refused_naming_the_structure(tmp_path):
    module, config = new_model([29, 79], seed=0, **TINY_ARCH)
    path = save_model(tmp_path / "m.nqx", module, config)
    model = load_model(path)
    data = _labelled(2)
    data[1] = Labelled(data[1].frame, data[1].energy, None, None)
    with pytest.raises(Exception, match=r"cells.extxyz frame 1: no force labels, which LLPR needs"):
        llpr.fit_llpr(model, data, [], WEIGHTS, 4)
    with pytest.raises(ModelError, match="even number of heads"):
        llpr.fit_llpr(model, data[:1], [], WEIGHTS, 3)
    heads = llpr.fit_llpr(model, data[:1], [], WEIGHTS, 4)
    assert heads.fitted_on == "training"
    path = heads.save(heads_path(path))
    assert json.loads(str(np.load(path)["meta"]))["model_sha256"] == model.info.sha256
    assert llpr.load_heads(model).deviations == pytest.approx(heads.deviations, rel=1e-6)


def test_the_store_keeps_a_members_heads_and_export_brings_them_back(
    llpr_member, launchpad_file, tmp_path
):
    from nequix_fw.store import CampaignStore

    store = CampaignStore(launchpad_file, "llpr")
    store.save_members(0, llpr_member["dir"], [llpr_member["meta"]])
    (path,) = store.fetch_members(0, tmp_path / "fetched")
    heads = tmp_path / "fetched" / "member_0.llpr.npz"
    assert heads.read_bytes() == (llpr_member["dir"] / "member_0.llpr.npz").read_bytes()
    assert len(Ensemble.from_specs([path])) == 8  # the fetched model brings its 8 heads


def test_exploration_runs_on_one_member_with_heads(llpr_member, tmp_path, capsys):
    start = tmp_path / "start.extxyz"
    ase.io.write(start, bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1)))
    argv = ["explore", "--models", str(llpr_member["model"]), "--structures", str(start)]
    argv += ["--output", str(tmp_path / "cands"), "--temperatures", "300", "900"]
    argv += ["--steps", "40", "--sample-every", "20", "--no-progress"]
    assert main(argv) == 0
    frames = ase.io.read(tmp_path / "cands" / "candidates.extxyz", ":")
    # the walkers' uncertainty is the heads' spread: on every sampled frame, and what stops a
    # trajectory (the tiny member is unsure at 900 K)
    assert len(frames) >= 2 and all(f.info["max_force_dev"] > 0 for f in frames)
    manifest = json.loads((tmp_path / "cands" / "manifest.json").read_text())
    assert {t["stop_reason"] for t in manifest["trajectories"]} <= {"completed", "uncertainty"}
