"""The original design's walkthrough (../shared/original-design/README.es.md, steps 3-7) as
written: its scripts, flags and file names, and its `launch_dft.sh` run unchanged against the
stand-in `vasp_std` (and an `mpirun` stand-in)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk

from nequix_fw.models import new_model, save_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LAUNCH_DFT = SHARED / "original-design" / "launch_dft.sh"
FIXTURES = SHARED / "vasp-fixtures"

pytestmark = pytest.mark.skipif(not LAUNCH_DFT.is_file(), reason="no shared original design")


def _sh(cmd: str, cwd: Path, env: dict) -> str:
    p = subprocess.run(
        cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-3000:])
    return p.stdout


def test_walkthrough_steps_3_to_7(tmp_path):
    env = {
        **os.environ,
        "PATH": f"{ROOT / 'tests' / 'standins'}:{os.environ['PATH']}",
        "STANDIN_VASP_FIXTURES": str(FIXTURES),
        "STANDIN_VASP_NO_ERROR": "1",
        "JAX_PLATFORMS": "cpu",
    }
    py = f"{sys.executable} {ROOT}"
    # 1-2. the environment and the initial structures: five (random, widely spread) Si models,
    # rattled Si4 cells
    (tmp_path / "models").mkdir()
    for k in range(1, 6):
        module, config = new_model(
            [14],
            seed=k,
            hidden_irreps="8x0e + 4x1o",
            lmax=1,
            atom_energies={14: -5.4},
            mlp_init_scale=16.0,
        )
        save_model(tmp_path / "models" / f"model_{k}.pt", module, config)
    initial = tmp_path / "data" / "initial_structures"
    initial.mkdir(parents=True)
    cells = []
    for k in range(4):
        a = bulk("Si", "diamond", a=5.43).repeat((2, 1, 1))
        a.rattle(0.3, seed=k)
        cells.append(a)
    ase.io.write(initial / "si2.xyz", cells)
    # 3. evaluation with the ensemble
    models = " ".join(f"models/model_{k}.pt" for k in range(1, 6))
    out = _sh(
        f"{py}/run_ensemble.py --models {models} --structures data/initial_structures/ "
        "--output ensemble_results.json",
        tmp_path,
        env,
    )
    assert "evaluated 4 structures" in out and "with 5 models" in out
    results = json.loads((tmp_path / "ensemble_results.json").read_text())
    assert len(results["structures"]) == 4
    # 4. active selection (random models disagree: everything above 0.08 eV/Å)
    out = _sh(
        f"{py}/select_high_uncertainty.py --ensemble ensemble_results.json "
        "--threshold 0.08 --output selected_structures/",
        tmp_path,
        env,
    )
    selected = sorted(p.stem for p in (tmp_path / "selected_structures").glob("*.vasp"))
    assert len(selected) == 4 and "selected 4" in out
    # 5. the design's launch_dft.sh, unchanged, with INCAR/KPOINTS/POTCAR in the project
    (tmp_path / "INCAR").write_text((FIXTURES / "al_static" / "INCAR").read_text())
    (tmp_path / "KPOINTS").write_text("Gamma\n0\nGamma\n4 4 4\n")
    (tmp_path / "POTCAR").write_text("stand-in POTCAR: the stand-in VASP does not read it\n")
    _sh(f"bash {LAUNCH_DFT} selected_structures/", tmp_path, env)
    results_dir = tmp_path / "data" / "dft_results"
    for name in selected:
        for suffix in ("OUTCAR", "CONTCAR", "log"):
            assert (results_dir / f"{name}_{suffix}").is_file()
    # 6. dataset expansion and retraining
    out = _sh(
        f"{py}/update_dataset.py --new data/dft_results/ --dataset data/training_set/",
        tmp_path,
        env,
    )
    assert "added 4 structures" in out
    train = ase.io.read(tmp_path / "data" / "training_set" / "training_set.extxyz", ":")
    assert sorted(a.info["structure_id"] for a in train) == selected  # paired by name
    for a in train:  # the labels of the run: final step, e_0
        assert a.get_potential_energy() == pytest.approx(-10.84147246, abs=1e-6)
    _sh(f"{py}/train_ensemble.py --dataset data/training_set/ --outdir models_new/", tmp_path, env)
    members = sorted(p.name for p in (tmp_path / "models_new").glob("member_*"))
    assert [m for m in members if m.endswith(".pt")] == [f"member_{k}.pt" for k in range(4)]
    assert [m for m in members if m.endswith(".nqx")] == [f"member_{k}.nqx" for k in range(4)]
    # 7. validation against reference data, with the new .pt models
    val = tmp_path / "data" / "validation_set"
    val.mkdir()
    with gzip.open(FIXTURES / "si2_relax" / "vasprun.xml.gz", "rt") as fh:
        (tmp_path / "vasprun.xml").write_text(fh.read())
    ase.io.write(val / "si2_relax.extxyz", ase.io.read(tmp_path / "vasprun.xml", ":"))
    out = _sh(
        f"{py}/validate_models.py --models models_new/*.pt --testset data/validation_set/ "
        "--output validation_report.json",
        tmp_path,
        env,
    )
    report = json.loads((tmp_path / "validation_report.json").read_text())
    assert len(report["models"]) == 4 and report["n_structures"] == 3
    assert all(m["path"].endswith(".pt") for m in report["models"])
    rmse = report["ensemble_mean"]["forces_eV_per_A"]["rmse"]
    assert np.isfinite(rmse) and f"force RMSE {rmse:.4f} eV/Å" in out


BATCH_EMT = """
import sys
from pathlib import Path
import ase.io
from ase.calculators.emt import EMT
structures, output, crash = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for p in sorted(structures.glob("*.vasp")):
    a = ase.io.read(p)
    if crash.is_file() and p.stem == crash.read_text():
        continue  # this one 'crashes': no result
    a.calc = EMT()
    a.get_potential_energy()
    ase.io.write(output / f"{p.stem}.extxyz", a)
