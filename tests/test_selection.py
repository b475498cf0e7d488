import json

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from helpers import emt_labelled, make_cells

from nequix_fw.errors import NequixFWError, OutputError, SettingsError
from nequix_fw.evaluation import run_ensemble
from nequix_fw.results import read_results
from nequix_fw.selection import farthest_point_order, select_from_results
from nequix_fw.settings import SelectionSettings, make_settings
from nequix_fw.structures import structure_id


@pytest.fixture(scope="module")
def results(model_paths, tmp_path_factory):
    d = tmp_path_factory.mktemp("sel")
    ase.io.write(d / "cands.extxyz", make_cells(24, seed=5))
    out = d / "results.json"
    run_ensemble(model_paths, [d / "cands.extxyz"], out, progress=False)
    return out


def _devs(results):
    _, recs = read_results(results)
    return {r["id"]: r["metrics"]["max_force_dev"] for r in recs}


def test_results_file_schema_and_streaming(results):
    header, recs = read_results(results)
    assert header["schema"] == "nequix-fw/ensemble-results" and header["schema_version"] == 2
    assert header["arrays"]["file"] == "results.arrays.npz"
    assert [m["name"] for m in header["models"]] == ["m0", "m1", "m2"]
    recs = list(recs)
    assert len(recs) == 24 and [r["frame"] for r in recs] == list(range(24))
    r = recs[3]
    assert len(r["energies"]) == 3 and np.shape(r["forces"]) == (3, r["n_atoms"], 3)
    assert np.shape(r["stresses"]) == (3, 6)
    assert r["mean"]["energy"] == pytest.approx(np.mean(r["energies"]), abs=1e-6)
    assert r["id"] == structure_id(ase.io.read(r["source"], index=3))
    doc = json.loads(results.read_text())  # the streamed file is one valid JSON document
    assert doc["summary"] == {
        "n_structures": 24,
        "n_failed": 0,
        "n_atoms": sum(x["n_atoms"] for x in recs),
    }


def test_selection_equals_threshold_set(results, tmp_path):
    devs = _devs(results)
    values = np.array(sorted(devs.values()))
    lo, hi = float(values[5]), float(values[18])
    manifest = select_from_results(results, tmp_path / "sel", SelectionSettings(lo=lo, hi=hi))
    want = {i for i, d in devs.items() if lo <= d < hi}
    got = {e["id"] for e in manifest["structures"] if e["selected"]}
    assert got == want and len(want) == 13
    classes = {e["id"]: e["class"] for e in manifest["structures"]}
    by_class = {c: {i for i, k in classes.items() if k == c} for c in ("failed", "accurate")}
    assert by_class["failed"] == {i for i, d in devs.items() if d >= hi}
    assert by_class["accurate"] == {i for i, d in devs.items() if d < lo}
    assert manifest["counts"] == {
        "accurate": 5,
        "candidate": 13,
        "failed": 6,
        "selected": 13,
        "already_labelled": 0,
        "reserved": 0,
    }
    files = sorted(p.name for p in (tmp_path / "sel").glob("*.vasp"))
    assert files == sorted(f"{i}.vasp" for i in want)
    # the POSCAR holds the evaluated structure
    _, recs = read_results(results)
    rec = next(r for r in recs if r["id"] in want)
    atoms = ase.io.read(tmp_path / "sel" / f"{rec['id']}.vasp")
    from nequix_fw.results import record_atoms

    want_atoms = record_atoms(rec)
    np.testing.assert_allclose(
        atoms.get_positions(wrap=True), want_atoms.get_positions(wrap=True), atol=1e-6
    )
    assert structure_id(atoms) == rec["id"]


def test_threshold_only_and_cap_takes_most_uncertain(results, tmp_path):
    devs = _devs(results)
    manifest = select_from_results(
        results, tmp_path / "sel", SelectionSettings(lo=0.0, max_selected=5, format="extxyz")
    )
    top5 = sorted(devs, key=devs.get, reverse=True)[:5]
    assert {e["id"] for e in manifest["structures"] if e["selected"]} == set(top5)
    assert manifest["counts"]["candidate"] == 24 and manifest["counts"]["selected"] == 5
    frames = [ase.io.read(p) for p in (tmp_path / "sel").glob("*.extxyz")]
    assert {f.info["id"] for f in frames} == set(top5)


def test_diverse_does_not_pick_near_duplicates(model_paths, tmp_path):
    base = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    base.rattle(0.15, seed=1)
    dups = []
    for k in range(8):
        a = base.copy()
        a.rattle(0.001, seed=10 + k)
        dups.append(a)
    distinct = make_cells(6, seed=9)[3:]  # different sizes/compositions
    ase.io.write(tmp_path / "pool.extxyz", dups + distinct)
    run_ensemble(model_paths, [tmp_path / "pool.extxyz"], tmp_path / "r.json", progress=False)
    dup_ids = {structure_id(a) for a in dups}
    s = SelectionSettings(lo=0.0, max_selected=4, diverse=True)
    manifest = select_from_results(tmp_path / "r.json", tmp_path / "div", s)
    picked = [e["id"] for e in manifest["structures"] if e["selected"]]
    assert len(picked) == 4 and len(dup_ids & set(picked)) == 1


