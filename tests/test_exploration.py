"""Exploration: ensemble-driven MD with uncertainty stops, and distortions."""

import json

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from nequix_fw.cli import main
from nequix_fw.ensemble import Ensemble, EnsembleCalculator, NeighbourCache
from nequix_fw.errors import SettingsError, StructureError
from nequix_fw.exploration import (
    distorted_copies,
    explore,
    random_packing,
    run_md,
    with_substitutions,
    with_vacancies,
)
from nequix_fw.graphs import build_graph
from nequix_fw.settings import EnsembleSettings, ExplorationSettings, make_settings
from nequix_fw.structures import Frame, min_distance, structure_id


def test_run_md_mean_temperature_within_tolerance():
    """The driver itself: mean kinetic temperature over a long NVT run with EMT."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    s = ExplorationSettings(
        steps=4000, timestep_fs=2.0, check_every=10, sample_every=10, friction_per_fs=0.02
    )
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
    """Members trained on different splits disagree along a hot trajectory: with an upper trust
    level the run stops at the first check above it (the same dynamics as a reference run
    without a level), and a lower level stops it sooner."""
    paths = sorted(trained["dir"].glob("member_*.nqx"))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))

    def run(hi):  # only uncertainty stops: tiny models may bring atoms close at 2000 K
        s = ExplorationSettings(
            steps=400,
            timestep_fs=5.0,
            check_every=5,
            sample_every=5,
            stop_force_dev=hi,
            stop_min_distance_A=0.05,
            max_temperature_factor=100,
        )
        return run_md(atoms, EnsembleCalculator(Ensemble.from_specs(paths)), 2000.0, s, seed=0)

    ref = run(None)
    devs = np.array([f.info["max_force_dev"] for f in ref.frames])
    assert ref.stop_reason == "completed" and len(devs) == 80 and devs.max() > 2 * devs.min()
    high = 0.95 * devs.max()
    low = 0.95 * devs[: int(np.argmax(devs > high))].max()
    steps = {}
    for hi in (high, low):
        traj = run(hi)
        first_above = int(np.argmax(devs > hi))
        assert traj.stop_reason == "uncertainty", traj
        assert traj.stop_step == 5 * (first_above + 1)
        assert len(traj.frames) == first_above
        for f in traj.frames:
            assert f.info["max_force_dev"] <= hi and f.info["parent_id"] == structure_id(atoms)
        steps[hi] = traj.stop_step
    assert steps[low] < steps[high]


def test_explore_writes_deduplicated_pool_and_manifest(trained, tmp_path, capsys):
    start = tmp_path / "start.extxyz"
    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    ase.io.write(start, [cell, cell.copy()])  # the same structure twice
    models = [str(p) for p in sorted(trained["dir"].glob("member_*.nqx"))]
    code = main(
        [
            "explore",
            "--models",
            *models,
            "--structures",
            str(start),
            "--output",
            str(tmp_path / "cands"),
            "--temperatures",
            "300",
            "600",
            "--steps",
            "40",
            "--timestep",
            "2",
            "--check-every",
            "10",
            "--sample-every",
            "20",
            "--no-progress",
        ]
    )
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
    with pytest.raises(SettingsError, match="max_energy_drift_eV_per_atom_ps needs the Bussi"):
        make_settings(ExplorationSettings, max_energy_drift_eV_per_atom_ps=0.1)  # Langevin
    mol = ase.Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
    with pytest.raises(SettingsError, match="Cu2: NPT needs a fully periodic cell"):
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


def test_distortion_generators_statistics():
    cell = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 3))
    # uniform rattle: lengths uniform in [0, amplitude] -> mean amplitude / 2, none above it
    copies = distorted_copies(cell, 20, rattle_std=0.1, seed=3, rattle_distribution="uniform")
    lengths = np.concatenate([np.linalg.norm(c.positions - cell.positions, axis=1) for c in copies])
    assert lengths.max() <= 0.1 + 1e-12 and lengths.mean() == pytest.approx(0.05, rel=0.05)
    # volumetric strain: isotropic, volume ratio (1 + e)^3 with e in +-0.05
    vol = distorted_copies(cell, 200, rattle_std=0.0, seed=4, strain_volumetric=0.05)
    eps = np.array([np.linalg.solve(cell.cell[:], c.cell[:]) - np.eye(3) for c in vol])
    np.testing.assert_allclose(eps, eps[:, :1, :1] * np.eye(3), atol=1e-12)
    assert np.abs(eps[:, 0, 0]).max() <= 0.05 and np.abs(eps[:, 0, 0]).max() > 0.045
    assert eps[:, 0, 0].std() == pytest.approx(0.1 / np.sqrt(12), rel=0.15)  # uniform's std
    # shear strain: diagonal untouched, off-diagonal symmetric in +-0.03, volume nearly kept
    sh = distorted_copies(cell, 100, rattle_std=0.0, seed=5, strain_shear=0.03)
    eps = np.array([np.linalg.solve(cell.cell[:], c.cell[:]) - np.eye(3) for c in sh])
    assert np.abs(eps[:, [0, 1, 2], [0, 1, 2]]).max() < 1e-12
    np.testing.assert_allclose(eps, eps.transpose(0, 2, 1), atol=1e-12)
    assert 0.025 < np.abs(eps).max() <= 0.03
    # vacancies and substitutions
    rng = np.random.default_rng(0)
    assert len(with_vacancies(cell, 3, rng)) == len(cell) - 3
    with pytest.raises(StructureError, match="cannot make 108 vacancies in 108 atoms"):
        with_vacancies(cell, 108, rng)
    alloy = with_substitutions(cell, {"Cu": "Au"}, 0.25, rng)
    assert (alloy.numbers == 79).sum() == 27 and (alloy.numbers == 29).sum() == 81
    np.testing.assert_array_equal(alloy.positions, cell.positions)


def test_random_packing_density_and_min_distance():
    from ase.units import _amu

    rng = np.random.default_rng(7)
    for _ in range(5):
        a = random_packing("Cu16Au16", 12.0, 2.2, rng)
        assert a.get_chemical_formula() == "Au16Cu16" and a.pbc.all()
        density = a.get_masses().sum() * _amu * 1e3 / (a.get_volume() * 1e-24)
        assert density == pytest.approx(12.0, rel=1e-9)
        assert min_distance(a) >= 2.2
    with pytest.raises(SettingsError, match="could not place"):
        random_packing("Cu32", 30.0, 2.5, rng, max_attempts=200)


def test_neighbour_cache_equals_fresh_lists_and_rebuilds_rarely():
    """Reused lists give exactly the edges of a fresh list, under moves and NPT-like strains."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(0)
    cache = NeighbourCache(cutoff=5.0, skin=0.5)
    index = {29: 0}
    for step in range(60):
        atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + rng.normal(0, 0.002, (3, 3))), scale_atoms=True)
        got, want = cache.graph(atoms, index), build_graph(atoms, index, 5.0)
        edges = [
            sorted(zip(g["senders"], g["receivers"], map(tuple, g["shifts"]), strict=True))
            for g in (got, want)
        ]
        assert got["n_edge"][0] == want["n_edge"][0] and edges[0] == edges[1], step
    assert 1 < cache.builds < 20