"""


def test_script_backend_batch_mode(tmp_path, capsys):
    """A command with {structures} runs once for the whole selection; each structure's labels are
    collected by name, misses are recorded, and a rerun computes only what is missing."""
    from ase.calculators.emt import EMT
    from helpers import make_cells

    from nequix_fw.cli import main
    from nequix_fw.structures import structure_id

    sel = tmp_path / "selected_structures"
    sel.mkdir()
    cells = make_cells(4, seed=8)
    ids = []
    for a in cells:
        ids.append(structure_id(a))
        ase.io.write(sel / f"{ids[-1]}.vasp", a, format="vasp", direct=True)
    (tmp_path / "batch.py").write_text(BATCH_EMT)
    (tmp_path / "crash").write_text(ids[2])
    cmd = f"{sys.executable} {tmp_path / 'batch.py'} {{structures}} {{output}} {tmp_path / 'crash'}"
    out = tmp_path / "labels"
    args = [
        "label",
        "--backend",
        "script",
        "--command",
        cmd,
        "--structures",
        str(sel),
        "--output",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "labelled 3 of 4 structures with script; 1 failed" in stdout
    assert f"failed {ids[2]}: the batch command left no result for {ids[2]}" in stdout
    for a, sid in zip(cells, ids, strict=True):
        if sid == ids[2]:
            continue
        got = ase.io.read(out / sid / "labelled.extxyz")
        ref = a.copy()
        ref.calc = EMT()
        assert got.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-5)
    # update-dataset takes the task directories, not the batch's raw files a second time
    from nequix_fw.dataset import update_dataset

    s = update_dataset(out, tmp_path / "ds")
    assert s["n_added"] == 3 and s["n_failed_tasks_skipped"] == 1
    # a rerun (the crash fixed) computes only the missing one
    (tmp_path / "crash").unlink()
    assert main(args) == 0
    assert "labelled 4 of 4 structures with script (3 from an earlier run)" in (
        capsys.readouterr().out
    )


def test_launch_dft_sh_as_a_batch_command(tmp_path, capsys):
    """`label --backend script --command "bash launch_dft.sh {structures}"`: the design's script,
    unchanged, labels a selection in one go."""
    from nequix_fw.cli import main

    env_vars = {
        "PATH": f"{ROOT / 'tests' / 'standins'}:{os.environ['PATH']}",
        "STANDIN_VASP_FIXTURES": str(FIXTURES),
        "STANDIN_VASP_NO_ERROR": "1",
    }
    old = {k: os.environ.get(k) for k in env_vars}
    os.environ.update(env_vars)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        sel = tmp_path / "selected_structures"
        sel.mkdir()
        for k in range(2):  # Si2, as the replayed run
            a = bulk("Si", "diamond", a=5.43)
            a.rattle(0.02, seed=k)
            ase.io.write(sel / f"s{k}.vasp", a, format="vasp", direct=True)
        for name in ("INCAR", "KPOINTS", "POTCAR"):
            (tmp_path / name).write_text("stand-in\n")
        code = main(
            [
                "label",
                "--backend",
                "script",
                "--command",
                f"bash {LAUNCH_DFT} {{structures}}",
                "--structures",
                str(sel),
                "--output",
                "data/dft_results",
                "--no-progress",
            ]
        )
        stdout = capsys.readouterr().out
    finally:
        os.chdir(cwd)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code == 0 and "labelled 2 of 2 structures with script; 0 failed" in stdout
    tasks = [
        json.loads(p.read_text()) for p in (tmp_path / "data" / "dft_results").glob("*/task.json")
    ]
    assert len(tasks) == 2 and all(t["result_file"].endswith("_OUTCAR") for t in tasks)
    assert all(t["batch_returncode"] == 0 for t in tasks)
