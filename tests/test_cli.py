"""The `nequix-fw` CLI: end to end, and every bad input gives one line, exit 2, no output."""

import json
import os
import subprocess
import sys

import ase.io
import pytest
from ase import Atoms
from helpers import make_cells

from nequix_fw.cli import main
from nequix_fw.models import new_model, save_model
from nequix_fw.results import read_results


@pytest.fixture
def pool(tmp_path):
    d = tmp_path / "initial_structures"
    d.mkdir()
    cells = make_cells(6, seed=2)
    ase.io.write(d / "a.extxyz", cells[:4])  # multi-frame file
    ase.io.write(d / "POSCAR", cells[4], format="vasp")
    ase.io.write(d / "b.cif", cells[5])
    (d / "README.txt").write_text("not a structure, skipped")
    return d


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_ensemble_then_select_end_to_end(model_paths, pool, tmp_path):
    out = tmp_path / "ensemble_results.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "nequix_fw.cli"]
    r = subprocess.run(
        [*cmd, "run-ensemble", "--models", *model_paths, "--structures", pool, "--output", out],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "evaluated 6 structures (48 atoms) with 3 models; 0 failed" in r.stdout
    doc = json.loads(out.read_text())
    assert [(s["source"].split("/")[-1], s["frame"]) for s in doc["structures"]] == [
        ("POSCAR", 0),
        ("a.extxyz", 0),
        ("a.extxyz", 1),
        ("a.extxyz", 2),
        ("a.extxyz", 3),
        ("b.cif", 0),
    ]
    r = subprocess.run(
        [
            *cmd,
            "select",
            "--ensemble",
            out,
            "--threshold",
            "0.0",
            "--max-selected",
            "2",
            "--output",
            tmp_path / "selected_structures",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "0 accurate, 6 candidate, 0 failed; selected 2" in r.stdout
    manifest = json.loads((tmp_path / "selected_structures" / "manifest.json").read_text())
    files = [e["file"] for e in manifest["structures"] if e["selected"]]
    assert len(files) == 2 and all((tmp_path / "selected_structures" / f).is_file() for f in files)


def test_console_script_reports_bad_input_with_exit_2(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "nequix-fw")
    r = subprocess.run(
        [
            exe,
            "run-ensemble",
            "--models",
            tmp_path / "m.nqx",
            tmp_path / "n.nqx",
            "--structures",
            tmp_path,
            "--output",
            tmp_path / "o.json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'm.nqx'}: model file not found"
    assert not (tmp_path / "o.json").exists()


def test_model_info(capsys, model_paths):
    code, out, _ = run_cli(capsys, "model-info", model_paths[0])
    assert code == 0
    info = json.loads(out)[0]
    assert info["elements"] == ["Cu", "Au"] and info["cutoff"] == 5.0 and info["n_params"] > 0


def _bad_structures(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "nope.xyz", "nope.xyz: no such file or directory"
    if kind == "malformed":
        p = tmp_path / "bad.xyz"
        p.write_text("3\ncomment\nCu 0 0 0\n")
        return p, "bad.xyz: cannot read structures (ase.io.extxyz: Frame has 1 atoms, expected 3)"
    if kind == "uncovered":
        p = tmp_path / "rn.xyz"
        ase.io.write(p, [make_cells(1)[0], Atoms("CuRn", positions=[[0, 0, 0], [3, 0, 0]])])
        return p, "rn.xyz frame 1: contains Rn, which the models do not cover"
    if kind == "empty":
        p = tmp_path / "empty"
        p.mkdir()
        return p, "no structure files in"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "malformed", "uncovered", "empty"])
def test_bad_structure_inputs(capsys, model_paths, tmp_path, kind):
    structures, msg = _bad_structures(tmp_path, kind)
    out = tmp_path / "res.json"
    code, _, err = run_cli(
        capsys,
        "run-ensemble",
        "--models",
        *model_paths[:2],
        "--structures",
        structures,
        "--output",
        out,
        "--no-progress",
    )
    assert code == 2
    assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".res.json*"))


def test_fewer_than_two_models(capsys, model_paths, pool, tmp_path):
    code, _, err = run_cli(
        capsys,
        "run-ensemble",
        "--models",
        model_paths[0],
        "--structures",
        pool,
        "--output",
        tmp_path / "r.json",
    )
    assert code == 2 and f"{model_paths[0]}: one model without LLPR heads (no m0.llpr.npz" in err
    assert "uncertainty needs at least 2 models, or a model with LLPR heads" in err


def test_models_with_different_cutoffs(capsys, model_paths, pool, tmp_path):
    m, c = new_model([29, 79], seed=0, cutoff=4.0)
    (tmp_path / "short").mkdir()
    short = save_model(tmp_path / "short" / "m0.nqx", m, c)  # the same file name: paths tell
    code, _, err = run_cli(
        capsys,
        "run-ensemble",
        "--models",
        model_paths[0],
        short,
        "--structures",
        pool,
        "--output",
        tmp_path / "r.json",
    )
    assert code == 2
    assert f"models {model_paths[0]} and {short} have different cutoffs (5.0 Å vs 4.0 Å)" in err
    assert not (tmp_path / "r.json").exists()


def test_output_not_writable(capsys, model_paths, pool, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(
        capsys,
        "run-ensemble",
        "--models",
        *model_paths[:2],
        "--structures",
        pool,
        "--output",
        blocker / "r.json",
    )
    assert code == 2 and f"error: {blocker}: cannot write there" in err


def test_non_finite_run_continues_and_records(capsys, model_paths, pool, tmp_path):
    m, c = new_model([29, 79], seed=0, atom_energies={29: -3.7, 79: float("inf")})
    bad = save_model(tmp_path / "inf_au.nqx", m, c)
    out = tmp_path / "r.json"
    code, stdout, _ = run_cli(
        capsys,
        "run-ensemble",
        "--models",
        model_paths[0],
        bad,
        "--structures",
        pool,
        "--output",
        out,
        "--no-progress",
    )
    assert code == 0
    doc = json.loads(out.read_text())  # one valid JSON document
    assert len(doc["structures"]) == doc["summary"]["n_structures"]
    failed = [s for s in read_results(out)[1] if s["status"] == "failed"]
    assert failed and all(79 in s["structure"]["numbers"] for s in failed)
    assert failed[0]["error"] == "non-finite prediction from inf_au"
    assert failed[0]["energies"][1] is None  # inf written as null, file stays valid JSON
    assert f"{len(failed)} failed" in stdout
    code, stdout, _ = run_cli(
        capsys, "select", "--ensemble", out, "--lo", "0", "--output", tmp_path / "sel"
    )
    assert code == 0 and f"{len(failed)} failed" in stdout


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--lo", "0.3", "--hi", "0.1"], "lo (0.3 eV/Å) must not exceed hi (0.1 eV/Å)"),
        (["--threshold", "-0.1"], "lo must be >= 0 eV/Å, got -0.1"),
        (["--lo", "high"], "--lo 'high': a number (eV/Å) or auto"),
        (["--threshold", "0.1", "--lo", "0.1"], "give --threshold or --lo, not both"),
    ],
)
def test_bad_selection_options(capsys, tmp_path, args, msg):
    code, _, err = run_cli(
        capsys, "select", "--ensemble", tmp_path / "r.json", "--output", tmp_path / "s", *args
    )
    assert code == 2 and msg in err and not (tmp_path / "s").exists()


def test_settings_yaml(capsys, tmp_path):
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("select:\n  lo: 0.5\n  hi: 0.2\n")
    code, _, err = run_cli(
        capsys,
        "select",
        "--ensemble",
        tmp_path / "r.json",
        "--output",
        tmp_path / "s",
        "--config",
        cfg,
    )
    assert code == 2 and "lo (0.5 eV/Å) must not exceed hi (0.2 eV/Å)" in err
    cfg.write_text("selektion:\n  lo: 0.5\n")
    code, _, err = run_cli(
        capsys,
        "select",
        "--ensemble",
        tmp_path / "r.json",
        "--output",
        tmp_path / "s",
        "--config",
        cfg,
    )
    assert code == 2 and "unknown section(s) ['selektion']" in err


def test_missing_results_file(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "select", "--ensemble", tmp_path / "r.json", "--output", tmp_path / "s"
    )
    assert code == 2 and "r.json: cannot read ensemble results (No such file or directory)" in err


def test_cli_argument_errors(tmp_path, capsys):
    """Malformed explore/campaign arguments: one-line errors, exit 2, before any model work."""
    from nequix_fw.cli import main

    base = [
        "explore",
        "--models",
        "unused.nqx",
        "--structures",
        "unused.xyz",
        "--output",
        str(tmp_path / "o"),
    ]
    cases = [
        (
            [*base, "--distortions", "2", "--substitute", "CuAu"],
            "--substitute 'CuAu': expected OLD:NEW",
        ),
        ([*base, "--random", "Cu16:dense"], "--random 'Cu16:dense': expected FORMULA:DENSITY[:N]"),
        ([*base, "--random", "Xx2:5"], "composition 'Xx2' names unknown elements ['Xx']"),
        (
            [*base, "--strain", "0.02"],
            "--strain shapes distorted copies, but none are made: give --distortions N",
        ),
        ([*base, "--thermostat", "bussi", "--steps", "-3"], "invalid ExplorationSettings: steps"),
        (
            ["campaign", "--config", str(tmp_path / "c.yaml")],
            "give --launchpad (add the workflow there) or --write FILE",
        ),
        (["campaign-status", str(tmp_path)], "campaign.json: no campaign record"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists()
