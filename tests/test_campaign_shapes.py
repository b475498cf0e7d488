"""Campaigns of other shapes, run with FireWorks on the local MongoDB server: staged exploration
(`campaign.phases`), several systems (`campaign.systems`), structural checks against an E-V set
labelled by the campaign's own backend. In a file of their own so that the test workers share
the campaign tests."""

import json

import ase.io
import pytest
from helpers import make_cells, run_campaign


def test_staged_exploration_advances_and_stops_after_the_last_phase(tmp_path, launchpad_file):
    """campaign.phases: iteration 1 explores at 300 K (phase 'cool', converged after one
    iteration); iteration 2 at 1000 K (phase 'hot', where a high trust level makes every
    candidate accurate: converged at its selection, nothing labelled), and the campaign stops."""
    extra = """
campaign:
  max_iterations: 6
  phases:
    - {name: cool, iterations: 1, settings: {explore: {temperatures_K: [300]}}}
    - {name: hot, accurate_fraction: 0.9,
       settings: {explore: {temperatures_K: [1000]}, select: {lo: 50.0}}}
"""
    r = run_campaign(tmp_path, "staged", lo=0.0, extra=extra)
    its = {it["iteration"]: it for it in r["log"]}
    assert sorted(its) == [0, 1, 2]
    assert (its[1]["stage"], its[1]["stage_converged"]) == (0, "1 iterations")
    assert its[1]["n_selected"] == 3 and its[1]["dataset_size"] == 7  # labelled and trained
    assert its[2]["stage"] == 1 and its[2]["stage_converged"].endswith("accurate (>= 90%)")
    assert its[2]["stop_reason"].startswith("converged: last phase hot: ")
    assert "dataset_size" not in its[2]  # nothing labelled in the converged phase
    for k, temperature in ((1, 300.0), (2, 1000.0)):  # each iteration explored in its phase
        m = json.loads((r["dir"] / f"iter_{k:03d}" / "explore" / "manifest.json").read_text())
        assert {t["temperature_K"] for t in m["trajectories"]} == {temperature}
    names = [n for n, _ in r["db"]["fireworks"]]
    assert "staged label 2" not in names and {s for _, s in r["db"]["fireworks"]} == {"COMPLETED"}


def test_two_systems_select_and_stop_on_their_own(tmp_path, launchpad_file):
    """campaign.systems: 'cu' (a trust level that makes its candidates accurate) converges at
    iteration 1 and is no longer explored; 'cuau' (quota 2) goes on until max_iterations."""
    ase.io.write(tmp_path / "cu.extxyz", make_cells(2, seed=11, au_every=0))
    ase.io.write(tmp_path / "cuau.extxyz", make_cells(2, seed=12, au_every=1))
    extra = """
campaign:
  systems:
    - {name: cu, initial_structures: cu.extxyz, accurate_fraction: 0.9,
       settings: {select: {lo: 50.0}}}
    - {name: cuau, initial_structures: cuau.extxyz, max_selected: 2,
       settings: {explore: {temperatures_K: [1000]}}}
"""
    r = run_campaign(tmp_path, "systems", lo=0.0, extra=extra)
    its = {it["iteration"]: it for it in r["log"]}
    assert sorted(its) == [0, 1, 2] and its[2]["stop_reason"] == "max_iterations (2) reached"
    one, two = its[1]["systems"], its[2]["systems"]
    assert one["cu"]["converged"].endswith("accurate (>= 90%)") and one["cu"]["n_selected"] == 0
    assert one["cuau"]["n_selected"] == 2 and one["cuau"]["converged"] is None
    assert set(two) == {"cuau"} and two["cuau"]["n_selected"] == 2  # cu no longer explored
    assert [its[k]["dataset_size"] for k in (0, 1, 2)] == [4, 6, 8]
    assert sorted(p.name for p in (r["dir"] / "iter_001" / "explore").iterdir()) == ["cu", "cuau"]
    assert sorted(p.name for p in (r["dir"] / "iter_002" / "explore").iterdir()) == ["cuau"]
    m = json.loads((r["dir"] / "iter_002" / "explore" / "cuau" / "manifest.json").read_text())
    assert {t["temperature_K"] for t in m["trajectories"]} == {1000.0}  # its own settings
    assert its[1]["system_candidates"]["cu"] > 0