def test_candidates_described_a_chunk_at_a_time_select_the_same(results, tmp_path, monkeypatch):
    import nequix_fw.selection as selection

    settings = SelectionSettings(lo=0.0, max_selected=8, diverse=True)
    whole = select_from_results(results, tmp_path / "whole", settings)
    calls = []
    describe = selection.describer

    def counting(*args):
        inner = describe(*args)
        return lambda structures, *kept: calls.append(len(structures)) or inner(structures, *kept)

    monkeypatch.setattr(selection, "DESCRIBE_CHUNK", 5)
    monkeypatch.setattr(selection, "describer", counting)
    chunked = select_from_results(results, tmp_path / "chunked", settings)
    assert calls and max(calls) <= 5 and sum(calls) == whole["counts"]["candidate"]
    assert chunked["structures"] == whole["structures"]


def test_select_uses_the_geometry_run_ensemble_kept(tmp_path, monkeypatch):
    """Models whose cutoff covers the descriptor's range keep each structure's geometry in
    the results (from their own graph); diverse selection then builds no neighbour list of
    its own and picks what it picks from geometries it computes itself."""
    import nequix_fw.ensemble as ensemble
    import nequix_fw.selection as selection
    from nequix_fw.descriptors import GEOMETRY_KEY, geometry
    from nequix_fw.models import new_model, save_model
    from nequix_fw.results import record_atoms

    paths = []
    for seed in range(2):
        module, config = new_model([29, 79], seed=seed, cutoff=6.0, lmax=1)
        paths.append(save_model(tmp_path / f"c6_{seed}.nqx", module, config))
    ase.io.write(tmp_path / "pool.extxyz", make_cells(12, seed=5))
    run_ensemble(paths, [tmp_path / "pool.extxyz"], tmp_path / "kept.json", progress=False)
    _, records = read_results(tmp_path / "kept.json")
    for rec in records:
        np.testing.assert_allclose(rec[GEOMETRY_KEY], geometry(record_atoms(rec)), atol=1e-6)
    monkeypatch.setattr(ensemble, "graph_geometry", lambda *a: None)
    run_ensemble(paths, [tmp_path / "pool.extxyz"], tmp_path / "not.json", progress=False)
    assert all(GEOMETRY_KEY not in rec for rec in read_results(tmp_path / "not.json")[1])

    settings = SelectionSettings(lo=0.0, max_selected=5, diverse=True)
    computed = select_from_results(tmp_path / "not.json", tmp_path / "computed", settings)
    calls = []
    structural = selection.structural
    monkeypatch.setattr(selection, "structural", lambda *a: calls.append(1) or structural(*a))
    kept = select_from_results(tmp_path / "kept.json", tmp_path / "kept", settings)
    assert calls == [] and kept["counts"]["candidate"] == 12
    picked = [[e["id"] for e in m["structures"] if e["selected"]] for m in (kept, computed)]
    assert len(picked[0]) == 5 and picked[0] == picked[1]


def test_farthest_point_order():
    x = np.array([[0.0], [0.1], [5.0], [10.0], [10.1]])
    assert farthest_point_order(x, 0, 3) == [0, 4, 2]


def test_min_distance_filter_marks_failed(model_paths, tmp_path):
    close = bulk("Cu", "fcc", a=3.6, cubic=True)
    close.positions[1] = close.positions[0] + [0.6, 0.0, 0.0]
    ok = make_cells(2, seed=3)
    ase.io.write(tmp_path / "p.extxyz", [close, *ok])
    run_ensemble(model_paths, [tmp_path / "p.extxyz"], tmp_path / "r.json", progress=False)
    manifest = select_from_results(
        tmp_path / "r.json", tmp_path / "s", SelectionSettings(lo=0.0, min_distance_A=1.5)
    )
    entry = manifest["structures"][0]
    assert entry["class"] == "failed" and not entry["selected"]
    assert entry["reason"].startswith("min interatomic distance 0.600 Å < 1.5 Å")
    assert manifest["counts"]["selected"] == 2


