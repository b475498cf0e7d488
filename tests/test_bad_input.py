"""Regressions from probing every command with bad input as a new user would: silent wrong
results, tracebacks, unclear messages, debris and permissions (each: one line, exit 2, nothing
half-written)."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import pytest
import yaml
from ase import Atoms
from helpers import emt_labelled, make_cells

from nequix_fw.cli import main
from nequix_fw.settings import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "train_ensemble:\n  n_models: 2\n  epochs: 1\n  batch_size: 4\n"
    "  architecture: {hidden_irreps: '8x0e + 4x1o', n_layers: 1, lmax: 1, "
    "radial_mlp_size: 8}\n"
)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def label_dirs(tmp_path, capsys):
    """The same 3 structures labelled with EMT and with Lennard-Jones (two levels of theory)."""
    ase.io.write(tmp_path / "s.extxyz", make_cells(3, seed=7))
    for calc in ("emt", "lj"):
        code, _, err = run(
            capsys,
            "label",
            "--calculator",
            calc,
            "--structures",
            tmp_path / "s.extxyz",
            "--output",
            tmp_path / f"{calc}_labels",
            "--no-progress",
        )
        assert code == 0, err
    return tmp_path


def test_training_and_validation_refuse_mixed_levels_of_theory(label_dirs, capsys):
    d = label_dirs
    (d / "tiny.yaml").write_text(TINY)
    code, _, err = run(
        capsys,
        "train-ensemble",
        "--dataset",
        d / "emt_labels",
        d / "lj_labels",
        "--outdir",
        d / "models",
        "--config",
        d / "tiny.yaml",
    )
    assert code == 2 and "labels from different levels of theory" in err
    assert "--allow-mixed" in err and err.count("\n") == 1
    assert not (d / "models").exists()
    code, _, err = run(
        capsys,
        "validate",
        "--models",
        "a.nqx",
        "b.nqx",
        "--testset",
        d / "emt_labels",
        d / "lj_labels",
        "--output",
        d / "v.json",
    )
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
        code, _, err = run(
            capsys,
            "run-ensemble",
            "--models",
            *models,
            "--structures",
            tmp_path / "s.extxyz",
            "--output",
            tmp_path / "r.json",
        )
        assert code == 2 and "are the same model" in err and "no spread" in err
        assert str(models[1]) in err
    assert not (tmp_path / "r.json").exists()


def test_missing_dataset_to_exclude_is_an_error(model_paths, tmp_path, capsys):
    _results(capsys, model_paths, tmp_path)
    code, _, err = run(
        capsys,
        "select",
        "--ensemble",
        tmp_path / "r.json",
        "--lo",
        "0",
        "--exclude-dataset",
        "/nonexistent",
        "--output",
        tmp_path / "sel",
    )
    assert code == 2 and "/nonexistent: no training set there" in err
    assert not (tmp_path / "sel").exists()


def test_exploration_that_samples_nothing(model_paths, tmp_path, capsys):
    ase.io.write(tmp_path / "s.extxyz", make_cells(1))
    code, _, err = run(
        capsys,
        "explore",
        "--models",
        *model_paths[:2],
        "--structures",
        tmp_path / "s.extxyz",
        "--steps",
        "40",
        "--hi",
        "100",
        "--output",
        tmp_path / "cands",
        "--no-progress",
    )
    assert code == 2 and "the exploration yielded no candidate frame" in err
    assert "sample every 50 steps" in err and "--sample-every" in err
    assert not (tmp_path / "cands").exists()
    # every trajectory stopped on uncertainty before its first sample: that is what it says
    code, _, err = run(
        capsys,
        "explore",
        *("--models", *model_paths[:2], "--structures", tmp_path / "s.extxyz"),
        *("--steps", "20", "--check-every", "10", "--sample-every", "10", "--hi", "1e-6"),
        *("--output", tmp_path / "cands", "--no-progress"),
    )
    assert code == 2 and "1 trajectories stopped before their first sampled frame" in err
    assert "(1 on uncertainty)" in err and "explore.stop_force_dev 1e-06 eV/Å" in err
    assert not (tmp_path / "cands").exists()
    # NPT on a molecule names the file and frame, and leaves nothing behind
    ase.io.write(tmp_path / "mol.xyz", Atoms("Cu2", positions=[[0, 0, 0], [2.4, 0, 0]]))
    code, _, err = run(
        capsys,
        "explore",
        "--models",
        *model_paths[:2],
        "--structures",
        tmp_path / "mol.xyz",
        "--pressures",
        "1",
        "--steps",
        "20",
        "--output",
        tmp_path / "npt",
    )
    assert code == 2 and f"{tmp_path / 'mol.xyz'} frame 0: NPT (pressures_GPa) needs" in err
    assert not (tmp_path / "npt").exists()


def test_training_inputs_checked_before_any_output(emt_data, tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY)
    ase.io.write(tmp_path / "one.extxyz", ase.io.read(emt_data["train"], index=0))
    cases = [
        (["--dataset", tmp_path / "one.extxyz"], "holds 1 structure; training needs at least 2"),
        (["--dataset", tmp_path / "nothing"], "nothing: no such file or directory"),
        (
            ["--dataset", emt_data["train"], "--finetune-from", "nequix-nope"],
            "nequix-nope: neither a model file nor a known pretrained name",
        ),
        (
            ["--dataset", emt_data["train"], "--warm-start", tmp_path / "gone"],
            "gone: warm-start directory not found",
        ),
    ]
    for args, msg in cases:
        out = tmp_path / "models"
        code, _, err = run(
            capsys,
            "train-ensemble",
            *args,
            "--outdir",
            out,
            "--config",
            tmp_path / "tiny.yaml",
            "--no-progress",
        )
        assert code == 2 and msg in err, (args, err)
        assert not out.exists(), args


def test_training_that_would_run_out_of_memory_says_so_first(
    emt_data, tmp_path, capsys, monkeypatch
):
    from nequix.data import atomic_numbers_to_indices

    import nequix_fw.graphs as graphs

    frames = ase.io.read(emt_data["train"], ":")
    index = atomic_numbers_to_indices([29, 79])
    real = sum(graphs.graph_bytes(graphs.build_graph(a, index, 5.0)) for a in frames)
    monkeypatch.setattr(graphs, "SAMPLE", 8)  # the estimate from 8 of the 48 structures
    estimate = graphs.check_graph_memory(frames, index, 5.0, "x", 1.0)
    assert abs(estimate - real) < 0.1 * real
    (tmp_path / "tiny.yaml").write_text(TINY)
    monkeypatch.setattr(graphs, "available_memory", lambda: int(1.2 * real))  # < 1.5 x
    out = tmp_path / "models"
    args = ["--dataset", emt_data["train"], "--outdir", out, "--config", tmp_path / "tiny.yaml"]
    code, _, err = run(capsys, "train-ensemble", *args, "--no-progress")
    n_atoms = sum(len(a) for a in frames)
    _one_line(
        code,
        err,
        f"{emt_data['train']}: the neighbour graphs of its 48 structures ({n_atoms} atoms",
        "MB are available; train where there is more memory",
    )
    assert not out.exists()


def test_safe_defaults_and_the_settings_reference_block_agree(tmp_path, capsys):
    from nequix_fw.labelling import label_structures, make_backend
    from nequix_fw.settings import ExplorationSettings, LabellingSettings

    assert LabellingSettings().min_distance_A == 0.7 and ExplorationSettings().stop_force_dev == 0.5
    # atoms 0.001 Å apart never reach the calculator by default
    a = make_cells(1)[0]
    a.positions[1] = a.positions[0] + [0.001, 0, 0]
    ase.io.write(tmp_path / "close.extxyz", a)
    s = LabellingSettings()
    summary = label_structures(
        tmp_path / "close.extxyz", tmp_path / "o", make_backend(s), s, progress=False
    )
    assert summary["failed"][0]["reason"].startswith("min interatomic distance 0.001 Å < 0.7 Å")
    # every value the settings reference's annotated block shows is the code's default
    page = (ROOT / "docs" / "reference" / "settings.md").read_text()
    block = page.split("```yaml\n", 1)[1].split("```", 1)[0]
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
    code, _, err = run(
        capsys,
        "run-ensemble",
        "--models",
        *model_paths,
        "--structures",
        tmp_path / "s.extxyz",
        "--output",
        tmp_path / "out",
    )
    assert code == 2 and "out: is a directory; give a file name for the output" in err
    code, _, err = run(
        capsys,
        "validate",
        "--models",
        *model_paths,
        "--testset",
        emt_data["test"],
        "--output",
        tmp_path / "out",
    )
    assert code == 2 and "out: is a directory" in err
    assert list((tmp_path / "out").iterdir()) == []  # no plots left behind
    # an .extxyz file as the training set is the training set file itself
    shutil.copy(emt_data["test"], tmp_path / "train.extxyz")
    ase.io.write(tmp_path / "new.extxyz", emt_labelled(2, seed=77))
    code, out, err = run(
        capsys,
        "update-dataset",
        "--new",
        tmp_path / "new.extxyz",
        "--dataset",
        tmp_path / "train.extxyz",
    )
    assert code == 0, err
    assert "added 2 structures (0 already present, 0 conflicts" in out
    assert len(ase.io.read(tmp_path / "train.extxyz", ":")) == 16 + 2
    with pytest.raises(SystemExit) as exc:  # argparse: usage line, exit 2
        main(
            [
                "update-dataset",
                "--new",
                str(tmp_path / "new.extxyz"),
                "--dataset",
                str(tmp_path / "x"),
                "--iteration",
                "-3",
            ]
        )
    assert exc.value.code == 2 and "-3: iterations count from 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    code, _, err = run(
        capsys,
        "label",
        "--calculator",
        "emt",
        "--structures",
        "/missing",
        "--output",
        tmp_path / "labels",
    )
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
    cfg.write_text(
        "campaign: {directory: r, initial_structures: i.xyz}\n"
        "explore: {hi: 1.0, min_distance: 0.8}\n"
    )
    code, _, err = run(capsys, "campaign", "--config", cfg, "--write", tmp_path / "w.yaml")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "hi is now stop_force_dev, min_distance is now stop_min_distance_A" in err
    assert not (tmp_path / "w.yaml").exists()
    cfg.write_text("select: {min_distance: 1.5}\n")
    code, _, err = run(
        capsys,
        "select",
        "--ensemble",
        tmp_path / "r.json",
        "--config",
        cfg,
        "--output",
        tmp_path / "sel",
    )
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
    code = (
        "import time; from nequix_fw.structures import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_text('half'); print(tmp, flush=True); time.sleep(60)\n"
    )
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
    assert (
        run(
            capsys,
            "select",
            "--ensemble",
            tmp_path / "r.json",
            "--lo",
            "0",
            "--output",
            tmp_path / "sel",
        )[0]
        == 0
    )
    assert stat.S_IMODE((tmp_path / "sel").stat().st_mode) == 0o777 & ~_umask()
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    for f in ["manifest.json", *(e["file"] for e in manifest["structures"] if e["selected"])]:
        assert stat.S_IMODE((tmp_path / "sel" / f).stat().st_mode) == 0o666 & ~_umask()
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~_umask()


def _results(capsys, model_paths, tmp_path) -> None:
    """`tmp_path/r.json`: the models' results on three cells."""
    ase.io.write(tmp_path / "s.extxyz", make_cells(3))
    argv = [
        "run-ensemble",
        "--models",
        *model_paths,
        "--structures",
        tmp_path / "s.extxyz",
        "--output",
        tmp_path / "r.json",
        "--no-progress",
    ]
    assert run(capsys, *argv)[0] == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the newer commands (relabel, ev-set, db, export, campaign, select): silent wrong results,
