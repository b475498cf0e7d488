"""Regressions from probing every command with bad input as a new user would: silent wrong
results, tracebacks, unclear messages, debris and permissions (each: one line, exit 2, nothing
half-written)."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest
import yaml
from ase import Atoms
from conftest import emt_labelled, make_cells

from nequix_fw.cli import main
from nequix_fw.settings import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
TINY = ("train_ensemble:\n  n_models: 2\n  epochs: 1\n  batch_size: 4\n"
        "  architecture: {hidden_irreps: '8x0e + 4x1o', n_layers: 1, lmax: 1, "
        "radial_mlp_size: 8}\n")  # fmt: skip


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def label_dirs(tmp_path, capsys):
    """The same 3 structures labelled with EMT and with Lennard-Jones (two levels of theory)."""
    ase.io.write(tmp_path / "s.extxyz", make_cells(3, seed=7))
    for calc in ("emt", "lj"):
        code, _, err = run(capsys, "label", "--calculator", calc, "--structures",
                           tmp_path / "s.extxyz", "--output", tmp_path / f"{calc}_labels",
                           "--no-progress")  # fmt: skip
        assert code == 0, err
    return tmp_path


def test_training_and_validation_refuse_mixed_levels_of_theory(label_dirs, capsys):
    d = label_dirs
    (d / "tiny.yaml").write_text(TINY)
    code, _, err = run(capsys, "train-ensemble", "--dataset", d / "emt_labels", d / "lj_labels",
                       "--outdir", d / "models", "--config", d / "tiny.yaml")  # fmt: skip
    assert code == 2 and "labels from different levels of theory" in err
    assert "--allow-mixed" in err and err.count("\n") == 1
    assert not (d / "models").exists()
    code, _, err = run(capsys, "validate", "--models", "a.nqx", "b.nqx", "--testset",
                       d / "emt_labels", d / "lj_labels", "--output", d / "v.json")  # fmt: skip
    assert code == 2 and "labels from different levels of theory" in err
    # one level, given twice: each structure is read once
    from nequix_fw.dataset import read_labelled

    assert len(read_labelled([d / "emt_labels", d / "emt_labels"])) == 3
    # mixing allowed, one structure still cannot carry two labels (update-dataset's conflict)
    with pytest.raises(Exception, match="is also in .*emt_labels.* with other labels"):
        read_labelled([d / "emt_labels", d / "lj_labels"], allow_mixed=True)
    # one structure with two different labels in plain files is an error naming both
    a = emt_labelled(1, seed=3)[0]
    ase.io.write(d / "x.extxyz", a)
    b = a.copy()
    b.calc = type(a.calc)(b, energy=a.get_potential_energy() + 1.0, forces=a.get_forces())
    ase.io.write(d / "y.extxyz", b)
    with pytest.raises(Exception, match=r"y.extxyz frame 0: structure \w+ is also in .*x.extxyz"):
        read_labelled([d / "x.extxyz", d / "y.extxyz"])


def test_copies_of_one_model_are_refused(model_paths, tmp_path, capsys):
    ase.io.write(tmp_path / "s.extxyz", make_cells(2))
    copy = tmp_path / "copy.nqx"
    shutil.copy(model_paths[0], copy)
    for models in ([model_paths[0], model_paths[0]], [model_paths[0], copy]):
        code, _, err = run(capsys, "run-ensemble", "--models", *models, "--structures",
                           tmp_path / "s.extxyz", "--output", tmp_path / "r.json")  # fmt: skip
        assert code == 2 and "are the same model" in err and "no spread" in err
        assert str(models[1]) in err
    assert not (tmp_path / "r.json").exists()


def test_missing_dataset_to_exclude_is_an_error(model_paths, tmp_path, capsys):
    _results(capsys, model_paths, tmp_path)
    code, _, err = run(capsys, "select", "--ensemble", tmp_path / "r.json", "--lo", "0",
                       "--exclude-dataset", "/nonexistent", "--output",
                       tmp_path / "sel")  # fmt: skip
    assert code == 2 and "/nonexistent: no training set there" in err
    assert not (tmp_path / "sel").exists()


def test_exploration_that_samples_nothing(model_paths, tmp_path, capsys):
    ase.io.write(tmp_path / "s.extxyz", make_cells(1))
    code, _, err = run(capsys, "explore", "--models", *model_paths[:2], "--structures",
                       tmp_path / "s.extxyz", "--steps", "40", "--hi", "100",
                       "--output", tmp_path / "cands", "--no-progress")  # fmt: skip
    assert code == 2 and "the exploration yielded no candidate frame" in err
    assert "sample every 50 steps" in err and "--sample-every" in err
    assert not (tmp_path / "cands").exists()
    # NPT on a molecule names the file and frame, and leaves nothing behind
    ase.io.write(tmp_path / "mol.xyz", Atoms("Cu2", positions=[[0, 0, 0], [2.4, 0, 0]]))
    code, _, err = run(capsys, "explore", "--models", *model_paths[:2], "--structures",
                       tmp_path / "mol.xyz", "--pressures", "1", "--steps", "20",
                       "--output", tmp_path / "npt")  # fmt: skip
    assert code == 2 and f"{tmp_path / 'mol.xyz'} frame 0: NPT (pressures_GPa) needs" in err
    assert not (tmp_path / "npt").exists()


def test_training_inputs_checked_before_any_output(emt_data, tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY)
    ase.io.write(tmp_path / "one.extxyz", ase.io.read(emt_data["train"], index=0))
    cases = [
        (["--dataset", tmp_path / "one.extxyz"], "holds 1 structure; training needs at least 2"),
        (["--dataset", tmp_path / "nothing"], "nothing: no such file or directory"),
        (["--dataset", emt_data["train"], "--finetune-from", "nequix-nope"],
         "nequix-nope: neither a model file nor a known pretrained name"),
        (["--dataset", emt_data["train"], "--warm-start", tmp_path / "gone"],
         "gone: warm-start directory not found"),
    ]  # fmt: skip
    for args, msg in cases:
        out = tmp_path / "models"
        code, _, err = run(capsys, "train-ensemble", *args, "--outdir", out, "--config",
                           tmp_path / "tiny.yaml", "--no-progress")  # fmt: skip
        assert code == 2 and msg in err, (args, err)
        assert not out.exists(), args


def test_safe_defaults_and_the_readme_settings_block_agree(tmp_path, capsys):
    from nequix_fw.labelling import label_structures, make_backend
    from nequix_fw.settings import ExplorationSettings, LabellingSettings

    assert LabellingSettings().min_distance_A == 0.7 and ExplorationSettings().stop_force_dev == 0.5
    # atoms 0.001 Å apart never reach the calculator by default
    a = make_cells(1)[0]
    a.positions[1] = a.positions[0] + [0.001, 0, 0]
    ase.io.write(tmp_path / "close.extxyz", a)
    s = LabellingSettings()
    summary = label_structures(tmp_path / "close.extxyz", tmp_path / "o", make_backend(s), s,
                               progress=False)  # fmt: skip
    assert summary["failed"][0]["reason"].startswith("min interatomic distance 0.001 Å < 0.7 Å")
    # every value the README's settings block shows is the code's default
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Settings file", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = yaml.safe_load(block)
    required = {"campaign": {"directory", "initial_structures"}}
    for section, values in shown.items():
        cls = SECTIONS[section]
        defaults = cls.model_construct().model_dump(mode="json")
        for key, value in values.items():
            assert key in cls.model_fields, (section, key)
            if key in required.get(section, ()):
                continue
            want = defaults[key]
            if isinstance(want, dict) and isinstance(value, dict):
                want = {k: v for k, v in want.items() if k in value}
            assert value == want, (section, key, value, want)


def test_outputs_checked_before_computing(model_paths, emt_data, tmp_path, capsys):
    ase.io.write(tmp_path / "s.extxyz", make_cells(2))
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, "run-ensemble", "--models", *model_paths, "--structures",
                       tmp_path / "s.extxyz", "--output", tmp_path / "out")  # fmt: skip
    assert code == 2 and "out: is a directory; give a file name for the output" in err
    code, _, err = run(capsys, "validate", "--models", *model_paths, "--testset",
                       emt_data["test"], "--output", tmp_path / "out")  # fmt: skip
    assert code == 2 and "out: is a directory" in err
    assert list((tmp_path / "out").iterdir()) == []  # no plots left behind
    # an .extxyz file as the training set is the training set file itself
    shutil.copy(emt_data["test"], tmp_path / "train.extxyz")
    ase.io.write(tmp_path / "new.extxyz", emt_labelled(2, seed=77))
    code, out, err = run(capsys, "update-dataset", "--new", tmp_path / "new.extxyz",
                         "--dataset", tmp_path / "train.extxyz")  # fmt: skip
    assert code == 0, err
    assert "added 2 structures (0 already present, 0 conflicts" in out
    assert len(ase.io.read(tmp_path / "train.extxyz", ":")) == 16 + 2
    with pytest.raises(SystemExit) as exc:  # argparse: usage line, exit 2
        main(["update-dataset", "--new", str(tmp_path / "new.extxyz"), "--dataset",
              str(tmp_path / "x"), "--iteration", "-3"])  # fmt: skip
    assert exc.value.code == 2 and "-3: iterations count from 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    code, _, err = run(capsys, "label", "--calculator", "emt", "--structures", "/missing",
                       "--output", tmp_path / "labels")  # fmt: skip
    assert code == 2 and "/missing: no such file or directory" in err
    assert not (tmp_path / "labels").exists()


def test_campaign_section_errors_name_the_settings_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("campaign: {directory: r, initial_structures: i.xyz, max_iterations: -1}\n")
    code, _, err = run(capsys, "campaign", "--config", cfg, "--write", tmp_path / "w.yaml")
    assert code == 2 and err.startswith(f"error: {cfg}: invalid CampaignSettings: max_iterations")


def test_renamed_settings_are_refused_with_their_new_names(tmp_path, capsys):
    """explore.hi (the stop of a trajectory, not select.hi's trust level) and the three
    min_distance fields were renamed: the old names give one line naming the new ones, and
    nothing is written."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("campaign: {directory: r, initial_structures: i.xyz}\n"
                   "explore: {hi: 1.0, min_distance: 0.8}\n")  # fmt: skip
    code, _, err = run(capsys, "campaign", "--config", cfg, "--write", tmp_path / "w.yaml")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "hi is now stop_force_dev, min_distance is now stop_min_distance_A" in err
    assert not (tmp_path / "w.yaml").exists()
    cfg.write_text("select: {min_distance: 1.5}\n")
    code, _, err = run(capsys, "select", "--ensemble", tmp_path / "r.json", "--config", cfg,
                       "--output", tmp_path / "sel")  # fmt: skip
    assert code == 2 and "min_distance is now min_distance_A" in err
    assert not (tmp_path / "sel").exists()


