"""The results file's two versions: columnar (2, default) and one JSON (1), read the same way."""

import json
import shutil

import ase.io
import numpy as np
import pytest
from ase.units import GPa
from helpers import make_cells

from nequix_fw.cli import main
from nequix_fw.ensemble import EnsembleRecord, Prediction
from nequix_fw.errors import NequixFWError
from nequix_fw.evaluation import run_ensemble
from nequix_fw.results import ResultsWriter, arrays_path, read_results
from nequix_fw.selection import select_from_results
from nequix_fw.settings import EnsembleSettings, SelectionSettings
from nequix_fw.structures import Frame, structure_id
from nequix_fw.uncertainty import ensemble_metrics

MODELS = [{"name": f"m{k}", "path": f"m{k}.nqx", "sha256": f"{k}" * 64} for k in range(3)]


def _records(n: int, seed: int = 0) -> list[EnsembleRecord]:
    """Records of cells of 4-16 atoms with known predictions (and one failed)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, a in enumerate(make_cells(n, seed=seed)):
        pred = Prediction(
            energies=rng.normal(-3 * len(a), 0.1, 3),
            forces=rng.normal(0, 0.2, (3, len(a), 3)),
            stresses=rng.normal(0, 0.01, (3, 6)),
        )
        status = "ok"
        metrics = ensemble_metrics(pred.energies, pred.forces, pred.stresses)
        if i == 7:  # as the ensemble records a non-finite prediction
            pred.forces[1, 0, 0] = np.nan
            status, metrics = "failed", dict.fromkeys(metrics)
        out.append(
            EnsembleRecord(Frame(a, "cells.extxyz", i), structure_id(a), pred, metrics, status)
        )
    return out


def _write(path, records, per_model=True, fmt="columnar", chunk=5):
    settings = {"store_per_model": per_model, "results_format": fmt}
    with ResultsWriter(path, MODELS, settings, records_per_chunk=chunk) as w:
        for r in records:
            w.write(r)
    return path


@pytest.mark.parametrize("per_model", [True, False])
def test_columnar_records_equal_the_written_predictions_across_chunks(tmp_path, per_model):
    records = _records(23)  # 5 chunks of 5, the last one short; 4-16 atoms each
    path = _write(tmp_path / "r.json", records, per_model)
    header, got = read_results(path)
    assert header["schema_version"] == 2 and header["arrays"]["records_per_chunk"] == 5
    got = list(got)
    assert [g["id"] for g in got] == [r.id for r in records]
    for g, r in zip(got, records, strict=True):
        a = r.frame.atoms
        assert g["n_atoms"] == len(a) and g["status"] == r.status
        np.testing.assert_array_equal(g["structure"]["numbers"], a.numbers)
        np.testing.assert_array_equal(g["structure"]["positions"], a.positions)  # float64
        np.testing.assert_array_equal(g["structure"]["cell"], a.cell[:])
        mean = r.prediction.forces.mean(axis=0)
        np.testing.assert_allclose(g["mean"]["forces"], mean, rtol=1e-6, atol=1e-7)
        if per_model:
            np.testing.assert_array_equal(g["forces"], r.prediction.forces.astype(np.float32))
            np.testing.assert_allclose(g["energies"], r.prediction.energies, atol=1e-7)
            np.testing.assert_allclose(
                g["stresses"], r.prediction.stresses / GPa, rtol=1e-6, atol=1e-7
            )
        else:
            assert "forces" not in g and "energies" not in g
        assert g["metrics"] == json.loads(json.dumps(r.metrics))
    zf_names = set(np.load(arrays_path(path)).files)
    assert {f"c{k:06d}.n_atoms" for k in range(5)} <= zf_names and "c000005.n_atoms" not in zf_names
    # some records by id (selection's second pass): the same, arrays from the right chunks
    ids = {records[k].id for k in (3, 11, 22)}
    _, some = read_results(path, ids)
    some = list(some)
    assert [g["id"] for g in some] == [records[k].id for k in (3, 11, 22)]
    for g, k in zip(some, (3, 11, 22), strict=True):
        np.testing.assert_array_equal(g["structure"]["positions"], got[k]["structure"]["positions"])
        np.testing.assert_array_equal(g["mean"]["forces"], got[k]["mean"]["forces"])


def test_both_versions_read_back_the_same_and_select_the_same(model_paths, tmp_path):
    ase.io.write(tmp_path / "cands.extxyz", make_cells(24, seed=5))
    out = {}
    for fmt in ("json", "columnar"):
        out[fmt] = tmp_path / f"{fmt}.json"
        settings = EnsembleSettings(results_format=fmt)
        run_ensemble(model_paths, [tmp_path / "cands.extxyz"], out[fmt], settings, progress=False)
    assert not arrays_path(out["json"]).exists() and arrays_path(out["columnar"]).is_file()
    (h1, r1), (h2, r2) = (read_results(out[f]) for f in ("json", "columnar"))
    assert (h1["schema_version"], h2["schema_version"]) == (1, 2)
    for a, b in zip(r1, r2, strict=True):
        assert (a["id"], a["formula"], a["metrics"]) == (b["id"], b["formula"], b["metrics"])
        assert a["energies"] == b["energies"] and a["mean"]["energy"] == b["mean"]["energy"]
        for key in ("numbers", "positions", "cell", "pbc"):
            np.testing.assert_allclose(a["structure"][key], b["structure"][key], atol=1e-8)
        np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-6)  # v1: 7 decimals
        np.testing.assert_allclose(a["mean"]["forces"], b["mean"]["forces"], atol=1e-6)
    # the same selection from either, diverse and relative levels included
    settings = SelectionSettings(lo=0.0, max_selected=9, diverse=True, relative_force_level=0.5)
    picks = {}
    for fmt, path in out.items():
        manifest = select_from_results(path, tmp_path / f"sel_{fmt}", settings)
        picks[fmt] = [(e["id"], e["class"], e["selected"]) for e in manifest["structures"]]
        files = sorted(p.name for p in (tmp_path / f"sel_{fmt}").glob("*.vasp"))
        assert len(files) == 9
    assert picks["json"] == picks["columnar"]
    for name in files:  # the written structures are the same
        a, b = (ase.io.read(tmp_path / f"sel_{f}" / name) for f in ("json", "columnar"))
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-7)
    # the columnar pair is much smaller than the one JSON
    size = {
        f: p.stat().st_size + sum(q.stat().st_size for q in [arrays_path(p)] if q.exists())
        for f, p in out.items()
    }
    assert size["columnar"] < 0.6 * size["json"]


def _select(path, tmp_path, capsys):
    code = main(["select", "--ensemble", str(path), "--lo", "0", "--output", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert not (tmp_path / "s").exists()
    return code, err


def test_a_mixture_of_versions_or_a_lost_arrays_file_is_one_line(tmp_path, capsys):
    path = _write(tmp_path / "r.json", _records(6))
    other = _write(tmp_path / "o.json", _records(6, seed=1))
    # the arrays file of another run beside it
    shutil.copy(arrays_path(other), arrays_path(path))
    code, err = _select(path, tmp_path, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "r.arrays.npz was written by another run" in err and "rerun run-ensemble" in err
    # no arrays file
    arrays_path(path).unlink()
    code, err = _select(path, tmp_path, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "r.json" in err and "r.arrays.npz cannot be read" in err
    # a damaged one
    arrays_path(path).write_bytes(b"PK\x03\x04 not a zip")
    code, err = _select(path, tmp_path, capsys)
    assert code == 2 and "r.arrays.npz cannot be read" in err
    # a version-1 header that names an arrays file, and a version-2 one that names none
    text = other.read_text()
    header = json.loads(text.split("\n", 1)[0].removesuffix(', "structures": [') + "}")
    for version, arrays, why in (
        (1, header["arrays"], "version 1 has no arrays file"),
        (2, None, "version 2 names no arrays file"),
    ):
        h = dict(header, schema_version=version, arrays=arrays)
        first = json.dumps(h)[:-1] + ', "structures": ['
        (tmp_path / "m.json").write_text(first + "\n" + text.split("\n", 1)[1])
        code, err = _select(tmp_path / "m.json", tmp_path, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and why in err and "m.json" in err
    # an arrays file that holds fewer records than its JSON
    records = _records(6)
    _write(tmp_path / "short.json", records[:5])
    ok = _write(tmp_path / "long.json", records)
    text = ok.read_text().splitlines()
    short_header = (tmp_path / "short.json").read_text().splitlines()[0]
    (tmp_path / "short.json").write_text("\n".join([short_header, *text[1:]]) + "\n")
    code, err = _select(tmp_path / "short.json", tmp_path, capsys)
    assert code == 2 and "short.arrays.npz holds no records from 5 on" in err
    # records out of the arrays file's order (4 and 8 atoms)
    lines = ok.read_text().splitlines()
    lines[1], lines[2] = lines[2][1:], "," + lines[1]
    ok.write_text("\n".join(lines) + "\n")
    code, err = _select(ok, tmp_path, capsys)
    assert code == 2 and "record 0 does not match its arrays file" in err


def test_a_failed_run_leaves_neither_file(tmp_path):
    records = _records(8)
    with pytest.raises(RuntimeError):
        with ResultsWriter(tmp_path / "r.json", MODELS, {}, records_per_chunk=3) as w:
            for r in records[:5]:
                w.write(r)
            raise RuntimeError("killed mid-run")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a json rerun over a columnar one removes the columnar arrays it no longer matches
    path = _write(tmp_path / "r.json", records)
    _write(path, records, fmt="json")
    assert not arrays_path(path).exists() and read_results(path)[0]["schema_version"] == 1
    with pytest.raises(NequixFWError, match="r.arrays.npz: cannot read ensemble results"):
        read_results(arrays_path(path))