# -- tracebacks and unclear messages found by probing them as a new user would


def _one_line(code: int, err: str, *fragments: str) -> None:
    """A user error: exit 2 and one line holding every fragment."""
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _dataset_dir(path: Path, n: int, seed: int, capsys) -> Path:
    """An on-disk training set of `n` EMT-labelled cells."""
    ase.io.write(path.with_suffix(".extxyz"), emt_labelled(n, seed=seed))
    code, _, err = run(
        capsys, "update-dataset", "--new", path.with_suffix(".extxyz"), "--dataset", path
    )
    assert code == 0, err
    return path


def test_relabel_refuses_a_work_directory_of_another_dataset(tmp_path, capsys):
    """A work directory left by relabelling dataset A is not reused for dataset B: before, B's
    new dataset was filled with A's structures, exit 0."""
    a = _dataset_dir(tmp_path / "a", 3, 21, capsys)
    b = _dataset_dir(tmp_path / "b", 2, 22, capsys)

    def relabel(dataset, to, output):
        argv = ["--dataset", dataset, "--to", to, "--output", output, "--calculator", "lj"]
        return run(capsys, "relabel", *argv, "--no-progress")

    code, out, err = relabel(a, tmp_path / "a_lj", tmp_path / "work")
    assert code == 0 and "relabelled 3 of 3 structures" in out, err
    code, _, err = relabel(b, tmp_path / "b_lj", tmp_path / "work")
    _one_line(
        code,
        err,
        f"{tmp_path / 'work'}: a work directory of other structures",
        "3 frozen there, 0 of the 2 asked for now",
        "give a new --output",
    )
    assert not (tmp_path / "b_lj").exists()
    # the same request again resumes: nothing labelled twice
    code, out, err = relabel(a, tmp_path / "a_lj", tmp_path / "work")
    assert code == 0 and "(3 from an earlier run)" in out and "added 0 (3 already there)" in out
    # the source dataset named by another spelling of its path, before anything is labelled
    for to in (f"{a}/", f"{a}/training_set.extxyz", tmp_path / "." / "a", a / "sub"):
        code, _, err = relabel(a, to, tmp_path / "w2")
        _one_line(code, err, f"--to {to} is the dataset {a} being relabelled")
        assert "--allow-mixed" not in err and not (tmp_path / "w2").exists()
    # an existing file as the work directory
    (tmp_path / "file").write_text("x")
    code, _, err = relabel(a, tmp_path / "c", tmp_path / "file")
    _one_line(code, err, f"{tmp_path / 'file'}: exists and is not a directory")
    assert not (tmp_path / "c").exists()


