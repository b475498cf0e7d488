"""Exploration: ensemble-driven MD with uncertainty stops, and distortions."""

import json

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from nequix_fw.cli import main
from nequix_fw.ensemble import Ensemble, EnsembleCalculator
from nequix_fw.errors import SettingsError, StructureError
from nequix_fw.exploration import distorted_copies, explore, run_md
from nequix_fw.settings import ExplorationSettings, make_settings
from nequix_fw.structures import Frame, structure_id


def test_run_md_mean_temperature_within_tolerance():
    """The driver itself: mean kinetic temperature over a long NVT run with EMT."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    s = ExplorationSettings(steps=4000, timestep_fs=2.0, check_every=10, sample_every=10,
                            friction_per_fs=0.02)  # fmt: skip
    temps = []

    class Probe(EMT):  # EMT that records the kinetic temperature at every force call
        def calculate(self, *args, **kwargs):
            super().calculate(*args, **kwargs)
            temps.append(self.atoms.get_temperature())

    traj = run_md(atoms, Probe(), 800.0, s, seed=1)
    assert traj.stop_reason == "completed" and traj.stop_step == 4000
    assert len(traj.frames) == 400 and traj.frames[-1].info["time_fs"] == 8000.0
    # mean over the equilibrated three quarters: within 10 % of the target (measured ~800 K)
    assert np.mean(temps[len(temps) // 4 :]) == pytest.approx(800, rel=0.1)


def test_uncertain_ensemble_stops_trajectories_early(trained):
    ens = Ensemble.from_specs(sorted(trained["dir"].glob("member_*.nqx")))
    calc = EnsembleCalculator(ens)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    steps = {}
    for hi in (0.5, 0.15):
        s = ExplorationSettings(steps=400, timestep_fs=5.0, check_every=5, sample_every=10, hi=hi)
        traj = run_md(atoms, calc, 2000.0, s, seed=0)
        assert traj.stop_reason == "uncertainty", traj
        steps[hi] = traj.stop_step
        for f in traj.frames:
            assert f.info["max_force_dev"] <= hi and f.info["parent_id"] == structure_id(atoms)
    assert steps[0.15] < steps[0.5]


def test_explore_writes_deduplicated_pool_and_manifest(trained, tmp_path, capsys):
    start = tmp_path / "start.extxyz"
    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    ase.io.write(start, [cell, cell.copy()])  # the same structure twice
    models = [str(p) for p in sorted(trained["dir"].glob("member_*.nqx"))]
    code = main(["explore", "--models", *models, "--structures", str(start), "--output",
                 str(tmp_path / "cands"), "--temperatures", "300", "600", "--steps", "40",
                 "--timestep", "2", "--check-every", "10", "--sample-every", "20",
                 "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "4 trajectories (4 completed)" in out
    manifest = json.loads((tmp_path / "cands" / "manifest.json").read_text())
    frames = ase.io.read(tmp_path / "cands" / "candidates.extxyz", ":")
    # two identical starts give identical trajectories: 2 temperatures x 2 samples, deduplicated
    assert len(frames) == len(manifest["frames"]) == 4
    assert [structure_id(f) for f in frames] == [f["id"] for f in manifest["frames"]]
    assert {f.info["temperature_K"] for f in frames} == {300.0, 600.0}


def test_bad_exploration_inputs(trained, tmp_path):
    with pytest.raises(SettingsError, match="temperatures must be > 0 K"):
        make_settings(ExplorationSettings, temperatures_K=[300, -5])
    with pytest.raises(SettingsError, match="must be a multiple of check_every"):
        make_settings(ExplorationSettings, sample_every=15, check_every=10)
    mol = ase.Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
    with pytest.raises(SettingsError, match="NPT needs a periodic cell"):
        run_md(mol, EMT(), 300.0, ExplorationSettings(steps=10), pressure_GPa=1.0)
    ens = Ensemble.from_specs(sorted(trained["dir"].glob("member_*.nqx")))
    ni = bulk("Ni", "fcc", a=3.52)
    with pytest.raises(StructureError, match="contains Ni, which the models do not cover"):
        explore(ens, [Frame(ni, "ni.xyz", 0)], tmp_path / "o", ExplorationSettings(steps=10))
    with pytest.raises(StructureError, match="no starting structures"):
        explore(ens, [], tmp_path / "o", ExplorationSettings())


def test_distortions_statistics():
    cell = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 3))
    copies = distorted_copies(cell, 20, rattle_std=0.05, strain_max=0.0, seed=1)
    disp = np.concatenate([c.positions - cell.positions for c in copies])
    assert disp.std() == pytest.approx(0.05, rel=0.05)
    strained = distorted_copies(cell, 50, rattle_std=0.0, strain_max=0.04, seed=2)
    eps = np.array([np.linalg.solve(cell.cell[:], c.cell[:]) - np.eye(3) for c in strained])
    assert np.abs(eps).max() <= 0.04 + 1e-12 and np.abs(eps).max() > 0.03
    np.testing.assert_allclose(eps, eps.transpose(0, 2, 1), atol=1e-12)  # symmetric strains
