"""One active-learning iteration by hand, through the CLI, with real Nequix models and EMT."""

import json

import ase.io
from helpers import emt_labelled, make_cells

from nequix_fw.cli import main
from nequix_fw.dataset import read_labelled


def test_one_iteration_by_hand(trained, emt_data, tmp_path, capsys):
    def run(*argv):
        code = main([str(a) for a in argv])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        return cap.out

    ds = tmp_path / "training_set"
    run(
        "label",
        "--calculator",
        "emt",
        "--structures",
        emt_data["train"],
        "--output",
        tmp_path / "labels_0",
        "--iteration",
        0,
        "--no-progress",
    )
    out = run("update-dataset", "--new", tmp_path / "labels_0", "--dataset", ds, "--iteration", 0)
    assert "added 48 structures" in out
    cands = tmp_path / "candidates.extxyz"
    ase.io.write(cands, make_cells(12, seed=21) + [a.copy() for a in emt_labelled(4, 22)])
    models = sorted(trained["dir"].glob("member_*.nqx"))
    res = tmp_path / "ensemble_results.json"
    run(
        "run-ensemble", "--models", *models, "--structures", cands, "--output", res, "--no-progress"
    )
    out = run(
        "select",
        "--ensemble",
        res,
        "--lo",
        "0.0",
        "--max-selected",
        "5",
        "--diverse",
        "--output",
        tmp_path / "selected",
    )
    assert "selected 5" in out
    out = run(
        "label",
        "--calculator",
        "emt",
        "--structures",
        tmp_path / "selected",
        "--output",
        tmp_path / "dft_results",
        "--iteration",
        1,
        "--no-progress",
    )
    assert "labelled 5 of 5" in out
    out = run(
        "update-dataset", "--new", tmp_path / "dft_results", "--dataset", ds, "--iteration", 1
    )
    assert "added 5 structures" in out and "53 in" in out
    manifest = json.loads((tmp_path / "selected" / "manifest.json").read_text())
    chosen = {e["id"] for e in manifest["structures"] if e["selected"]}
    data = read_labelled([ds])
    assert {
        d.frame.atoms.info["structure_id"] for d in data if d.frame.atoms.info.get("iteration") == 1
    } == chosen  # provenance links dataset entries to the selection
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(
        "train_ensemble:\n  n_models: 2\n  epochs: 2\n  batch_size: 4\n  patience: null\n"
        "  architecture: {hidden_irreps: '16x0e + 8x1o', n_layers: 2, lmax: 1, "
        "radial_mlp_size: 16}\n"
    )
    out = run(
        "train-ensemble",
        "--dataset",
        ds,
        "--outdir",
        tmp_path / "models_1",
        "--warm-start",
        trained["dir"],
        "--config",
        cfg,
        "--no-progress",
    )
    assert "member 1: warm_start" in out
    meta = json.loads((tmp_path / "models_1" / "member_0.json").read_text())
    assert meta["n_train"] + meta["n_valid"] == 53
    new_models = sorted((tmp_path / "models_1").glob("*.nqx"))
    run(
        "validate",
        "--models",
        *new_models,
        "--testset",
        emt_data["test"],
        "--output",
        tmp_path / "val.json",
        "--no-plots",
    )
    rep = json.loads((tmp_path / "val.json").read_text())
    assert rep["ensemble_mean"]["forces_eV_per_A"]["rmse"] < 0.4