def test_ev_set_refuses_a_work_directory_of_another_structure(tmp_path, capsys):
    from ase.build import bulk

    ase.io.write(tmp_path / "cu.extxyz", bulk("Cu", "fcc", a=3.6))
    ase.io.write(tmp_path / "al.extxyz", bulk("Al", "fcc", a=4.05))
    emt = ["--calculator", "emt", "--output", tmp_path / "work", "--no-progress"]
    code, out, err = run(
        capsys, "ev-set", "--structure", tmp_path / "cu.extxyz", "--to", tmp_path / "ev_cu", *emt
    )
    assert code == 0 and "E-V set of Cu: labelled 7 of 7 volumes" in out, err
    code, out, err = run(
        capsys, "ev-set", "--structure", tmp_path / "al.extxyz", "--to", tmp_path / "ev_al", *emt
    )
    _one_line(code, err, "a work directory of other structures", "0 of the 7 asked for now")
    assert not out and not (tmp_path / "ev_al").exists()
    stored = ase.io.read(tmp_path / "ev_cu" / "training_set.extxyz", ":")
    assert {a.get_chemical_formula() for a in stored} == {"Cu"}


def test_db_start_remembers_its_database_and_checks_its_arguments(
    tmp_path, mongo_server, monkeypatch
):
    """The database name is remembered like the port; ports are range-checked; a file, an
    unwritable place or a busy port as --dir/--port give one line and leave no directory."""
    nfw = [sys.executable, "-m", "nequix_fw.cli", "db"]

    def db(*args, cwd=tmp_path):
        p = subprocess.run([*nfw, *map(str, args)], cwd=cwd, capture_output=True, text=True)
        return p.returncode, p.stdout, p.stderr

    d, lp = tmp_path / "srv", tmp_path / "lp.yaml"
    code, out, err = db("start", "--dir", d, "--launchpad", lp, "--name", "my_campaign")
    assert code == 0, err
    port = yaml.safe_load(lp.read_text())["port"]
    assert db("stop", "--dir", d)[0] == 0
    code, out, err = db("start", "--dir", d, "--launchpad", lp)  # no --name: the same database
    assert code == 0 and "(database my_campaign)" in out, err
    assert yaml.safe_load(lp.read_text())["name"] == "my_campaign"
    assert yaml.safe_load(lp.read_text())["port"] == port
    assert db("stop", "--dir", d)[0] == 0
    # ports outside 1-65535 (before: 70000 listened on 70000 - 65536 = 4464)
    for bad in ("70000", "0", "-1"):
        code, _, err = db("start", "--dir", tmp_path / "p", "--port", bad)
        assert code == 2 and f"{int(bad)}: not a TCP port (1-65535)" in err, err
        assert not (tmp_path / "p").exists()
    with pytest.raises(Exception, match="port 70000: not a TCP port"):
        from nequix_fw import server

        server.start(tmp_path / "p", port=70000)
    # a file as the server directory: start and status name it, neither suggests it again
    (tmp_path / "afile").write_text("x")
    for action in ("start", "status"):
        code, _, err = db(action, "--dir", tmp_path / "afile", "--launchpad", tmp_path / "l.yaml")
        _one_line(code, err, f"{tmp_path / 'afile'}: is a file, not a server directory")
        assert "db start --dir" not in err
    # somewhere no directory can be made
    for where in (tmp_path / "afile" / "sub", Path("/proc/nequix_fw_db")):
        code, _, err = db("start", "--dir", where, "--launchpad", tmp_path / "l.yaml")
        _one_line(code, err, f"{where}: cannot make the server directory there")
    # a port where another MongoDB server listens: nothing left behind
    code, _, err = db(
        "start",
        "--dir",
        tmp_path / "busy" / "srv",
        "--port",
        mongo_server["port"],
        "--launchpad",
        tmp_path / "l.yaml",
    )
    _one_line(code, err, f"127.0.0.1:{mongo_server['port']}: another server already listens")
    assert not (tmp_path / "busy").exists() and not (tmp_path / "l.yaml").exists()