def test_md_with_neighbour_skin_matches_rebuilding_every_step(trained):
    paths = sorted(trained["dir"].glob("member_*.nqx"))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    s = ExplorationSettings(steps=100, timestep_fs=2.0, check_every=10, sample_every=10)
    runs = {}
    for skin in (0.0, 0.6):
        calc = EnsembleCalculator(Ensemble.from_specs(paths, EnsembleSettings(skin_A=skin)))
        traj = run_md(atoms, calc, 600.0, s, seed=2)
        runs[skin] = (np.array([f.positions for f in traj.frames]), calc)
    np.testing.assert_allclose(runs[0.0][0], runs[0.6][0], atol=1e-5)
    assert runs[0.0][1].neighbours.builds == 101 and runs[0.6][1].neighbours.builds < 30


@pytest.mark.parametrize("barostat", ["mtk", "mtk_isotropic", "berendsen"])
def test_npt_barostats_respond_to_pressure(barostat):
    """Through the driver with EMT: a higher pressure gives a smaller mean volume."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    volumes = {}
    for p in (0.0, 10.0):
        s = ExplorationSettings(
            steps=600,
            timestep_fs=2.0,
            check_every=10,
            sample_every=10,
            barostat=barostat,
            taut_fs=50,
            taup_fs=250,
        )
        traj = run_md(atoms, EMT(), 300.0, s, pressure_GPa=p, seed=0)
        assert traj.stop_reason == "completed"
        volumes[p] = np.mean([f.get_volume() for f in traj.frames[20:]]) / len(atoms)
    # EMT Cu: a0 = 3.59 Å (11.6 Å³/atom), B ~ 135 GPa -> about 6-7 % compression at 10 GPa
    assert volumes[0.0] == pytest.approx(11.6, rel=0.03)
    assert 0.91 < volumes[10.0] / volumes[0.0] < 0.96


def test_nose_hoover_mean_temperature():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    s = ExplorationSettings(
        steps=3000,
        timestep_fs=2.0,
        check_every=10,
        sample_every=10,
        thermostat="nose_hoover",
        taut_fs=50,
    )
    temps = []

    class Probe(EMT):
        def calculate(self, *args, **kwargs):
            super().calculate(*args, **kwargs)
            temps.append(self.atoms.get_temperature())

    assert run_md(atoms, Probe(), 600.0, s, seed=1).stop_reason == "completed"
    assert np.mean(temps[len(temps) // 4 :]) == pytest.approx(600, rel=0.1)


def test_explore_pool_with_generators_and_parallel_workers(trained, tmp_path, capsys):
    start = tmp_path / "start.extxyz"
    ase.io.write(start, bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1)))
    models = [str(p) for p in sorted(trained["dir"].glob("member_*.nqx"))]
    common = [
        "explore",
        "--models",
        *models,
        "--structures",
        str(start),
        "--temperatures",
        "300",
        "900",
        "--steps",
        "20",
        "--check-every",
        "10",
        "--sample-every",
        "10",
        "--distortions",
        "3",
        "--rattle",
        "0.05",
        "--strain",
        "0.02",
        "--vacancies",
        "1",
        "--substitute",
        "Cu:Au",
        "--substitution-fraction",
        "0.2",
        "--random",
        "Cu8Au8:11:2",
        "--no-progress",
    ]
    manifests = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert main([*common, "--output", str(out), "--workers", workers]) == 0
        manifests[workers] = json.loads((out / "manifest.json").read_text())
        frames = ase.io.read(out / "candidates.extxyz", ":")
        by_gen = {}
        for f in frames:
            by_gen.setdefault(f.info["generator"], []).append(f)
        assert len(by_gen["md"]) == 4 and len(by_gen["distortion"]) == 3
        assert len(by_gen["random_packing"]) == 2
        for f in by_gen["distortion"]:
            assert len(f) == 15 and (f.numbers == 79).sum() == 3  # 1 vacancy, 20 % of 15 Cu
        assert all(len(f) == 16 and min_distance(f) >= 1.5 for f in by_gen["random_packing"])
    capsys.readouterr()
    # parallel trajectories give the serial results
    assert [t["stop_step"] for t in manifests["1"]["trajectories"]] == [
        t["stop_step"] for t in manifests["2"]["trajectories"]
    ]
    p1 = np.array([f["max_force_dev"] for f in manifests["1"]["frames"] if "max_force_dev" in f])
    p2 = np.array([f["max_force_dev"] for f in manifests["2"]["frames"] if "max_force_dev" in f])
    np.testing.assert_allclose(p1, p2, rtol=1e-4)
    # shaping copies without making any is refused
    code = main(
        [
            "explore",
            "--models",
            *models,
            "--structures",
            str(start),
            "--output",
            str(tmp_path / "x"),
            "--rattle",
            "0.1",
        ]
    )
    assert code == 2 and "give --distortions N" in capsys.readouterr().err


def _assert_same_trajectories(one, batched):
    assert [t.stop_reason for t in one] == [t.stop_reason for t in batched]
    assert [t.stop_step for t in one] == [t.stop_step for t in batched]
    for a, b in zip(one, batched, strict=True):
        assert len(a.frames) == len(b.frames) > 0 and a.condition == b.condition
        for fa, fb in zip(a.frames, b.frames, strict=True):
            np.testing.assert_allclose(fa.positions, fb.positions, atol=1e-4)
            np.testing.assert_allclose(fa.cell[:], fb.cell[:], atol=1e-5)
            assert fa.info["max_force_dev"] == pytest.approx(fb.info["max_force_dev"], 1e-3)
            assert fa.info["step"] == fb.info["step"]


@pytest.fixture(scope="module")
def walker_jobs(trained):
    ens = Ensemble.from_specs(sorted(trained["dir"].glob("member_*.nqx")))
    small = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    big = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    big.numbers[[0, 5, 9]] = 79
    jobs = [
        (small, 300.0, None, 0, "a"),
        (big, 900.0, None, 1, "b"),
        (small, 2500.0, None, 2, "c"),
        (big, 600.0, None, 3, "d"),
        (small, 600.0, None, 4, "e"),
    ]
    return ens, jobs


def _walker_settings(ens, jobs, thermostat, walkers, **kw) -> ExplorationSettings:
    """60 steps of 4 fs; an upper trust level that the 2500 K trajectory (job 2) crosses, not
    at its first check, in the middle of the widest gap between the deviations it reaches (so
    that rounding cannot decide on which side of it a check falls)."""
    common = dict(steps=60, timestep_fs=4.0, check_every=5, sample_every=10, thermostat=thermostat)
    unstopped = ExplorationSettings(**{**common, "sample_every": 5}, stop_force_dev=None)
    ref = run_md(jobs[2][0], EnsembleCalculator(ens), 2500.0, unstopped, seed=2)
    devs = [f.info["max_force_dev"] for f in ref.frames]
    levels = [devs[0], *sorted(d for d in devs[1:] if d > devs[0])]
    hi = max((b - a, (a + b) / 2) for a, b in zip(levels[:-1], levels[1:], strict=True))[1]
    return ExplorationSettings(**common, stop_force_dev=hi, walkers=walkers, **kw)


@pytest.mark.parametrize(
    ("thermostat", "walkers", "filter_pairs"),
    [("langevin", 3, None), ("bussi", 3, None), ("langevin", 8, None), ("bussi", 8, False)],
)
def test_batched_nvt_walkers_equal_ase_one_trajectory_at_a_time(
    walker_jobs, thermostat, walkers, filter_pairs
):
    """NVT trajectories (two sizes, two elements; one stopped early on uncertainty) as
    walkers in lockstep, integrated in numpy: a stopped walker's slot takes the next start,
    every step of the running walkers is one ensemble call at fixed capacities (compiled once;
    from 8 walkers on, two halves take turns), and each trajectory equals ASE's integrator on
    the one-walker path, also when every pair within cutoff + skin is an edge (the GPU's
    choice: the model's envelope is zero beyond the cutoff)."""
    from nequix_fw.exploration.walkers import run_nvt_walkers, run_trajectories

    ens, jobs = walker_jobs
    if walkers == 8:  # ten trajectories in two halves of four
        jobs = jobs + [(a, t + 100, p, s + 10, i + "2") for a, t, p, s, i in jobs]
    one = run_trajectories(ens, jobs, _walker_settings(ens, jobs, thermostat, 1))
    settings = _walker_settings(ens, jobs, thermostat, walkers)
    batched, evaluate = run_nvt_walkers(ens, jobs, settings, filter_pairs=filter_pairs)
    _assert_same_trajectories(one, batched)
    assert one[2].stop_reason == "uncertainty" and 5 < one[2].stop_step <= 60
    if thermostat == "bussi":  # the conserved energy's drift, tracked the same way
        drifts = np.array(
            [(a.energy_drift, b.energy_drift) for a, b in zip(one, batched, strict=True)]
        )
        np.testing.assert_allclose(drifts[:, 0], drifts[:, 1], rtol=1e-2, atol=1e-4)
    steps = sum(t.stop_step + 1 for t in one)  # one initial call + one per step
    assert evaluate.walker_steps == steps and evaluate.calls < 0.5 * steps
    assert evaluate.capacity_changes == 1 and evaluate.n_graph == (4 if walkers == 3 else 5)


@pytest.mark.parametrize("thermostat", ["nose_hoover", "npt"])
def test_batched_ase_walkers_equal_one_trajectory_at_a_time(walker_jobs, thermostat):
    """Nosé-Hoover chains and NPT (Berendsen) keep ASE's integrators, one thread per walker;
    their force calls are batched, and the trajectories equal the one-walker path."""
    from nequix_fw.exploration.walkers import run_trajectories, run_walkers

    ens, jobs = walker_jobs
    if thermostat == "npt":  # the large cells under 1 GPa
        jobs = [(a, t, 1.0 if len(a) == 32 else None, s, i) for a, t, _, s, i in jobs]
        thermostat = "langevin"
    one = run_trajectories(ens, jobs, _walker_settings(ens, jobs, thermostat, 1))
    batched, evaluate = run_walkers(ens, jobs, _walker_settings(ens, jobs, thermostat, 3))
    _assert_same_trajectories(one, batched)
    assert evaluate.walker_steps >= sum(t.stop_step + 1 for t in one)
    assert evaluate.calls < 0.5 * evaluate.walker_steps and evaluate.capacity_changes == 1


def test_batched_walker_error_reaches_the_caller(walker_jobs):
    """A walker that fails (an element the models do not cover) raises in the caller once the
    other walkers have stopped; nothing hangs."""
    from nequix_fw.exploration.walkers import run_trajectories

    ens, _ = walker_jobs
    cu = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    ni = bulk("Ni", "fcc", a=3.52, cubic=True)
    jobs = [(cu, 300.0, None, 0, "a"), (ni, 300.0, None, 0, "b"), (cu, 600.0, None, 1, "c")]
    for thermostat in ("langevin", "nose_hoover"):
        s = ExplorationSettings(
            steps=20, check_every=5, sample_every=5, walkers=4, thermostat=thermostat
        )
        with pytest.raises(StructureError, match="contains Ni"):
            run_trajectories(ens, jobs, s)
