"""Labelling with ASE calculators (EMT) and ingestion into the training set."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.calculators.emt import EMT
from helpers import make_cells

from nequix_fw.cli import main
from nequix_fw.dataset import dataset_ids, read_labelled, update_dataset
from nequix_fw.errors import SettingsError, StructureError
from nequix_fw.labelling import label_structures, make_backend
from nequix_fw.settings import LabellingSettings
from nequix_fw.structures import structure_id


@pytest.fixture
def selected(tmp_path):
    """A selection-like directory: POSCARs named by id plus one too-close structure."""
    d = tmp_path / "selected_structures"
    d.mkdir()
    cells = make_cells(5, seed=11)
    close = cells[0].copy()
    close.positions[1] = close.positions[0] + [0.5, 0, 0]
    for a in [*cells, close]:
        ase.io.write(d / f"{structure_id(a)}.vasp", a, format="vasp", direct=True)
    return {"dir": d, "cells": cells, "close": close}


def _label(structures, out, capsys, *extra):
    code = main(
        [
            "label",
            "--backend",
            "ase",
            "--calculator",
            "emt",
            "--structures",
            str(structures),
            "--output",
            str(out),
            "--no-progress",
            *extra,
        ]
    )
    return code, capsys.readouterr()


def test_label_with_emt_equals_direct_emt(selected, tmp_path, capsys):
    out = tmp_path / "dft_results"
    code, cap = _label(selected["dir"], out, capsys, "--min-distance", "1.0", "--iteration", "3")
    assert code == 0, cap.err
    assert "labelled 5 of 6 structures with ase; 1 failed" in cap.out
    for a in selected["cells"]:
        sid = structure_id(a)
        task = json.loads((out / sid / "task.json").read_text())
        assert task["status"] == "success" and task["iteration"] == 3
        assert task["settings"]["calculator"] == "ase.calculators.emt:EMT"
        got = ase.io.read(out / sid / "labelled.extxyz")
        ref = a.copy()
        ref.calc = EMT()
        assert got.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(got.get_forces(), ref.get_forces(), atol=1e-8)
        np.testing.assert_allclose(got.get_stress(), ref.get_stress(), atol=1e-10)
    bad = json.loads((out / structure_id(selected["close"]) / "task.json").read_text())
    assert bad["status"] == "failed" and bad["reason"].startswith("min interatomic distance 0.500")
    assert not (out / structure_id(selected["close"]) / "labelled.extxyz").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_success"] == 5 and summary["n_failed"] == 1


def test_rerun_reuses_finished_labels(selected, tmp_path, capsys):
    """A rerun after a crash or walltime kill labels only what is missing or failed, and only
    reuses labels of the same level of theory."""
    out = tmp_path / "o"
    assert _label(selected["dir"], out, capsys, "--min-distance", "1.0")[0] == 0
    first = {p.parent.name: p.read_text() for p in out.glob("*/task.json")}
    ok = sorted(sid for sid, t in first.items() if json.loads(t)["status"] == "success")
    shutil.rmtree(out / ok[0])  # killed before it started
    (out / ok[1] / "task.json").unlink()  # killed between writing the labels and its record
    code, cap = _label(selected["dir"], out, capsys, "--min-distance", "1.0")
    assert code == 0
    assert "labelled 5 of 6 structures with ase (3 from an earlier run); 1 failed" in cap.out
    for sid in ok[2:]:
        assert (out / sid / "task.json").read_text() == first[sid]
    for sid in ok[:2]:  # computed again, to the same labels
        task = json.loads((out / sid / "task.json").read_text())
        assert task["status"] == "success"
        assert json.loads(first[sid])["wall_time_s"] != task["wall_time_s"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_reused"], summary["n_success"], summary["n_failed"]) == (3, 5, 1)
    code, cap = _label(
        selected["dir"],
        out,
        capsys,
        "--min-distance",
        "1.0",
        "--calculator-params",
        '{"asap_cutoff": true}',
    )
    assert code == 0 and "structures with ase; 1 failed" in cap.out  # another settings hash


def test_absurd_forces_recorded_as_failed(selected, tmp_path):
    s = LabellingSettings(calculator="emt", max_force=1e-3)
    summary = label_structures(selected["dir"], tmp_path / "o", make_backend(s), s, progress=False)
    assert summary["n_failed"] == 6
    reasons = sorted(f["reason"].split(" ")[0] for f in summary["failed"])
    assert reasons == ["max"] * 5 + ["min"]  # the too-close one never reached EMT (0.7 Å)


def test_update_dataset_is_idempotent_and_reports_conflicts(selected, tmp_path, capsys):
    out = tmp_path / "dft_results"
    assert _label(selected["dir"], out, capsys, "--min-distance", "1.0")[0] == 0
    ds = tmp_path / "training_set"
    first = update_dataset(out, ds, iteration=1)
    assert first["n_added"] == 5 and first["n_failed_tasks_skipped"] == 1
    data = read_labelled([ds])
    assert len(data) == 5
    info = data[0].frame.atoms.info
    assert info["backend"] == "ase" and info["iteration"] == 1 and len(info["settings_hash"]) == 16
    assert {d.frame.atoms.info["structure_id"] for d in data} == {
        structure_id(a) for a in selected["cells"]
    }
    # what a campaign's iteration k excludes from its selection: added before iteration k
    assert dataset_ids(ds, before_iteration=1) == set()
    assert (
        dataset_ids(ds, before_iteration=2)
        == dataset_ids(ds)
        == {structure_id(a) for a in selected["cells"]}
    )
    before = (ds / "training_set.extxyz").read_bytes()
    code = main(["update-dataset", "--new", str(out), "--dataset", str(ds)])
    assert (
        code == 0
        and "added 0 structures (5 already present, 0 conflicts" in capsys.readouterr().out
    )
    assert (ds / "training_set.extxyz").read_bytes() == before
    # same structure, different labels: a conflict, the stored labels stay
    sid = structure_id(selected["cells"][2])
    a = ase.io.read(out / sid / "labelled.extxyz")
    e_old = a.get_potential_energy()
    a.calc.results["energy"] = e_old + 0.5
    ase.io.write(out / sid / "labelled.extxyz", a)
    s = update_dataset(out, ds)
    assert s["n_added"] == 0 and s["n_conflicts"] == 1 and s["conflicts"][0]["structure_id"] == sid
    stored = next(d for d in read_labelled([ds]) if d.frame.atoms.info["structure_id"] == sid)
    assert stored.energy == pytest.approx(e_old)


def test_mixed_levels_of_theory_refused_unless_allowed(selected, tmp_path, capsys):
    emt_out, lj_out, ds = tmp_path / "emt", tmp_path / "lj", tmp_path / "ds"
    assert _label(selected["dir"], emt_out, capsys, "--min-distance", "1.0")[0] == 0
    update_dataset(emt_out, ds)
    more = tmp_path / "more"
    more.mkdir()
    extra = make_cells(7, seed=12)[5:]
    for a in extra:
        ase.io.write(more / f"{structure_id(a)}.vasp", a, format="vasp")
    code = main(
        [
            "label",
            "--calculator",
            "lj",
            "--calculator-params",
            '{"sigma": 2.3}',
            "--structures",
            str(more),
            "--output",
            str(lj_out),
            "--no-progress",
        ]
    )
    assert code == 0
    capsys.readouterr()
    code = main(["update-dataset", "--new", str(lj_out), "--dataset", str(ds)])
    err = capsys.readouterr().err
    assert code == 2 and "different levels of theory" in err and "--allow-mixed" in err
    assert len(read_labelled([ds])) == 5
    s = update_dataset(lj_out, ds, allow_mixed=True)
    assert s["n_added"] == 2 and s["n_total"] == 7


def test_bad_labelling_inputs(selected, tmp_path, capsys):
    with pytest.raises(
        SettingsError,
        match="calculator 'nope:Calc' cannot be imported \\(No module named 'nope'\\)",
    ):
        make_backend(LabellingSettings(calculator="nope:Calc"))
    src = str(selected["dir"])
    code = main(
        [
            "label",
            "--calculator",
            "emt",
            "--calculator-params",
            "{bad",
            "--structures",
            src,
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "--calculator-params is not valid JSON" in capsys.readouterr().err
    code = main(
        [
            "label",
            "--calculator",
            "emt",
            "--calculator-params",
            '{"foo": 1}',
            "--structures",
            src,
            "--output",
            str(tmp_path / "o2"),
        ]
    )
    assert code == 2 and "bad parameters" in capsys.readouterr().err
    with pytest.raises(StructureError, match="no labelled structures or label tasks"):
        (tmp_path / "emptydir").mkdir()
        update_dataset(tmp_path / "emptydir", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


SHARED_VASP = Path(__file__).resolve().parents[1].parent / "shared" / "vasp-fixtures"

EMT_SCRIPT = """
import os, ase.io
from ase.calculators.emt import EMT
a = ase.io.read(os.environ["NEQUIX_FW_STRUCTURE"])
a.calc = EMT()
a.get_potential_energy(); a.get_forces(); a.get_stress()
ase.io.write("labelled.extxyz", a)
"""


def test_script_backend_runs_user_command(selected, tmp_path, capsys):
    script = tmp_path / "emt_label.py"
    script.write_text(EMT_SCRIPT)
    out = tmp_path / "o"
    code = main(
        [
            "label",
            "--backend",
            "script",
            "--command",
            f"{sys.executable} {script}",
            "--structures",
            str(selected["dir"]),
            "--output",
            str(out),
            "--min-distance",
            "1.0",
            "--no-progress",
        ]
    )
    assert code == 0 and "labelled 5 of 6 structures with script" in capsys.readouterr().out
    a = selected["cells"][1]
    got = ase.io.read(out / structure_id(a) / "labelled.extxyz")
    ref = a.copy()
    ref.calc = EMT()
    assert got.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(got.get_forces(), ref.get_forces(), atol=1e-6)
    task = json.loads((out / structure_id(a) / "task.json").read_text())
    assert task["returncode"] == 0 and task["result_file"] == "labelled.extxyz"


def test_script_backend_reads_vasprun(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SHARED_VASP / "al_static" / "POSCAR", src / "POSCAR")
    s = LabellingSettings(
        backend="script", command=f"cp {SHARED_VASP / 'al_static' / 'vasprun.xml'} ."
    )
    summary = label_structures(src, tmp_path / "o", make_backend(s), s, progress=False)
    assert summary["n_success"] == 1
    (task,) = [json.loads(p.read_text()) for p in (tmp_path / "o").glob("*/task.json")]
    got = ase.io.read(tmp_path / "o" / task["structure_id"] / "labelled.extxyz")
    assert got.get_potential_energy() == pytest.approx(-3.74599651, abs=1e-6)


def test_script_failures_are_recorded(selected, tmp_path, capsys):
    s = LabellingSettings(backend="script", command="echo boom >&2; exit 3")
    summary = label_structures(selected["dir"], tmp_path / "o", make_backend(s), s, progress=False)
    assert summary["n_failed"] == 6
    assert {f["reason"] for f in summary["failed"]} == {
        "command exited 3: boom",
        "min interatomic distance 0.500 Å < 0.7 Å: not sent to script",
    }
    s = LabellingSettings(backend="script", command="true")
    summary = label_structures(selected["dir"], tmp_path / "o2", make_backend(s), s, progress=False)
    too_close = "min interatomic distance 0.500 Å < 0.7 Å: not sent to script"
    reasons = {f["reason"] for f in summary["failed"]}
    assert reasons == {"the command left no result file", too_close}
    src = str(selected["dir"])
    code = main(
        [
            "label",
            "--backend",
            "script",
            "--command",
            "nosuchprog --fast",
            "--structures",
            src,
            "--output",
            str(tmp_path / "o3"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "label.command: executable 'nosuchprog' not found" in err


def test_truncated_results_and_bad_poscar(tmp_path, capsys):
    import gzip

    res = tmp_path / "results"
    res.mkdir()
    with gzip.open(SHARED_VASP / "si2_relax" / "vasprun.xml.gz", "rb") as f:
        xml = f.read()
    (res / "vasprun.xml").write_bytes(xml[: len(xml) // 2])
    code = main(["update-dataset", "--new", str(res), "--dataset", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert code == 2 and "vasprun.xml: truncated or unreadable vasprun.xml" in err
    assert not (tmp_path / "ds").exists()
    shutil.copy(SHARED_VASP / "al_static" / "vasprun.xml", res / "vasprun.xml")  # complete run
    s = update_dataset(res, tmp_path / "ds")
    (d,) = read_labelled([tmp_path / "ds"])
    assert s["n_added"] == 1 and d.energy == pytest.approx(-3.74599651, abs=1e-6)
    # OUTCAR: a truncated one (crashed run, no end-of-run footer) is refused; a complete one
    # gives its final step, e_0 as from vasprun.xml
    outs = tmp_path / "outcars"
    outs.mkdir()
    with gzip.open(SHARED_VASP / "si2_relax" / "OUTCAR.gz", "rt") as f:
        lines = f.read().splitlines(keepends=True)
    (outs / "OUTCAR").write_text("".join(lines[:3300]))  # stops inside the 2nd ionic step
    code = main(["update-dataset", "--new", str(outs), "--dataset", str(tmp_path / "ds2")])
    err = capsys.readouterr().err
    assert code == 2 and "OUTCAR: truncated OUTCAR (VASP did not finish the run)" in err
    assert not (tmp_path / "ds2").exists()
    (outs / "OUTCAR").write_text("".join(lines))
    s = update_dataset(outs, tmp_path / "ds2")
    (d,) = read_labelled([tmp_path / "ds2"])
    assert s["n_added"] == 1 and d.energy == pytest.approx(-10.84147246, abs=1e-6)
    bad = tmp_path / "selected"
    bad.mkdir()
    (bad / "POSCAR").write_text("not a poscar\n1.0\n")
    code = main(
        ["label", "--calculator", "emt", "--structures", str(bad), "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "POSCAR: cannot read structures" in err
    assert not list((tmp_path / "o").glob("*/task.json"))


def test_script_timeout_kills_the_whole_command(selected, tmp_path):
    """A command past --timeout is killed with its children (nothing runs or writes on), and
    its output files are kept."""
    cmd = 'bash -c "echo started; sleep 4; echo late > late.txt"; sleep 30'
    s = LabellingSettings(backend="script", command=cmd, timeout_s=1, min_distance_A=1.0)
    one = selected["dir"] / f"{structure_id(selected['cells'][0])}.vasp"
    summary = label_structures(one, tmp_path / "o", make_backend(s), s, progress=False)
    assert summary["failed"][0]["reason"] == "timed out after 1.0 s"
    (work,) = [p.parent for p in (tmp_path / "o").glob("*/task.json")]
    assert (work / "script.out").read_text() == "started\n" and (work / "script.err").exists()
    time.sleep(4.5)
    assert not (work / "late.txt").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    running = {line.strip() for line in ps.splitlines()}
    assert "sleep 30" not in running and "sleep 4" not in running


def test_fresh_output_with_a_duplicated_frame_reuses_nothing(tmp_path, capsys):
    a = make_cells(2, seed=4)
    ase.io.write(tmp_path / "in.extxyz", [a[0], a[1], a[0]])
    code, cap = _label(tmp_path / "in.extxyz", tmp_path / "o", capsys)
    assert code == 0, cap.err
    assert "labelled 2 of 2 structures with ase; 0 failed" in cap.out  # one label per structure
    assert "earlier run" not in cap.out


def test_label_groups_of_a_selection_read_only_their_own_files(model_paths, tmp_path, monkeypatch):
    import nequix_fw.labelling.base as base
    from nequix_fw.evaluation import run_ensemble
    from nequix_fw.selection import select_from_results
    from nequix_fw.settings import SelectionSettings

    ase.io.write(tmp_path / "pool.extxyz", make_cells(12, seed=4))
    run_ensemble(model_paths, [tmp_path / "pool.extxyz"], tmp_path / "r.json", progress=False)
    sel = tmp_path / "sel"
    manifest = select_from_results(tmp_path / "r.json", sel, SelectionSettings(lo=0.0))
    index = json.loads((sel / "selected.json").read_text())["structures"]
    chosen = [e for e in manifest["structures"] if e["selected"]]
    assert sorted(e["file"] for e in chosen) == [e["file"] for e in index] and len(index) == 12
    read = []
    iter_frames = base.iter_frames

    def counting(inputs):
        for fr in iter_frames(inputs):
            read.append(Path(fr.source).name)
            yield fr

    monkeypatch.setattr(base, "iter_frames", counting)
    backend = make_backend(LabellingSettings(backend="ase", calculator="emt"))
    settings = LabellingSettings(backend="ase", calculator="emt")
    ids = []
    for g in range(3):  # groups of 5: 5, 5, 2
        read.clear()
        out = label_structures(sel, tmp_path / "labels", backend, settings, 1, False, (g, 5))
        assert read == [e["file"] for e in index[5 * g : 5 * g + 5]]  # its files, no others
        ids += out["structure_ids"]
    assert ids == [e["id"] for e in index]  # every selected structure once, by its recorded id
    # a structure file added by hand: the groups fall back to reading all, in the same order
    extra = make_cells(1, seed=99)[0]
    ase.io.write(sel / "zz_extra.extxyz", extra)
    read.clear()
    out = label_structures(sel, tmp_path / "labels2", backend, settings, 1, False, (2, 5))
    assert len(read) == 13 and out["structure_ids"] == [index[10]["id"], index[11]["id"]] + [
        structure_id(extra)
    ]


def test_one_registry_of_labelling_backends():
    """Each registered backend declares its name and the settings it reads; together with
    the shared ones they are exactly the label settings, so none is orphaned."""
    from nequix_fw.labelling import backend_class
    from nequix_fw.labelling.base import COMMON_FIELDS
    from nequix_fw.settings import LABELLING_BACKENDS

    claimed = set(COMMON_FIELDS)
    for name in LABELLING_BACKENDS:
        cls = backend_class(name)
        assert cls.name == name
        assert set(cls.settings_fields) <= set(LabellingSettings.model_fields), name
        claimed |= set(cls.settings_fields)
    assert claimed == set(LabellingSettings.model_fields)
    with pytest.raises(ValueError, match="unknown labelling backend 'orca'; known: ase, script"):
        LabellingSettings(backend="orca")


def test_a_backend_of_ones_own_as_module_class(selected, tmp_path, monkeypatch):
    """A new backend is one module: `label.backend: module:Class` labels with it, and its
    name goes into every label's provenance."""
    (tmp_path / "my_backend.py").write_text(
        "from ase.calculators.emt import EMT\n"
        "from nequix_fw.labelling.base import LabellingBackend, LabelResult, singlepoint\n\n\n"
        "class DoubleEMT(LabellingBackend):\n"
        "    name = 'double_emt'\n"
        "    settings_fields = ('calculator_params',)\n\n"
        "    def __init__(self, settings):\n"
        "        self.params = settings.calculator_params\n\n"
        "    def settings_doc(self):\n"
        "        return {'emt': 'x2', **self.params}\n\n"
        "    def label(self, atoms, workdir):\n"
        "        a = atoms.copy()\n"
        "        a.calc = EMT()\n"
        "        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()\n"
        "        return LabelResult(singlepoint(atoms, 2 * e, 2 * f, 2 * s), 'success')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    s = LabellingSettings(backend="my_backend:DoubleEMT")
    out = tmp_path / "labels"
    summary = label_structures(selected["dir"], out, make_backend(s), s, progress=False)
    assert summary["backend"] == "double_emt" and summary["n_failed"] == 1  # the too-close one
    (task,) = [
        json.loads(p.read_text())
        for p in out.glob("*/task.json")
        if json.loads(p.read_text())["structure_id"] == structure_id(selected["cells"][0])
    ]
    assert task["backend"] == "double_emt"
    (label,) = read_labelled([out / task["structure_id"] / "labelled.extxyz"])
    ref = selected["cells"][0].copy()
    ref.calc = EMT()
    assert label.energy == pytest.approx(2 * ref.get_potential_energy(), abs=1e-6)
    with pytest.raises(SettingsError, match="label.backend: no LabellingBackend 'nowhere:X'"):
        make_backend(LabellingSettings(backend="nowhere:X"))


def test_each_backend_says_whether_its_labels_carry_a_stress(tmp_path):
    """`gives_stress`, asked before anything is labelled: an ASE calculator by what it
    declares, VASP unless ISIF is 0 (overrides first, then the user's INCAR), CP2K always,
    a user's script only by its output (None)."""
    from nequix_fw.labelling import backend_class

    def gives(**values):
        settings = LabellingSettings(**values)
        return backend_class(settings.backend).gives_stress(settings)

    assert gives(calculator="emt") is True and gives(calculator="tip3p") is False
    assert gives(calculator="no_such_calculator") is None  # refused when the backend is built
    assert gives(backend="vasp") is True
    assert gives(backend="vasp", incar_overrides={"ISIF": 0}) is False
    (tmp_path / "INCAR").write_text("ENCUT = 400\nISIF = 0\n")
    assert gives(backend="vasp", vasp_inputs=tmp_path) is False
    assert gives(backend="vasp", vasp_inputs=tmp_path, incar_overrides={"ISIF": 2}) is True
    assert gives(backend="cp2k") is True
    assert gives(backend="script", command="./label.sh") is None