def test_db_start_never_loses_a_launchpad_file(tmp_path):
    """Without --launchpad, `db start` writes ./my_launchpad.yaml: a file there that points at
    another server is kept beside it (or left alone when it points at another host)."""
    nfw = [sys.executable, "-m", "nequix_fw.cli", "db"]
    mine = "# my own mongod\nhost: localhost\nport: 27017\nname: production\n"
    (tmp_path / "my_launchpad.yaml").write_text(mine)
    p = subprocess.run(
        [*nfw, "start", "--dir", "srv"], cwd=tmp_path, capture_output=True, text=True
    )
    try:
        assert p.returncode == 0, p.stderr
        assert "kept as my_launchpad.yaml.orig" in p.stdout
        assert (tmp_path / "my_launchpad.yaml.orig").read_text() == mine
        config = yaml.safe_load((tmp_path / "my_launchpad.yaml").read_text())
        assert config["name"] == "nequix_fw" and config["port"] != 27017
    finally:
        subprocess.run([*nfw, "stop", "--dir", "srv"], cwd=tmp_path, capture_output=True)


def test_learned_descriptor_refuses_another_checkpoint_at_the_recorded_path(
    model_paths, tmp_path, capsys
):
    for k, m in enumerate(model_paths[:2]):
        shutil.copy(m, tmp_path / f"m{k}.nqx")
    ase.io.write(tmp_path / "s.extxyz", make_cells(3))
    code, _, err = run(
        capsys,
        "run-ensemble",
        "--models",
        tmp_path / "m0.nqx",
        tmp_path / "m1.nqx",
        "--structures",
        tmp_path / "s.extxyz",
        "--output",
        tmp_path / "r.json",
        "--no-progress",
    )
    assert code == 0, err
    select = [
        "select",
        "--ensemble",
        tmp_path / "r.json",
        "--lo",
        "0",
        "--diverse",
        "--descriptor",
        "learned",
        "--max-selected",
        "2",
    ]
    assert run(capsys, *select, "--output", tmp_path / "ok")[0] == 0
    shutil.copy(model_paths[2], tmp_path / "m0.nqx")  # another model at the recorded path
    code, _, err = run(capsys, *select, "--output", tmp_path / "sel")
    _one_line(code, err, f"{tmp_path / 'm0.nqx'}: not the model these results were evaluated with")
    assert not (tmp_path / "sel").exists()
    (tmp_path / "m0.nqx").unlink()
    code, _, err = run(capsys, *select, "--output", tmp_path / "sel")
    _one_line(code, err, "m0.nqx: the model of these results", "is no longer there")


