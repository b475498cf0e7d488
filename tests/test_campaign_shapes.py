"""Campaigns of other shapes, run with FireWorks on the local MongoDB server: staged exploration
(`campaign.stages`) and several systems (`campaign.systems`). In a file of their own so that the
test workers share the campaign tests."""

import json

import ase.io
from conftest import make_cells
from test_campaign import _campaign


def test_staged_exploration_advances_and_stops_after_the_last_stage(tmp_path, launchpad_file):
    """campaign.stages: iteration 1 explores at 300 K (stage 'cool', converged after one
    iteration); iteration 2 at 1000 K (stage 'hot', where a high trust level makes every
    candidate accurate: converged at its selection, nothing labelled), and the campaign stops."""
    extra = """
campaign:
  max_iterations: 6
  stages:
    - {name: cool, iterations: 1, settings: {exploration: {temperatures_K: [300]}}}
    - {name: hot, accurate_fraction: 0.9,
       settings: {exploration: {temperatures_K: [1000]}, selection: {lo: 50.0}}}
"""
    r = _campaign(tmp_path, "staged", lo=0.0, extra=extra)
    its = {it["iteration"]: it for it in r["log"]}
    assert sorted(its) == [0, 1, 2]
    assert (its[1]["stage"], its[1]["stage_converged"]) == (0, "1 iterations")
    assert its[1]["n_selected"] == 3 and its[1]["dataset_size"] == 7  # labelled and trained
    assert its[2]["stage"] == 1 and its[2]["stage_converged"].endswith("accurate (>= 90%)")
    assert its[2]["stop_reason"].startswith("converged: last stage hot: ")
    assert "dataset_size" not in its[2]  # nothing labelled in the converged stage
    for k, temperature in ((1, 300.0), (2, 1000.0)):  # each iteration explored in its stage
        m = json.loads((r["dir"] / f"iter_{k:03d}" / "candidates" / "manifest.json").read_text())
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
       settings: {selection: {lo: 50.0}}}
    - {name: cuau, initial_structures: cuau.extxyz, max_selected: 2,
       settings: {exploration: {temperatures_K: [1000]}}}
"""
    r = _campaign(tmp_path, "systems", lo=0.0, extra=extra)
    its = {it["iteration"]: it for it in r["log"]}
    assert sorted(its) == [0, 1, 2] and its[2]["stop_reason"] == "max_iterations (2) reached"
    one, two = its[1]["systems"], its[2]["systems"]
    assert one["cu"]["converged"].endswith("accurate (>= 90%)") and one["cu"]["n_selected"] == 0
    assert one["cuau"]["n_selected"] == 2 and one["cuau"]["converged"] is None
    assert set(two) == {"cuau"} and two["cuau"]["n_selected"] == 2  # cu no longer explored
    assert [its[k]["dataset_size"] for k in (0, 1, 2)] == [4, 6, 8]
    assert sorted(p.name for p in (r["dir"] / "iter_001" / "candidates").iterdir()) == [
        "cu", "cuau"]  # fmt: skip
    assert sorted(p.name for p in (r["dir"] / "iter_002" / "candidates").iterdir()) == ["cuau"]
    m = json.loads((r["dir"] / "iter_002" / "candidates" / "cuau" / "manifest.json").read_text())
    assert {t["temperature_K"] for t in m["trajectories"]} == {1000.0}  # its own settings
    assert its[1]["system_candidates"]["cu"] > 0
