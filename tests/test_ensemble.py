import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.units import GPa

from nequix_fw.ensemble import Ensemble, EnsembleCalculator
from nequix_fw.errors import ModelError, StructureError
from nequix_fw.graphs import bucket_size, pack_batches
from nequix_fw.models import load_model, new_model, save_model
from nequix_fw.settings import EnsembleSettings
from nequix_fw.structures import Frame


@pytest.fixture(scope="module")
def ensemble(model_paths):
    return Ensemble.from_specs(model_paths)


def _reference(model_path, atoms):
    """Energy, forces, stress from nequix's own NequixCalculator."""
    a = atoms.copy()
    a.calc = load_model(model_path).calculator()
    stress = a.get_stress() if a.pbc.all() else None
    return a.get_potential_energy(), a.get_forces(), stress


def test_one_model_engine_equals_nequix_calculator(model_paths, cells):
    single = Ensemble.from_specs(model_paths[:1])
    preds = single.predict(cells)  # batched: several structures per padded batch
    for atoms, pred in zip(cells, preds, strict=True):
        e, f, s = _reference(model_paths[0], atoms)
        assert pred.energies[0] == pytest.approx(e, abs=1e-5)
        np.testing.assert_allclose(pred.forces[0], f, atol=1e-5)
        np.testing.assert_allclose(pred.stresses[0], s, atol=1e-6)


def test_members_are_ordered_and_stacked(ensemble, model_paths, cells):
    assert len(ensemble) == 3 and ensemble.n_architectures == 1
    preds = ensemble.predict(cells[:4])
    for m, path in enumerate(model_paths):
        e, f, _ = _reference(path, cells[2])
        assert preds[2].energies[m] == pytest.approx(e, abs=1e-5)
        np.testing.assert_allclose(preds[2].forces[m], f, atol=1e-5)
    # members genuinely disagree (different seeds)
    assert np.ptp(preds[0].energies) > 1e-3


def test_batched_equals_one_at_a_time(ensemble, cells):
    batched = ensemble.predict(cells)
    for atoms, pred in zip(cells, batched, strict=True):
        alone = ensemble.predict([atoms])[0]
        np.testing.assert_allclose(pred.energies, alone.energies, atol=1e-5)
        np.testing.assert_allclose(pred.forces, alone.forces, atol=1e-5)


def test_metrics_equal_numpy(ensemble, cells):
    recs = list(ensemble.evaluate(Frame(a, "mem", i) for i, a in enumerate(cells)))
    for rec in recs:
        p = rec.prediction
        f = p.forces
        per_atom = np.sqrt(((f - f.mean(0)) ** 2).sum(-1).mean(0))
        assert rec.metrics["max_force_dev"] == pytest.approx(per_atom.max(), rel=1e-9)
        assert rec.metrics["mean_force_dev"] == pytest.approx(per_atom.mean(), rel=1e-9)
        n = f.shape[1]
        assert rec.metrics["energy_std_per_atom"] == pytest.approx(np.std(p.energies) / n)
        assert rec.metrics["stress_std"] == pytest.approx((p.stresses / GPa).std(0).max())
        assert rec.status == "ok" and rec.metrics["max_force_dev"] > 0


def test_mixed_architectures_slower_path_same_numbers(model_paths, tmp_path, cells):
    module, config = new_model([29, 79], seed=7, hidden_irreps="8x0e + 4x1o", n_layers=1)
    other = save_model(tmp_path / "other.nqx", module, config)
    ens = Ensemble.from_specs([model_paths[0], other, model_paths[1]])
    assert ens.n_architectures == 2
    pred = ens.predict(cells[:3])[1]
    for m, path in enumerate([model_paths[0], other, model_paths[1]]):
        e, f, _ = _reference(path, cells[1])
        assert pred.energies[m] == pytest.approx(e, abs=1e-5)
        np.testing.assert_allclose(pred.forces[m], f, atol=1e-5)


def test_torch_backend_matches_jax(model_paths, cells):
    fast = Ensemble.from_specs(model_paths[:2]).predict(cells[:3])
    slow = Ensemble.from_specs(model_paths[:2], EnsembleSettings(backend="torch"))
    for atoms, a in zip(cells[:3], fast, strict=True):
        b = slow.predict([atoms])[0]
        np.testing.assert_allclose(a.energies, b.energies, atol=1e-5)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)
        np.testing.assert_allclose(a.stresses, b.stresses, atol=1e-6)


def test_molecules_and_periodic_cells_in_one_batch(ensemble, model_paths):
    mol = Atoms("Cu3", positions=[[0, 0, 0], [2.4, 0, 0], [1.2, 2.0, 0.3]])
    cell = bulk("Cu", "fcc", a=3.6)
    preds = ensemble.predict([mol, cell])
    assert preds[0].stresses is None and preds[1].stresses.shape == (3, 6)
    e, f, _ = _reference(model_paths[1], mol)
    assert preds[0].energies[1] == pytest.approx(e, abs=1e-5)
    np.testing.assert_allclose(preds[0].forces[1], f, atol=1e-5)