def test_campaign_write_checks_what_would_fail_hours_later(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ase.io.write(tmp_path / "initial.extxyz", make_cells(2))
    ase.io.write(tmp_path / "test.extxyz", emt_labelled(2, seed=5))
    cfg = tmp_path / "c.yaml"
    base = "campaign: {directory: run, initial_structures: initial.extxyz"
    cases = [
        (
            base + ", testset: [nope.extxyz]}\n",
            f"campaign.testset: {tmp_path / 'nope.extxyz'}: no such file or directory",
        ),
        (
            base + ", candidate_pool: [pool/]}\n",
            f"campaign.candidate_pool: {tmp_path / 'pool'}: no such file or directory",
        ),
        (
            base + "}\nselect: {lo: auto, target_force_error: 0.1}\n",
            "select.lo: auto needs a calibration of the uncertainty",
        ),
        (
            base + ", schedule: {2: {select: {lo: auto, target_force_error: 0.1}}}}\n",
            "select.lo: auto (campaign.schedule from iteration 2) needs a calibration",
        ),
        (
            base + ", testset: [test.extxyz]}\nvalidate: {reference: emt, structure: gone.vasp}\n",
            f"validate: {tmp_path / 'gone.vasp'}: no such file or directory",
        ),
    ]
    for text, message in cases:
        cfg.write_text(text)
        code, _, err = run(capsys, "campaign", "--config", cfg, "--write", tmp_path / "w.yaml")
        _one_line(code, err, f"{cfg}: ", message)
        assert not (tmp_path / "w.yaml").exists() and not (tmp_path / "run").exists()
    # lo: auto with a test set is fine; an existing directory as --write is refused first
    cfg.write_text(
        base + ", testset: [test.extxyz]}\nselect: {lo: auto, target_force_error: 0.1}\n"
    )
    assert run(capsys, "campaign", "--config", cfg, "--write", tmp_path / "w.yaml")[0] == 0
    (tmp_path / "wdir").mkdir()
    code, _, err = run(capsys, "campaign", "--config", cfg, "--write", tmp_path / "wdir")
    _one_line(code, err, f"{tmp_path / 'wdir'}: is a directory")


def test_campaign_paths_are_absolute_wherever_they_are_set(tmp_path, monkeypatch):
    """Every path-typed setting (found from the settings classes), in the sections, the
    schedule, the stages and the systems, is absolute in the built workflow; names and
    store datasets are left as they are."""
    from nequix_fw.workflows import campaign_sections

    monkeypatch.chdir(tmp_path)
    ase.io.write(tmp_path / "initial.extxyz", make_cells(2))
    (tmp_path / "model.nqx").write_text("")
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "campaign": {
                    "directory": "run",
                    "initial_structures": "initial.extxyz",
                    "dataset": "data_dir",
                    "finetune_from": "model.nqx",
                    "schedule": {2: {"label": {"cp2k_data_dir": "cp2k_data"}}},
                    "systems": [
                        {
                            "name": "s",
                            "initial_structures": "initial.extxyz",
                            "settings": {"label": {"scratch_dir": "scratch"}},
                        }
                    ],
                },
                "ensemble": {"compilation_cache_dir": "cache"},
                "label": {"cp2k_template": ">>template<<"},
            }
        )
    )
    s = campaign_sections(tmp_path / "c.yaml")
    c = s["campaign"]
    assert c["dataset"] == str(tmp_path / "data_dir") and c["directory"] == str(tmp_path / "run")
    assert c["finetune_from"] == str(tmp_path / "model.nqx")
    assert c["schedule"]["2"]["label"]["cp2k_data_dir"] == str(tmp_path / "cp2k_data")
    assert c["systems"][0]["initial_structures"] == str(tmp_path / "initial.extxyz")
    assert c["systems"][0]["settings"]["label"]["scratch_dir"] == str(tmp_path / "scratch")
    assert s["ensemble"]["compilation_cache_dir"] == str(tmp_path / "cache")
    assert s["label"]["cp2k_template"] == ">>template<<"  # a worker's placeholder
    (tmp_path / "c.yaml").write_text(
        "campaign: {directory: run, initial_structures: initial.extxyz, dataset: db:x, "
        "finetune_from: nequix-mp-1}\n"
    )
    c = campaign_sections(tmp_path / "c.yaml")["campaign"]
    assert (c["dataset"], c["finetune_from"]) == ("db:x", "nequix-mp-1")