def test_killed_writers_leave_no_temp_files_and_modes_are_kept(emt_data, tmp_path, capsys):
    ds = tmp_path / "ds"
    assert run(capsys, "update-dataset", "--new", emt_data["test"], "--dataset", ds)[0] == 0
    target = ds / "training_set.extxyz"
    # umask 022 here: a new file is 0644, not 0600
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()
    target.chmod(0o640)
    # a writer killed with -9 in the middle of its atomic write leaves its temp file behind
    code = ("import time; from nequix_fw.structures import atomic_path\n"
            f"with atomic_path({str(target)!r}) as tmp:\n"
            "    tmp.write_text('half'); print(tmp, flush=True); time.sleep(60)\n")  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    tmp = Path(p.stdout.readline().strip())
    p.kill()
    p.wait()
    assert tmp.exists() and socket.gethostname() in tmp.name
    ase.io.write(tmp_path / "new.extxyz", emt_labelled(1, seed=78))
    assert run(capsys, "update-dataset", "--new", tmp_path / "new.extxyz", "--dataset", ds)[0] == 0
    assert not tmp.exists()  # removed by the next write of that file
    assert [p.name for p in ds.iterdir()] == ["training_set.extxyz"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the existing mode is kept


def test_selection_directory_honours_the_umask(model_paths, tmp_path, capsys):
    _results(capsys, model_paths, tmp_path)
    assert run(capsys, "select", "--ensemble", tmp_path / "r.json", "--lo", "0", "--output",
               tmp_path / "sel")[0] == 0  # fmt: skip
    assert stat.S_IMODE((tmp_path / "sel").stat().st_mode) == 0o777 & ~_umask()
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    for f in ["manifest.json", *(e["file"] for e in manifest["structures"] if e["selected"])]:
        assert stat.S_IMODE((tmp_path / "sel" / f).stat().st_mode) == 0o666 & ~_umask()
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~_umask()


def _results(capsys, model_paths, tmp_path) -> None:
    """`tmp_path/r.json`: the models' results on three cells."""
    ase.io.write(tmp_path / "s.extxyz", make_cells(3))
    argv = ["run-ensemble", "--models", *model_paths, "--structures", tmp_path / "s.extxyz",
            "--output", tmp_path / "r.json", "--no-progress"]  # fmt: skip
    assert run(capsys, *argv)[0] == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