def test_ensemble_calculator_gives_mean_and_uncertainty(ensemble, cells):
    atoms = cells[1].copy()
    atoms.calc = EnsembleCalculator(ensemble)
    pred = ensemble.predict([cells[1]])[0]
    assert atoms.get_potential_energy() == pytest.approx(pred.energies.mean(), abs=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), pred.forces.mean(0), atol=1e-6)
    np.testing.assert_allclose(atoms.get_stress(), pred.stresses.mean(0), atol=1e-7)
    r = atoms.calc.results
    assert r["max_force_dev"] > 0 and len(r["energies"]) == 3
    # usable for dynamics: a few velocity-Verlet steps move the atoms and conserve energy roughly
    from ase.md.verlet import VelocityVerlet

    e0 = atoms.get_total_energy()
    VelocityVerlet(atoms, timestep=0.5).run(5)
    assert atoms.get_total_energy() == pytest.approx(e0, abs=0.05)


def test_uncovered_element_is_named(ensemble):
    with pytest.raises(StructureError, match=r"x.xyz frame 2: contains Rn, which the models"):
        ensemble.check_covered(Atoms("CuRn", positions=[[0, 0, 0], [3, 0, 0]]), "x.xyz frame 2")


def test_different_elements_or_cutoffs_refused(model_paths, tmp_path):
    m, c = new_model([29, 46], seed=0)
    pd = save_model(tmp_path / "cupd.nqx", m, c)
    msg = rf"models {model_paths[0]} and {pd} cover different elements \(differ in Pd, Au\)"
    with pytest.raises(ModelError, match=msg):
        Ensemble.from_specs([model_paths[0], pd])
    m, c = new_model([29, 79], seed=0, cutoff=4.0)
    short = save_model(tmp_path / "short.nqx", m, c)
    with pytest.raises(ModelError, match=r"different cutoffs \(5.0 Å vs 4.0 Å\)"):
        Ensemble.from_specs([model_paths[0], short])


def test_non_finite_prediction_flags_structure_and_continues(model_paths, tmp_path, cells):
    m, c = new_model([29, 79], seed=0, atom_energies={29: -3.7, 79: float("nan")})
    nan_model = save_model(tmp_path / "nan_au.nqx", m, c)
    ens = Ensemble.from_specs([model_paths[1], nan_model])
    recs = list(ens.evaluate(Frame(a, "mem", i) for i, a in enumerate(cells[:4])))
    has_au = [79 in a.numbers for a in cells[:4]]
    assert [r.status == "failed" for r in recs] == has_au
    failed = recs[has_au.index(True)]
    assert failed.error == "non-finite prediction from nan_au"
    assert failed.metrics["max_force_dev"] is None
    assert all(r.metrics["max_force_dev"] > 0 for r, au in zip(recs, has_au, strict=True) if not au)


def test_bucket_sizes_bound_padding_and_shapes():
    sizes = {bucket_size(n, 64) for n in range(1, 20000)}
    assert len(sizes) < 40  # few shapes -> few compilations
    for n in (1, 63, 64, 65, 100, 1000, 5000, 16385):
        b = bucket_size(n, 64)
        assert b >= n and (b <= 1.25 * n or b == 64)


def test_pack_batches_balanced_and_complete():
    rng = np.random.default_rng(0)
    edges = list(rng.integers(100, 3000, size=57))
    batches = pack_batches(edges, max_edges=8000, max_graphs=16)
    assert sorted(i for b in batches for i in b) == list(range(57))
    loads = [sum(edges[i] for i in b) for b in batches]
    assert all(len(b) <= 16 for b in batches)
    assert max(loads) - min(loads) <= max(edges)
    assert len({bucket_size(x, 64) for x in loads}) <= 2


@pytest.mark.slow
def test_foundation_model_engine_equals_calculator(mp1):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    small = bulk("Cu", "fcc", a=3.6, cubic=True)
    small.rattle(0.05, seed=2)
    ens = Ensemble.from_specs([mp1, mp1])
    preds = ens.predict([atoms, small])
    e, f, s = _reference(mp1, atoms)
    assert preds[0].energies[0] == pytest.approx(e, abs=1e-4)  # float32 total of ~-130 eV
    assert abs(preds[0].energies[0] - e) / len(atoms) < 1e-5
    np.testing.assert_allclose(preds[0].forces[0], f, atol=1e-4)
    np.testing.assert_allclose(preds[0].stresses[0], s, atol=1e-6)
    assert np.all(preds[0].energies == preds[0].energies[0])  # identical members agree