def test_export_and_fetch_outputs_checked(tmp_path, launchpad_file, capsys):
    lp = ["--launchpad", launchpad_file]
    ase.io.write(tmp_path / "new.extxyz", emt_labelled(2, seed=31))
    assert (
        run(capsys, "update-dataset", "--new", tmp_path / "new.extxyz", "--dataset", "db:e", *lp)[0]
        == 0
    )
    (tmp_path / "adir").mkdir()
    code, _, err = run(capsys, "export", "--dataset", "db:e", "--output", tmp_path / "adir", *lp)
    _one_line(code, err, f"{tmp_path / 'adir'}: is a directory")
    assert list((tmp_path / "adir").iterdir()) == []
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "export", "--models", "camp/0", "--output", tmp_path / "afile", *lp)
    _one_line(code, err, f"{tmp_path / 'afile'}: exists and is not a directory")
    assert (tmp_path / "afile").read_text() == "x"
    code, _, err = run(
        capsys, "export", "--dataset", "db:e", "--output", tmp_path / "e.extxyz", *lp
    )
    assert code == 0 and len(ase.io.read(tmp_path / "e.extxyz", ":")) == 2


def test_a_server_that_is_not_running_is_named_at_once(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lp = tmp_path / "lp.yaml"
    lp.write_text(f"host: 127.0.0.1\nport: {port}\nname: down\n")
    code, _, err = run(
        capsys, "export", "--dataset", "db:e", "--output", tmp_path / "e.extxyz", "--launchpad", lp
    )
    _one_line(code, err, f"{lp}: cannot reach MongoDB at 127.0.0.1:{port}: connection refused")
    assert "nequix-fw db start" in err and not (tmp_path / "e.extxyz").exists()


def test_damaged_campaign_record_and_calibration_file(model_paths, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "campaign.json").write_text('{"name": "c", "iterations": [{"itera')
    code, _, err = run(capsys, "campaign-status", tmp_path / "run")
    _one_line(code, err, f"{tmp_path / 'run' / 'campaign.json'}: a damaged campaign record")
    _results(capsys, model_paths, tmp_path)
    (tmp_path / "cal.yaml").write_text("uncertainty:\n  calibration: {}\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    for path, why in (
        ("cal.yaml", "not JSON"),
        ("list.json", "a JSON list"),
        ("missing.json", "cannot read it"),
    ):
        code, _, err = run(
            capsys,
            "select",
            "--ensemble",
            tmp_path / "r.json",
            "--lo",
            "auto",
            "--target-force-error",
            "0.1",
            "--calibration",
            tmp_path / path,
            "--output",
            tmp_path / "sel",
        )
        _one_line(code, err, f"--calibration {tmp_path / path}: ", why)
        assert not (tmp_path / "sel").exists()


def _like_a_shell() -> None:
    """Ctrl-C reaches a command as from a shell: SIGINT neither blocked nor ignored (a test
    worker's children may inherit either)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_update_dataset_says_what_was_stored(tmp_path, launchpad_file):
    """SIGINT while `update-dataset` stores into db:NAME: one line with how many were stored
    (and how many were sent without an answer yet), and that a rerun completes it; the rerun
    adds exactly the rest."""
    import re

    from nequix_fw.store import BULK, COLLECTION, launchpad_db

    n_new = 3 * BULK
    ase.io.write(tmp_path / "new.extxyz", emt_labelled(n_new, seed=41, rattle=0.05))
    cmd = [
        sys.executable,
        "-m",
        "nequix_fw.cli",
        "update-dataset",
        "--new",
        str(tmp_path / "new.extxyz"),
        "--dataset",
        "db:big",
        "--launchpad",
        str(launchpad_file),
    ]
    docs = launchpad_db(launchpad_file)[COLLECTION]
    here = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_like_a_shell
    )
    # the first stored structure, by an indexed find (a count reads every document: slow
    # enough under load that the command could finish before the signal)
    while docs.find_one({"dataset": "big"}, {"_id": 1}) is None and p.poll() is None:
        time.sleep(0.01)
    try:
        status = Path(f"/proc/{p.pid}/status").read_text().splitlines()
        child = [ln for ln in status if ln.startswith("Sig")]
    except FileNotFoundError:
        child = "exited before a structure was seen stored"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    _one_line(
        p.returncode,
        err or f"no error; this process {here}, the command {child}",
        f"new structures of {tmp_path / 'new.extxyz'} were stored in db:big",
        "; the same command again adds the rest (none twice)",
    )
    # a batch sent and not yet acknowledged is named; between batches there is none
    said = re.search(r"interrupted: (\d+) of the \d+ .*?(?:up to (\d+) more sent|db:big;)", err)
    stored, sent = int(said.group(1)), int(said.group(2) or 0)
    n, deadline = -1, time.monotonic() + 60  # a batch sent before the signal may still be
    while time.monotonic() < deadline:  # written: wait until the count holds for 2 s
        time.sleep(2)
        if n == (n := docs.count_documents({"dataset": "big"})):
            break
    assert stored <= n <= stored + sent < n_new, (stored, sent, n)
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0 and f"added {n_new - n} structures ({n} already present" in p.stdout
    assert docs.count_documents({"dataset": "big"}) == n_new


def test_model_info_names_the_file_it_cannot_read(model_paths, tmp_path, capsys):
    (tmp_path / "junk.nqx").write_text("junk\n")
    truncated = tmp_path / "cut.nqx"
    truncated.write_bytes(model_paths[0].read_bytes()[:-200])
    for path, why in (
        (tmp_path / "gone.nqx", "model file not found"),
        (tmp_path / "junk.nqx", "not a Nequix checkpoint"),
        (truncated, "truncated or corrupted checkpoint"),
    ):
        code, out, err = run(capsys, "model-info", model_paths[0], path)
        _one_line(code, err, f"{path}: {why}")
        assert not out


def test_every_command_has_bad_input_tests_here():
    """Each command of `nequix-fw` is run with bad input in this file."""
    import argparse

    from nequix_fw.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = Path(__file__).read_text()
    missing = [cmd for cmd in sub.choices if f'"{cmd}"' not in text]
    assert not missing, f"commands without a bad-input test in {Path(__file__).name}: {missing}"


def test_campaign_write_refuses_property_checks_that_would_be_silently_wrong(
    tmp_path, capsys, monkeypatch
):
    """Issue 39: settings that used to give silent wrong results are refused at --write, naming
    the field and the file."""
    from ase import Atoms

    monkeypatch.chdir(tmp_path)
    ase.io.write(tmp_path / "initial.extxyz", make_cells(2))
    ase.io.write(tmp_path / "test.extxyz", emt_labelled(2, seed=5))
    ase.io.write(tmp_path / "molecule.xyz", Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]]))
    (tmp_path / "garbage.vasp").write_text("not a structure\n")
    ase.io.write(tmp_path / "cu.vasp", make_cells(1)[0], format="vasp")
    cfg = tmp_path / "c.yaml"
    base = "campaign: {directory: run, initial_structures: initial.extxyz, testset: [test.extxyz]"
    checks = "validate: {reference: emt, structure: %s, elastic: true, phonons: true%s}\n"
    cases = [
        (
            base + "}\n" + checks % ("molecule.xyz", ""),
            f"validate.structure {tmp_path / 'molecule.xyz'}: not a periodic crystal (pbc",
        ),
        (
            base + "}\n" + checks % ("garbage.vasp", ""),
            f"validate.structure {tmp_path / 'garbage.vasp'} (command line: --ev-structure): "
            "cannot be read",
        ),
        (
            base + "}\n" + checks % ("cu.vasp", ", phonon_supercell: [2, 0, 2]"),
            "phonon_supercell: every entry must be a positive integer, got [2, 0, 2]",
        ),
        (
            base + "}\n" + checks % ("cu.vasp", ", phonon_supercell: [2, -1, 2]"),
            "phonon_supercell: every entry must be a positive integer, got [2, -1, 2]",
        ),
        (
            base + "}\n" + checks % ("cu.vasp", ", phonon_qpoints: {X: [0.5, 0.0]}"),
            "phonon_qpoints: X must be a 3-vector of finite numbers, got [0.5, 0.0]",
        ),
        (
            base + ", property_tolerances: {v0_percent: .nan}}\n" + checks % ("cu.vasp", ""),
            "property_tolerances: v0_percent must be a finite number > 0, got nan",
        ),
        (
            base + ", property_tolerances: {elastic_percent: .inf}}\n" + checks % ("cu.vasp", ""),
            "property_tolerances: elastic_percent must be a finite number > 0, got inf",
        ),
        (
            base + "}\nvalidate: {reference: nosuchcalc}\n",
            "validate.reference: calculator 'nosuchcalc' cannot be imported",
        ),
    ]
    for text, message in cases:
        cfg.write_text(text)
        code, _, err = run(capsys, "campaign", "--config", cfg, "--write", tmp_path / "w.yaml")
        _one_line(code, err, f"{cfg}: ", message)
        assert not (tmp_path / "w.yaml").exists() and not (tmp_path / "run").exists()
    cfg.write_text(base + "}\n" + checks % ("cu.vasp", ""))  # the same, well formed
    assert run(capsys, "campaign", "--config", cfg, "--write", tmp_path / "w.yaml")[0] == 0


def test_update_dataset_applies_labellings_limits_to_imported_files(tmp_path, capsys):
    """Issue 39: an imported frame with a 1e6 eV/Å force, or with atoms on top of each other,
    is refused as labelling refuses it, naming the frame; nothing is written."""
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator

    good = emt_labelled(3, seed=2)
    absurd = good[1].copy()
    forces = good[1].get_forces().copy()
    forces[0] = [1e6, 0, 0]
    absurd.calc = SinglePointCalculator(
        absurd, energy=good[1].get_potential_energy(), forces=forces
    )
    ase.io.write(tmp_path / "absurd.extxyz", [good[0], absurd])
    code, _, err = run(
        capsys, "update-dataset", "--new", tmp_path / "absurd.extxyz", "--dataset", tmp_path / "ds"
    )
    _one_line(code, err, "absurd.extxyz frame 1: max force 1e+06 eV/Å exceeds label.max_force")
    assert not (tmp_path / "ds").exists()
    close = good[2].copy()
    close.positions[1] = close.positions[0] + [0.3, 0, 0]
    close.calc = SinglePointCalculator(close, energy=-1.0, forces=np.zeros((len(close), 3)))
    ase.io.write(tmp_path / "close.extxyz", close)
    code, _, err = run(
        capsys, "update-dataset", "--new", tmp_path / "close.extxyz", "--dataset", tmp_path / "ds"
    )
    _one_line(
        code, err, "close.extxyz frame 0: atoms 0.3 Å apart, closer than label.min_distance_A"
    )
    # the user's own limits, as labelling would apply them
    code, _, err = run(
        capsys,
        "update-dataset",
        "--new",
        tmp_path / "absurd.extxyz",
        "--dataset",
        tmp_path / "ds",
        "--max-force",
        "2e6",
    )
    assert code == 0, err


def test_campaign_status_names_a_damaged_field_of_the_record(tmp_path, capsys):
    """Issue 39: a campaign.json whose values have the wrong type is refused naming the
    iteration and the field, not printed as if it were fine."""
    import json

    its = [{"iteration": 0, "n_labelled": 6}, {"iteration": 1, "n_labelled": "many"}]
    (tmp_path / "campaign.json").write_text(json.dumps({"name": "c", "iterations": its}))
    code, out, err = run(capsys, "campaign-status", tmp_path)
    _one_line(code, err, "campaign.json: iteration 1: n_labelled: ", "(got 'many')")
    assert "many" not in out
    its[1] = {"iteration": 1, "validation": {"force_rmse_eV_per_A": "low"}}
    (tmp_path / "campaign.json").write_text(json.dumps({"name": "c", "iterations": its}))
    code, _, err = run(capsys, "campaign-status", tmp_path)
    _one_line(code, err, "iteration 1: validation.force_rmse_eV_per_A: ")


def test_validate_refuses_bad_check_inputs_in_one_line_and_writes_nothing(
    model_paths, tmp_path, capsys
):
    """Issue 39: a missing --ev-structure, the settings campaign --write refuses, and a
    truncated test set: one line each, exit 2, no report."""
    from ase import Atoms

    ase.io.write(tmp_path / "test.extxyz", emt_labelled(3, seed=5))
    ase.io.write(tmp_path / "molecule.xyz", Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]]))
    lines = (tmp_path / "test.extxyz").read_text().splitlines()
    (tmp_path / "cut.extxyz").write_text("\n".join(lines[: 2 * 18 + 1]) + "\n")  # 16-atom cells
    base = ["validate", "--models", *model_paths[:2], "--output", tmp_path / "v.json"]
    test = ["--testset", tmp_path / "test.extxyz"]
    cases = [
        (
            [*test, "--reference", "emt", "--ev-structure", tmp_path / "nope.vasp"],
            f"validate.structure {tmp_path / 'nope.vasp'} (command line: --ev-structure): "
            "cannot be read (no such file or directory)",
        ),
        (
            [*test, "--reference", "emt", "--elastic", "--ev-structure", tmp_path / "molecule.xyz"],
            "not a periodic crystal",
        ),
        (
            [*test, "--reference", "emt", "--phonons", "--phonon-supercell", "2", "0", "2"],
            "phonon_supercell: every entry must be a positive integer, got [2, 0, 2]",
        ),
        ([*test, "--reference", "nosuchcalc"], "calculator 'nosuchcalc' cannot be imported"),
        (
            ["--testset", tmp_path / "cut.extxyz"],
            f"{tmp_path / 'cut.extxyz'}: the file ends in the middle of frame 2 (frames 0-1 are "
            "whole)",
        ),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *base, *argv)
        _one_line(code, err, message)
        assert not (tmp_path / "v.json").exists()