@pytest.mark.parametrize(
    "values, msg",
    [
        ({"lo": 0.3, "hi": 0.1}, "lo (0.3 eV/Å) must not exceed hi (0.1 eV/Å)"),
        ({"lo": -0.1}, "lo must be >= 0 eV/Å, got -0.1"),
        ({"lo": "auto"}, "lo: auto needs target_force_error (eV/Å)"),
        ({"hi": -1.0}, "hi: Input should be greater than or equal to 0"),
        ({"max_selected": 0}, "max_selected: Input should be greater than or equal to 1"),
    ],
)
def test_bad_thresholds(values, msg):
    with pytest.raises(SettingsError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        make_settings(SelectionSettings, **values)


def test_rerun_replaces_own_output_but_not_foreign_dir(results, tmp_path):
    out = tmp_path / "sel"
    select_from_results(results, out, SelectionSettings(lo=0.0, max_selected=3))
    select_from_results(results, out, SelectionSettings(lo=0.0, max_selected=2))
    assert len(list(out.glob("*.vasp"))) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and holds no selection manifest"):
        select_from_results(results, foreign, SelectionSettings())
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_single_model_results_refused(model_paths, tmp_path):
    from nequix_fw.ensemble import Ensemble
    from nequix_fw.results import ResultsWriter
    from nequix_fw.structures import Frame

    ens = Ensemble.from_specs(model_paths[:1])
    with ResultsWriter(tmp_path / "one.json", [m.info.to_dict() for m in ens.models], {}) as w:
        for rec in ens.evaluate([Frame(make_cells(1)[0], "mem", 0)]):
            w.write(rec)
    message = "at least 2 models or one with LLPR heads, these results have 1 model"
    with pytest.raises(NequixFWError, match=message):
        select_from_results(tmp_path / "one.json", tmp_path / "s", SelectionSettings())


def test_already_labelled_structures_are_not_selected_again(results, tmp_path, capsys):
    """With --exclude-dataset, the structures already in the training set are skipped and the
    next most uncertain ones take their places."""
    from ase.calculators.emt import EMT

    from nequix_fw.cli import main
    from nequix_fw.dataset import update_dataset

    devs = _devs(results)
    ranked = sorted(devs, key=lambda i: -devs[i])
    # label the two most uncertain candidates and put them in a training set
    frames = {structure_id(a): a for a in ase.io.read(results.parent / "cands.extxyz", ":")}
    labelled = []
    for sid in ranked[:2]:
        a = frames[sid].copy()
        a.calc = EMT()
        a.get_potential_energy()
        labelled.append(a)
    ase.io.write(tmp_path / "labels.extxyz", labelled)
    update_dataset(tmp_path / "labels.extxyz", tmp_path / "ds")
    code = main(
        [
            "select",
            "--ensemble",
            str(results),
            "--threshold",
            "0",
            "--max-selected",
            "3",
            "--exclude-dataset",
            str(tmp_path / "ds"),
            "--output",
            str(tmp_path / "sel"),
        ]
    )
    assert code == 0 and "(2 already labelled)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    chosen = [s["id"] for s in manifest["structures"] if s["selected"]]
    assert sorted(chosen) == sorted(ranked[2:5])
    skipped = {s["id"]: s["reason"] for s in manifest["structures"] if s["id"] in ranked[:2]}
    assert skipped == {ranked[0]: "already labelled", ranked[1]: "already labelled"}


def _entries(n_candidates: int, n_accurate: int, n_failed: int) -> list:
    from nequix_fw.selection import Entry

    classes = ["candidate"] * n_candidates + ["accurate"] * n_accurate + ["failed"] * n_failed
    return [
        Entry(
            id=f"s{i}",
            source="x",
            frame=i,
            formula="Cu4",
            n_atoms=4,
            cls=c,
            metrics={"max_force_dev": 0.01 * i},
        )
        for i, c in enumerate(classes)
    ]


def test_random_selection_is_uniform_reproducible_and_skips_failed_and_labelled():
    from nequix_fw.selection import choose
    from nequix_fw.settings import SelectionSettings

    excluded = {"s0", "s21"}
    counts = np.zeros(40)
    for seed in range(3000):
        s = SelectionSettings(method="random", max_selected=9, seed=seed, lo=0.1)
        chosen = choose(_entries(20, 10, 10), s, exclude=excluded)
        assert len(chosen) == 9 and len({e.id for e in chosen}) == 9
        for e in chosen:
            counts[int(e.id[1:])] += 1
    # never a failed (30-39) or an already labelled structure; accurate ones are drawn too
    assert counts[30:].sum() == 0 and counts[0] == 0 and counts[21] == 0
    pickable = [i for i in range(30) if i not in (0, 21)]
    freq = counts[pickable] / 3000
    assert np.allclose(freq, 9 / 28, atol=0.035)  # uniform: 9 of 28, each
    s = SelectionSettings(method="random", max_selected=5, seed=7)
    first = [e.id for e in choose(_entries(20, 10, 10), s)]
    assert first == [e.id for e in choose(_entries(20, 10, 10), s)]  # the same seed, the same
    other = SelectionSettings(method="random", max_selected=5, seed=8)
    assert first != [e.id for e in choose(_entries(20, 10, 10), other)]
    # the uncertainty method takes the most uncertain candidates, never accurate ones
    unc = choose(_entries(20, 10, 10), SelectionSettings(max_selected=5, lo=0.1))
    assert [e.id for e in unc] == ["s19", "s18", "s17", "s16", "s15"]


def test_select_lo_auto_from_a_validation_report(results, tmp_path, capsys):
    from nequix_fw.cli import main

    report = tmp_path / "validation_report.json"
    report.write_text(
        json.dumps(
            {
                "uncertainty": {
                    "calibration": {
                        "scale": 1.5,
                        "conformal_factor": 2.0,
                        "coverage": 0.9,
                        "n_structures": 30,
                    }
                }
            }
        )
    )
    sel = str(tmp_path / "sel")
    code = main(
        [
            "select",
            "--ensemble",
            str(results),
            "--lo",
            "auto",
            "--target-force-error",
            "0.2",
            "--calibration",
            str(report),
            "--output",
            sel,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "lo = 0.1 eV/Å from the calibration" in out
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert manifest["settings"]["lo"] == pytest.approx(0.1)
    code = main(
        ["select", "--ensemble", str(results), "--lo", "auto", "--output", str(tmp_path / "sel2")]
    )
    assert code == 2 and "lo: auto needs target_force_error" in capsys.readouterr().err


def test_a_campaigns_selection_resolves_lo_auto_from_the_last_validation(results, tmp_path):
    """In a campaign, `lo: auto` is resolved inside the selection from the calibration that
    iteration k-1's validation recorded: the manifest and the record hold the number; a
    validation without one is named in the error."""
    import shutil

    import yaml

    from nequix_fw.campaign import Campaign
    from nequix_fw.campaign.stages import select_stage
    from nequix_fw.uncertainty import lower_trust_level
    from nequix_fw.workflows import campaign_sections

    (tmp_path / "data").mkdir()
    ase.io.write(tmp_path / "data" / "training_set.extxyz", emt_labelled(1, seed=3))
    (tmp_path / "t.xyz").write_text("")
    cfg = tmp_path / "c.yaml"
    campaign = {
        "directory": str(tmp_path / "r"),
        "initial_structures": "i.xyz",
        "dataset": str(tmp_path / "data"),
        "testset": [str(tmp_path / "t.xyz")],
    }
    select = {"lo": "auto", "target_force_error": 0.2}
    cfg.write_text(yaml.safe_dump({"campaign": campaign, "select": select}))
    c = Campaign(campaign_sections(cfg))
    cal = {"scale": 2.0, "conformal_factor": 2.0, "coverage": 0.9, "n_structures": 30}
    c.record(1, calibration=cal)
    for k in (2, 3):
        c.results_file(k, None).parent.mkdir(parents=True)
        shutil.copy(results, c.results_file(k, None))
        shutil.copy(results.with_suffix(".arrays.npz"), c.results_file(k, None).parent)
    record = select_stage(c, 2)
    lo = lower_trust_level(cal, 0.2)
    assert record["selection_lo"] == pytest.approx(lo) == pytest.approx(0.1)
    manifest = json.loads((c.stage_dir(2, "select") / "manifest.json").read_text())
    assert manifest["settings"]["lo"] == pytest.approx(lo)
    devs = [e["metrics"]["max_force_dev"] for e in manifest["structures"]]
    assert manifest["counts"]["accurate"] == sum(d < lo for d in devs)
    with pytest.raises(SettingsError, match="the validation of iteration 2 has none"):
        select_stage(c, 3)


@pytest.mark.parametrize("descriptor", ["structure", "learned"])
def test_diversity_keeps_away_from_the_training_set(model_paths, tmp_path, descriptor):
    """Candidates that are near-copies of training structures are passed over for new ones when
    the training set seeds the farthest-point sampling, with either descriptor."""
    training = make_cells(6, seed=31)  # 4- to 16-atom Cu/Au cells
    near = []
    for k, a in enumerate(training):
        b = a.copy()
        b.rattle(0.002, seed=50 + k)  # a near-copy of a training structure
        near.append(b)
    new = []
    for k in range(4):  # unlike anything in the training set: strained and rattled Cu8
        b = bulk("Cu", "fcc", a=3.9 + 0.1 * k, cubic=True).repeat((2, 1, 1))
        b.rattle(0.2, seed=70 + k)
        new.append(b)
    ase.io.write(tmp_path / "pool.extxyz", near + new)
    run_ensemble(model_paths, [tmp_path / "pool.extxyz"], tmp_path / "r.json", progress=False)
    s = SelectionSettings(lo=0.0, max_selected=4, diverse=True, descriptor=descriptor)
    with_training = select_from_results(
        tmp_path / "r.json", tmp_path / "a", s, training_set=training
    )
    picked = {e["id"] for e in with_training["structures"] if e["selected"]}
    assert picked == {structure_id(a) for a in new}
    # without it, picks start from the most uncertain and may well be near-copies
    plain = select_from_results(tmp_path / "r.json", tmp_path / "b", s)
    assert len([e for e in plain["structures"] if e["selected"]]) == 4
    # the farthest-point order itself: the first pick is the row farthest from the known rows
    x = np.array([[0.0], [0.1], [5.0], [2.0]])
    assert farthest_point_order(x, None, 2, known=np.array([[0.0]])) == [2, 3]


def test_lazy_farthest_points_equal_the_dense_order():
    """The k-d tree and the lazy order give the dense computation's order (distances from
    the known rows as a C x N matrix, the whole order computed up front)."""

    def dense(x, first, k, known=None):
        dist = np.full(len(x), np.inf)
        if known is not None:
            dist = np.min(np.linalg.norm(x[:, None, :] - known[None, :, :], axis=2), axis=1)
        chosen = [int(np.argmax(dist)) if first is None else first]
        dist = np.minimum(dist, np.linalg.norm(x - x[chosen[0]], axis=1))
        while len(chosen) < k:
            chosen.append(int(np.argmax(dist)))
            dist = np.minimum(dist, np.linalg.norm(x - x[chosen[-1]], axis=1))
        return chosen

    rng = np.random.default_rng(5)
    for _ in range(5):
        x, known = rng.normal(size=(200, 12)), rng.normal(size=(300, 12))
        assert farthest_point_order(x, 0, 60) == dense(x, 0, 60)
        assert farthest_point_order(x, None, 60, known) == dense(x, None, 60, known)
    # every row once, even among equal rows
    assert sorted(farthest_point_order(np.zeros((5, 2)), 0, 5)) == [0, 1, 2, 3, 4]


def test_uncertainty_weighted_farthest_points_pick_the_largest_weight_times_distance():
    from itertools import islice

    from nequix_fw.selection import farthest_points

    rng = np.random.default_rng(7)
    x, known, w = rng.normal(size=(150, 6)), rng.normal(size=(40, 6)), rng.lognormal(size=150)
    dist = np.min(np.linalg.norm(x[:, None] - known[None], axis=2), axis=1)
    want = []
    for _ in range(30):
        score = w * dist
        score[want] = -1
        want.append(int(np.argmax(score)))
        dist = np.minimum(dist, np.linalg.norm(x - x[want[-1]], axis=1))
    assert list(islice(farthest_points(x, None, known, weights=w), 30)) == want
    # from a given first row (no training set), weighted from the second pick on
    got = list(islice(farthest_points(x, 3, weights=w), 5))
    d = np.linalg.norm(x - x[3], axis=1)
    assert got[0] == 3 and got[1] == int(np.argmax(w * d))
    # with equal weights it is plain farthest-point sampling
    assert list(islice(farthest_points(x, None, known, weights=np.ones(150)), 30)) == (
        farthest_point_order(x, None, 30, known)
    )


def test_diverse_selection_within_quotas_equals_the_direct_computation(monkeypatch):
    """Farthest-point sampling under quotas picks, each time, the candidate farthest from the
    training set and the picks so far among those the quotas still allow; the structures a
    full quota refuses get its reason. It makes only the picks it takes (no pass over the
    whole order when quotas are tight)."""
    from nequix_fw import selection
    from nequix_fw.selection import Entry, choose
    from nequix_fw.settings import SelectionSettings

    def direct(x, formulas, k, known, per_comp, per_el):
        taken_c, taken_e, chosen = {}, {}, []
        dist = np.min(np.linalg.norm(x[:, None] - known[None], axis=2), axis=1)
        while len(chosen) < k:
            ok = [
                i
                for i in range(len(x))
                if i not in chosen
                and taken_c.get(formulas[i], 0) < per_comp
                and ("Au" not in formulas[i] or taken_e.get("Au", 0) < per_el)
            ]
            if not ok:
                break
            i = max(ok, key=lambda j: dist[j])
            chosen.append(i)
            taken_c[formulas[i]] = taken_c.get(formulas[i], 0) + 1
            if "Au" in formulas[i]:
                taken_e["Au"] = taken_e.get("Au", 0) + 1
            dist = np.minimum(dist, np.linalg.norm(x - x[i], axis=1))
        return chosen

    picks = []
    orig = selection.farthest_points

    def counting(*args, **kw):
        for i in orig(*args, **kw):
            picks.append(i)
            yield i

    monkeypatch.setattr(selection, "farthest_points", counting)
    rng = np.random.default_rng(11)
    kinds = ["Cu", "Cu3Au", "CuAu", "Ni", "CuNi"]
    for trial in range(4):
        n = 300
        x, known = rng.normal(size=(n, 6)), rng.normal(size=(50, 6))
        formulas = [kinds[i] for i in rng.integers(0, len(kinds), n)]
        entries = [
            Entry(f"d{i}", "x", i, formulas[i], 4, {"max_force_dev": 1.0 - i / n}, "candidate")
            for i in range(n)
        ]
        for e, row in zip(entries, x, strict=True):
            e.descriptor = row
        k = [5, 12, 40, 299][trial]  # 40 and 299: more than the quotas allow (3 x 5 kinds)
        s = SelectionSettings(
            max_selected=k, diverse=True, max_per_composition=3, max_per_element={"Au": 4}
        )
        picks.clear()
        chosen = choose(entries, s, known=known)
        want = direct(x, formulas, k, known, 3, 4)
        assert [int(e.id[1:]) for e in chosen] == want
        assert len(picks) == len(want)  # every pick taken
        for e in entries:
            if not e.selected and e.reason is not None:
                assert e.reason.startswith("quota: ")
        if k >= 40:  # Au's 4, and 3 each of Cu, Ni and CuNi
            assert len(chosen) == 13
            assert all(e.reason for e in entries if not e.selected)


def test_quotas_per_element_and_composition(results, tmp_path, capsys):
    from nequix_fw.cli import main
    from nequix_fw.selection import Entry, choose

    def entry(i, formula):
        return Entry(
            id=f"q{i}",
            source="x",
            frame=i,
            formula=formula,
            n_atoms=4,
            cls="candidate",
            metrics={"max_force_dev": 1.0 - 0.01 * i},
        )

    # the most uncertain ones all hold Au: a quota of 2 lets the Cu-only ones in
    entries = [
        entry(i, f)
        for i, f in enumerate(["Cu3Au", "Cu2Au2", "CuAu3", "Cu3Au", "Cu4", "Cu8", "Cu4", "Cu4"])
    ]
    s = SelectionSettings(max_selected=5, max_per_element={"Au": 2}, max_per_composition=2)
    chosen = choose(entries, s)
    assert [e.formula for e in chosen] == ["Cu3Au", "Cu2Au2", "Cu4", "Cu8"]  # Cu4 = Cu8 reduced
    assert entries[2].reason == "quota: max_per_element Au"
    assert entries[6].reason == "quota: max_per_composition Cu"
    # a quota for an element no structure holds is one clear error
    code = main(
        [
            "select",
            "--ensemble",
            str(results),
            "--lo",
            "0",
            "--config",
            str(_quota_config(tmp_path, "{Pt: 3}")),
            "--output",
            str(tmp_path / "s"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "select.max_per_element: Pt in none of the structures" in err
    with pytest.raises(SettingsError, match=r"unknown elements \['Xx'\]"):
        make_settings(SelectionSettings, max_per_element={"Xx": 1})


def _quota_config(tmp_path, quotas: str):
    cfg = tmp_path / "q.yaml"
    cfg.write_text(f"select:\n  max_per_element: {quotas}\n")
    return cfg


def test_relative_force_and_stress_deviation_levels(results, tmp_path, capsys):
    """DP-GEN's use_relative: the levels apply to dev_i / (|F_i| + level), recomputed here from
    the per-model forces; stress levels add candidates whose forces are in trust and fail
    structures above stress_hi."""
    from nequix_fw.cli import main
    from nequix_fw.uncertainty import atomic_force_deviation

    _, recs = read_results(results)
    recs = list(recs)
    want = {}
    for r in recs:
        f = np.array(r["forces"])
        rel = atomic_force_deviation(f) / (np.linalg.norm(f.mean(axis=0), axis=1) + 0.5)
        want[r["id"]] = rel.max()
        # relative <= absolute / level, and it is not just a rescaling of the absolute metric
        assert rel.max() <= r["metrics"]["max_force_dev"] / 0.5 + 1e-9
    lo = float(np.median(list(want.values())))
    out = tmp_path / "rel"
    assert (
        main(
            [
                "select",
                "--ensemble",
                str(results),
                "--output",
                str(out),
                "--lo",
                str(lo),
                "--relative-force-level",
                "0.5",
                "--format",
                "extxyz",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    picked = {e["id"] for e in manifest["structures"] if e["selected"]}
    assert picked == {i for i, v in want.items() if v >= lo} and 0 < len(picked) < len(want)
    # stress levels: with force levels that call everything accurate, stress_std decides
    stress = {r["id"]: r["metrics"]["stress_std"] for r in recs}
    s_lo, s_hi = np.quantile(list(stress.values()), [0.5, 0.9])
    out = tmp_path / "stress"
    code = main(
        [
            "select",
            "--ensemble",
            str(results),
            "--output",
            str(out),
            "--lo",
            "1000",
            "--stress-lo",
            str(s_lo),
            "--stress-hi",
            str(s_hi),
            "--format",
            "extxyz",
        ]
    )
    assert code == 0
    entries = json.loads((out / "manifest.json").read_text())["structures"]
    got = {e["id"]: e["class"] for e in entries}
    for i, v in stress.items():
        assert got[i] == ("failed" if v >= s_hi else "candidate" if v >= s_lo else "accurate")
    with pytest.raises(SettingsError, match="stress_hi needs stress_lo"):
        make_settings(SelectionSettings, stress_hi=1.0)
    with pytest.raises(SettingsError, match="does not go with relative_force_level"):
        make_settings(
            SelectionSettings, lo="auto", target_force_error=0.1, relative_force_level=1.0
        )


def test_log_level_info_tells_what_the_stage_did(results, tmp_path, capsys):
    """`nequix-fw --log-level info` logs the stage's outcome on stderr; the default is quiet."""
    from nequix_fw.cli import main

    out = tmp_path / "sel"
    argv = [
        "select",
        "--ensemble",
        str(results),
        "--output",
        str(out),
        "--lo",
        "0.0",
        "--max-selected",
        "5",
    ]
    assert main(argv) == 0
    assert "nequix_fw" not in capsys.readouterr().err
    assert main(["--log-level", "info", *argv]) == 0
    err = capsys.readouterr().err
    assert f"INFO nequix_fw.selection: selection from {results}: " in err
    assert f"24 candidate, 0 failed, 5 selected, 0 already_labelled, 0 reserved -> {out}" in err


def test_a_store_dataset_keeps_its_descriptors_for_every_later_selection(
    model_paths, launchpad_file, tmp_path, capsys
):
    """A store dataset computes each training structure's descriptor once, ever, when it is
    added (kept in its document): diverse selection against it picks the same as from the
    structures themselves, and describes only documents stored without one (by an older
    version)."""
    import ase.io
    from helpers import emt_labelled

    from nequix_fw.cli import main
    from nequix_fw.descriptors import GEOMETRY_KEY, geometry
    from nequix_fw.store import StoreDataset

    ds = StoreDataset("db:kept", launchpad_file)
    train = emt_labelled(12, seed=61)
    for a in train:
        a.info["structure_id"] = structure_id(a)
    ds.add(train)
    ase.io.write(tmp_path / "c.extxyz", emt_labelled(20, seed=62, rattle=0.2))
    argv = [
        "run-ensemble",
        "--models",
        *map(str, model_paths),
        "--structures",
        str(tmp_path / "c.extxyz"),
        "--output",
        str(tmp_path / "r.json"),
        "--no-progress",
    ]
    assert main(argv) == 0
    s = SelectionSettings(lo=0.0, max_selected=5, diverse=True)
    plain = select_from_results(tmp_path / "r.json", tmp_path / "a", s, training_set=train)
    kept = select_from_results(tmp_path / "r.json", tmp_path / "b", s, training_set=ds)

    def picks(m):
        return [e["id"] for e in m["structures"] if e["selected"]]

    assert picks(kept) == picks(plain) and len(picks(plain)) == 5
    docs = list(ds.collection.find({"dataset": "kept"}).sort("added", 1))
    for doc, a in zip(docs, train, strict=True):
        np.testing.assert_allclose(doc["descriptors"][GEOMETRY_KEY], geometry(a))
    more = emt_labelled(2, seed=63)
    for a in more:
        a.info["structure_id"] = structure_id(a)
    ds.add(more)
    ids = [f"kept/{a.info['structure_id']}" for a in more]
    ds.collection.update_many({"_id": {"$in": ids}}, {"$unset": {"descriptors": 1}})
    described = []
    numbers, rows = ds.described(
        GEOMETRY_KEY,
        lambda structures: (
            described.extend(structures) or np.stack([geometry(a) for a in structures])
        ),
    )
    assert len(described) == 2 and rows.shape == (14, len(geometry(train[0])))
    # in no particular order: each structure's numbers with its own descriptor
    got = sorted((tuple(n), tuple(np.round(r, 6))) for n, r in zip(numbers, rows, strict=True))
    want = sorted((tuple(a.numbers), tuple(np.round(geometry(a), 6))) for a in train + more)
    assert got == want
    ds.described(GEOMETRY_KEY, lambda structures: described.extend(structures))
    assert len(described) == 2


def test_select_method_random_from_the_command_line(results, tmp_path):
    """`select --method random`: the control draws --max-selected structures with its seed,
    the same with the same seed, others with another, and records the method."""
    from nequix_fw.cli import main

    def picks(seed: int, out: str) -> list[str]:
        argv = ["select", "--ensemble", str(results), "--method", "random"]
        argv += ["--max-selected", "6", "--seed", str(seed), "--output", str(tmp_path / out)]
        assert main(argv) == 0
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        assert manifest["settings"]["method"] == "random"
        return sorted(e["id"] for e in manifest["structures"] if e["selected"])

    first = picks(1, "selected_random")
    assert len(first) == 6 and set(first) <= set(_devs(results))
    assert picks(1, "again") == first
    assert picks(2, "other") != first


def test_reserved_picks_come_first_whatever_their_class():
    """A reserve takes the most uncertain of its source that did not fail and were not
    labelled, accurate ones included, within max_selected; the rest goes by uncertainty."""
    from nequix_fw.selection import choose
    from nequix_fw.settings import SelectionSettings

    entries = _entries(20, 10, 10)  # s0-s19 candidates, s20-s29 accurate, s30-s39 failed
    for e in entries[25:35]:
        e.source = "property_candidates_eos.extxyz"  # s25-s29 accurate, s30-s34 failed
    reserve = [("property_candidates_eos.extxyz", 3, "property check eos missed")]
    s = SelectionSettings(max_selected=5, lo=0.1)
    chosen = choose(entries, s, exclude={"s29"}, reserve=reserve)
    assert [e.id for e in chosen] == ["s28", "s27", "s26", "s19", "s18"]
    assert {e.cls for e in chosen[:3]} == {"accurate"}
    assert {e.reason for e in chosen[:3]} == {"property check eos missed"}
    assert entries[29].reason == "already labelled" or not entries[29].selected
    # a reserve of another source takes nothing; one larger than the budget takes all of it
    big = [("property_candidates_eos.extxyz", 9, "r")]
    unc = ["s19", "s18", "s17", "s16", "s15"]
    assert [e.id for e in choose(_entries(20, 10, 10), s, reserve=big)] == unc
    entries = _entries(20, 10, 10)
    for e in entries[15:30]:
        e.source = "property_candidates_eos.extxyz"  # s15-s19 candidates, s20-s29 accurate
    picks = [e.id for e in choose(entries, s, reserve=big)]
    assert picks == ["s29", "s28", "s27", "s26", "s25"]  # 5 of 9: max_selected


def test_reserved_picks_keep_within_the_quotas_and_count_towards_them():
    """The reserve passes over what a per-composition or per-element quota refuses (with the
    reason) and takes the next of its source; what it took counts when the rest is chosen."""
    from nequix_fw.selection import choose
    from nequix_fw.settings import SelectionSettings

    entries = _entries(20, 10, 0)  # s0-s19 candidates, s20-s29 accurate
    for e in entries[24:30]:
        e.source = "property_candidates_eos.extxyz"
    for e in entries[28:30]:
        e.formula = "Cu3Au"  # s28, s29: the reserve's most uncertain
    reserve = [("property_candidates_eos.extxyz", 3, "property check eos missed")]
    s = SelectionSettings(max_selected=6, lo=0.1, max_per_composition=2)
    chosen = [e.id for e in choose(entries, s, reserve=reserve)]
    # Cu3Au: s29, s28 (its quota of 2); Cu: s27, then the rest by uncertainty within Cu's 2
    assert chosen == ["s29", "s28", "s27", "s19"]
    assert entries[18].reason == "quota: max_per_composition Cu"
    s = SelectionSettings(max_selected=6, lo=0.1, max_per_element={"Au": 1})
    entries = _entries(20, 10, 0)
    for e in entries[24:30]:
        e.source = "property_candidates_eos.extxyz"
    for e in entries[28:30]:
        e.formula = "Cu3Au"
    chosen = [e.id for e in choose(entries, s, reserve=reserve)]
    assert chosen[:3] == ["s29", "s27", "s26"]  # s28 would be a second Au structure
    assert entries[28].reason == "quota: max_per_element Au" and not entries[28].selected
    assert len(chosen) == 6


def test_what_uncertainty_leaves_of_max_selected_goes_to_the_reserve():
    """When uncertainty selects fewer than max_selected after the reserve, the rest of the
    budget goes to the reserve's sources (their next most uncertain, first source first), as
    the missed checks are known to need labels; without max_selected nothing more is taken."""
    from nequix_fw.selection import choose
    from nequix_fw.settings import SelectionSettings

    def entries():
        out = _entries(2, 20, 0)  # s0, s1 candidates; s2-s21 accurate
        for e in out[10:22]:
            e.source = "property_candidates_elastic.extxyz"
        for e in out[6:10]:
            e.source = "property_candidates_eos.extxyz"
        return out

    reserve = [
        ("property_candidates_elastic.extxyz", 2, "property check elastic missed"),
        ("property_candidates_eos.extxyz", 2, "property check eos missed"),
    ]
    s = SelectionSettings(max_selected=8, lo=0.1)
    chosen = choose(entries(), s, reserve=reserve)
    # 2 + 2 reserved, 2 by uncertainty, then 2 more from the first source
    assert [e.id for e in chosen] == ["s21", "s20", "s9", "s8", "s19", "s18", "s1", "s0"]
    assert chosen[4].reason == "property check elastic missed"
    s = SelectionSettings(max_selected=None, lo=0.1)
    assert [e.id for e in choose(entries(), s, reserve=reserve)] == [
        "s21",
        "s20",
        "s9",
        "s8",
        "s1",
        "s0",
    ]


def test_a_selection_manifest_reads_back_as_returned(results, tmp_path):
    """The manifest select writes (its header checked, its entries written one per line)
    reads back as its model and equals what select returned."""
    from nequix_fw.schemas import SelectionManifest

    settings = SelectionSettings(lo=0.0, diverse=True, max_selected=3)
    returned = select_from_results(results, tmp_path / "sel", settings)
    path = tmp_path / "sel" / "manifest.json"
    doc = SelectionManifest.from_file(path)
    assert doc.to_dict() == returned == json.loads(path.read_text())
    assert len(doc.structures) > 3 and doc.counts.selected == 3
    assert sum(ln.startswith('  {"id"') for ln in path.read_text().splitlines()) == len(
        doc.structures
    )