def test_structural_checks_against_an_ev_set_labelled_once_by_the_campaign(
    tmp_path, launchpad_file
):
    """validate.reference: label: the campaign's label backend (EMT through the
    worker's >>reference_calculator<< placeholder) labels the E-V set of the first test
    structure once, into the dataset db:<name>_reference_ev; every validation compares the
    ensemble's E-V curve with it and records the errors that property_tolerances judge."""
    from ase.calculators.emt import EMT

    from nequix_fw.validation import energy_volume

    extra = """
campaign: {max_iterations: 1, property_tolerances: {v0_percent: 0.001}, property_labels: 2}
validate: {reference: label}
"""
    r = run_campaign(tmp_path, "evref", lo=0.0, extra=extra)
    its = r["log"]
    assert [it["iteration"] for it in its] == [0, 1]
    # 0.001 % is never met: the stop names the missed property with its error (or that the
    # ensemble's E-V curve had no fit)
    v0 = its[1]["properties"]["v0_percent"]
    missed = "V0 not computed" if v0 is None else f"V0 {v0:+.3g} %"
    assert its[1]["stop_reason"] == f"stopped: max_iterations (1) reached, not converged: {missed}"
    work = r["dir"] / "reference_ev"
    tasks = [json.loads(p.read_text()) for p in work.glob("labels/*/task.json")]
    assert len(tasks) == 7 and {t["status"] for t in tasks} == {"success"}
    summary = json.loads((work / "labels" / "summary.json").read_text())
    assert summary["n_reused"] == 7  # the second validation labelled nothing again
    first = ase.io.read(tmp_path / "testset.extxyz", index=0)
    direct = energy_volume(first, EMT())
    for k, it in enumerate(its):
        phys = json.loads(
            (r["dir"] / f"iter_{k:03d}" / "validate" / "validation.json").read_text()
        )["physics"]
        assert phys["reference"] == "db:evref_reference_ev" and phys["relaxation"] is None
        assert phys["ev_reference"]["v0"] == pytest.approx(direct["v0"], rel=1e-6)
        assert phys["ev_reference"]["bulk_modulus_GPa"] == pytest.approx(
            direct["bulk_modulus_GPa"], rel=1e-4
        )
        assert it["properties"]["v0_percent"] == phys["v0_error_percent"]
    # stored in MongoDB as a dataset of its own, apart from the training set
    datasets = [name for name, _ in r["db"]["dataset"]]
    assert datasets.count("evref_reference_ev") == 7 and datasets.count("evref") == 4 + 3
    # the missed V0 steered iteration 1: E-V candidates (volume-scaled cells, and NPT at the
    # pressures of the reference bulk modulus), of which property_labels (2) came first
    assert its[0]["reference_bulk_modulus_GPa"] == pytest.approx(direct["bulk_modulus_GPa"])
    eos = its[1]["property_exploration"]["eos"]
    assert eos["missed"] == ["v0_percent"] and eos["added"] == 16 + eos["npt"]
    manifest = json.loads((r["dir"] / "iter_001" / "select" / "manifest.json").read_text())
    reserved = [
        e for e in manifest["structures"] if e["reason"] == "property check eos missed (v0_percent)"
    ]
    assert len(reserved) == 2 == manifest["counts"]["reserved"]
    assert all(e["selected"] and e["source"] == eos["file"] for e in reserved)


def test_systems_go_through_the_phases_on_their_own(tmp_path, launchpad_file):
    """campaign.systems with campaign.phases: each system has its own phase. 'cu' (its own trust
    level makes its candidates accurate) converges phase 'cool' at its selection in iteration 1
    and phase 'hot' in 2, and is done; 'cuau' converges 'cool' by its iteration count, then stays
    in 'hot' (quota 2 a time) until max_iterations, explored alone."""
    ase.io.write(tmp_path / "cu.extxyz", make_cells(2, seed=11, au_every=0))
    ase.io.write(tmp_path / "cuau.extxyz", make_cells(2, seed=12, au_every=1))
    extra = """
campaign:
  max_iterations: 3
  systems:
    - {name: cu, initial_structures: cu.extxyz, settings: {select: {lo: 50.0}}}
    - {name: cuau, initial_structures: cuau.extxyz, max_selected: 2}
  phases:
    - {name: cool, iterations: 1, settings: {explore: {temperatures_K: [300]}}}
    - {name: hot, accurate_fraction: 0.9, settings: {explore: {temperatures_K: [1000]}}}
"""
    r = run_campaign(tmp_path, "sysstages", lo=0.0, extra=extra)
    assert not r["db"]["fizzled"], r["db"]["fizzled"][0]
    its = {it["iteration"]: it for it in r["log"]}
    assert sorted(its) == [0, 1, 2, 3] and its[3]["stop_reason"] == "max_iterations (3) reached"
    cu, cuau = its[1]["systems"]["cu"], its[1]["systems"]["cuau"]
    assert (cu["stage"], cu["stage_converged"], cu["n_selected"]) == (0, "0 selected (< 1)", 0)
    assert (cuau["stage"], cuau["stage_converged"], cuau["n_selected"]) == (0, "1 iterations", 2)
    cu, cuau = its[2]["systems"]["cu"], its[2]["systems"]["cuau"]
    assert cu["stage"] == 1 and cu["converged"].startswith("last phase hot: ")
    assert cuau["stage"] == 1 and cuau["stage_converged"] is None and not cuau["converged"]
    assert set(its[3]["systems"]) == {"cuau"} and its[3]["systems"]["cuau"]["stage"] == 1
    assert [its[k]["dataset_size"] for k in range(4)] == [4, 6, 8, 10]  # cuau's 2 each time
    for k, system, temperature in (
        (1, "cu", 300.0),
        (1, "cuau", 300.0),
        (2, "cu", 1000.0),
        (2, "cuau", 1000.0),
        (3, "cuau", 1000.0),
    ):
        path = r["dir"] / f"iter_{k:03d}" / "explore" / system / "manifest.json"
        m = json.loads(path.read_text())
        assert {t["temperature_K"] for t in m["trajectories"]} == {temperature}, (k, system)
