"""Property checks (elastic constants, phonons) on EMT, against values computed independently:
pymatgen's elastic-tensor fit and energy curvatures for the elastic constants, ASE's own
finite-displacement phonons for the frequencies."""

import sys

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from ase.calculators.emt import EMT
from ase.units import GPa

from nequix_fw.errors import NequixFWError, StructureError
from nequix_fw.properties import (
    ELASTIC_STRAIN,
    PhononCheck,
    cubic_constants,
    elastic_tensor,
    ensemble_elastic,
    ensemble_phonons,
    relative_errors,
    strained_cells,
    voigt_strain_matrix,
)

CU = bulk("Cu", "fcc", a=3.61, cubic=True)


def _emt(atoms):
    a = atoms.copy()
    a.calc = EMT()
    return a


def _stresses(cells):
    return np.array([_emt(c).get_stress() for c in cells])


def test_elastic_constants_equal_pymatgens_fit_and_the_energy_curvature():
    from pymatgen.analysis.elasticity import ElasticTensor, Strain, Stress

    cells = strained_cells(CU)
    stresses = _stresses(cells)
    c = elastic_tensor(stresses)
    # pymatgen's fit from the same strains and stresses (its independent-strain method)
    strains = [
        Strain(voigt_strain_matrix(k, s * ELASTIC_STRAIN)) for k in range(6) for s in (-1, 1)
    ]
    from ase.stress import voigt_6_to_full_3x3_stress

    eq = Stress(voigt_6_to_full_3x3_stress(_emt(CU).get_stress()) / GPa)
    pm = ElasticTensor.from_independent_strains(
        strains, [Stress(voigt_6_to_full_3x3_stress(s) / GPa) for s in stresses], eq_stress=eq
    ).voigt
    np.testing.assert_allclose(c, pm, atol=0.5)
    # energies alone (no stresses), at EMT's equilibrium (where stress-strain and energy-strain
    # constants agree): E/V = 1/2 C11 e^2 for a uniaxial strain e, 1/2 C44 g^2 for an
    # engineering shear g
    cu0 = bulk("Cu", "fcc", a=3.5898255, cubic=True)
    assert np.abs(_emt(cu0).get_stress()).max() < 1e-6
    v0, e0 = cu0.get_volume(), _emt(cu0).get_potential_energy()

    def curvature(component, h=0.004):
        e = [_emt(_strained(cu0, component, s * h)).get_potential_energy() for s in (-1, 1)]
        return (e[0] + e[1] - 2 * e0) / h**2 / v0 / GPa

    got = cubic_constants(elastic_tensor(_stresses(strained_cells(cu0))))
    assert got["C11"] == pytest.approx(curvature(0), rel=0.01)
    assert got["C44"] == pytest.approx(curvature(3), rel=0.01)
    assert got["C11"] > got["C12"] > 0 and got["C44"] > 0  # Born stability of fcc Cu


def test_a_cubic_crystal_needs_two_strains_and_gets_the_same_constants():
    from nequix_fw.properties import CUBIC_COMPONENTS, elastic_components

    full = elastic_tensor(_stresses(strained_cells(CU)))
    assert elastic_components(CU) == CUBIC_COMPONENTS
    cells = strained_cells(CU, components=CUBIC_COMPONENTS)
    cubic = elastic_tensor(_stresses(cells), components=CUBIC_COMPONENTS)
    assert len(cells) == 4
    np.testing.assert_allclose(cubic, full, atol=1e-6)
    # a cubic crystal turned about z is no longer along x, y, z: all six strains
    turned = CU.copy()
    c, s = np.cos(0.5), np.sin(0.5)
    turned.set_cell(CU.cell[:] @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]), scale_atoms=True)
    assert elastic_components(turned) == (0, 1, 2, 3, 4, 5)
    assert elastic_components(bulk("Mg", "hcp", a=3.2)) == (0, 1, 2, 3, 4, 5)


def _strained(atoms, component, strain):
    a = atoms.copy()
    a.set_cell(a.cell[:] @ (np.eye(3) + voigt_strain_matrix(component, strain)), scale_atoms=True)
    return a


def test_phonon_frequencies_equal_ases_finite_displacement_phonons(tmp_path, monkeypatch):
    from ase.phonons import Phonons

    check = PhononCheck(CU, supercell=(2, 2, 2))
    assert list(check.qpoints) == ["G", "X", "L"]
    forces = np.array([_emt(s).get_forces() for s in check.supercells()])
    got = check.frequencies(forces)
    # ASE's own phonons of the primitive cell on a 4x4x4 supercell (the same 32-atom cell as
    # 2x2x2 conventional cells is not a multiple of the primitive; 4x4x4 holds both)
    monkeypatch.chdir(tmp_path)
    prim = bulk("Cu", "fcc", a=3.61)
    ph = Phonons(prim, EMT(), supercell=(4, 4, 4), delta=0.01, name="ph")
    ph.run()
    ph.read(acoustic=True)
    thz = 1e-12 / 4.135667696e-15  # THz per eV (h)
    ref = np.sort(ph.band_structure([[0.5, 0.0, 0.5], [0.5, 0.5, 0.5]]) * thz, axis=1)
    np.testing.assert_allclose(got["X"], ref[0], rtol=0.03)
    np.testing.assert_allclose(got["L"], ref[1], rtol=0.03)
    assert max(abs(f) for f in got["G"]) < 0.05  # acoustic modes at Γ
    assert relative_errors(got["X"], ref[0], floor=0.1) == pytest.approx(
        [100 * (a - b) / b for a, b in zip(got["X"], ref[0], strict=True)]
    )
    assert relative_errors([0.01, 5.0], [0.02, 4.0], floor=0.1) == [None, 25.0]


class _Ensemble:
    """Two 'models': EMT, and EMT with its stresses and forces scaled by 1.1."""

    def predict(self, structures):
        from nequix_fw.ensemble import Prediction

        out = []
        for a in structures:
            a = _emt(a)
            f, s = a.get_forces(), a.get_stress()
            out.append(Prediction(np.zeros(2), np.stack([f, 1.1 * f]), np.stack([s, 1.1 * s])))
        return out


def test_the_ensembles_properties_are_each_models_with_their_mean_and_spread():
    ens = _Ensemble()
    el = ensemble_elastic(ens.predict, CU)
    c0 = elastic_tensor(_stresses(strained_cells(CU)))
    np.testing.assert_allclose(el["per_model"][0], c0, atol=1e-9)
    np.testing.assert_allclose(el["per_model"][1], 1.1 * c0, atol=1e-9)
    np.testing.assert_allclose(el["mean"], 1.05 * c0, atol=1e-9)
    np.testing.assert_allclose(el["std"], 0.05 * np.abs(c0), atol=1e-9)
    ph = ensemble_phonons(ens.predict, PhononCheck(CU))
    # frequencies scale with the square root of the force constants
    x = np.array(ph["X"]["mean"])
    lo, hi = x / (1 + np.sqrt(1.1)) * 2, x / (1 + np.sqrt(1.1)) * 2 * np.sqrt(1.1)
    np.testing.assert_allclose(ph["X"]["std"], (hi - lo) / 2, rtol=1e-6)


def test_a_slab_or_molecule_is_refused_and_phonopy_missing_names_the_extra(monkeypatch):
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    with pytest.raises(StructureError, match="elastic-constant check needs a periodic bulk"):
        ensemble_elastic(_Ensemble().predict, slab)
    with pytest.raises(StructureError, match="phonon check needs a periodic bulk cell, and H2O"):
        PhononCheck(molecule("H2O"))
    monkeypatch.setitem(sys.modules, "phonopy", None)
    with pytest.raises(NequixFWError, match=r"pip install 'nequix-fw\[phonons\]'"):
        PhononCheck(CU)


def test_campaign_status_shows_each_iterations_property_errors(tmp_path, capsys):
    import json

    from nequix_fw.cli import main

    its = [
        {"iteration": 0, "dataset_size": 4, "properties": None},
        {
            "iteration": 1,
            "dataset_size": 7,
            "properties": {"v0_percent": -0.41, "elastic_percent": 12.5, "phonon_percent": None},
        },
    ]
    (tmp_path / "campaign.json").write_text(json.dumps({"name": "c", "iterations": its}))
    assert main(["campaign-status", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].strip() == "properties: v0_percent -0.41, elastic_percent +12.5"
    assert sum("properties:" in line for line in lines) == 1


def test_missed_checks_and_the_structures_that_teach_them():
    from nequix_fw.exploration.properties import missed_checks, property_candidates

    tol = {"v0_percent": 0.5, "bulk_modulus_percent": 5, "elastic_percent": 10}
    assert missed_checks({"v0_percent": 0.2, "bulk_modulus_percent": -35.0}, tol) == {
        "eos": ["bulk_modulus_percent"],
        "elastic": ["elastic_percent"],  # no value (no fit, no labels): missed
    }
    ok = {"v0_percent": 0.2, "bulk_modulus_percent": 4.0, "elastic_percent": -9.0}
    assert missed_checks(ok, tol) == {} and missed_checks(None, {}) == {}
    v0 = CU.get_volume()
    eos = property_candidates(CU, "eos", 9, seed=1)
    strains = sorted(a.get_volume() / v0 - 1 for a in eos)
    assert strains[0] == pytest.approx(-0.08) and strains[-1] == pytest.approx(0.08)
    elastic = property_candidates(CU, "elastic", 8, seed=1)
    for a in elastic:  # strained within 2 % per component
        eps = np.linalg.solve(CU.cell[:], a.cell[:]) - np.eye(3)
        assert 0 < np.abs(eps).max() <= 0.02 + 1e-9
    phonons = property_candidates(CU, "phonons", 4, seed=1, supercell=[2, 2, 2])
    ref = CU.repeat((2, 2, 2))
    rms = [np.sqrt(((a.positions - ref.positions) ** 2).mean()) for a in phonons]
    assert [len(a) for a in phonons] == [32] * 4 and 0.015 < min(rms) < max(rms) < 0.1
    vacancy = property_candidates(CU, "vacancy", 4, seed=1)
    rattles = [a.info["rattle_A"] for a in vacancy]  # the check's cell less its first atom
    assert [len(a) for a in vacancy] == [len(CU) - 1] * 4 and rattles == sorted(rattles)
    assert rattles[0] == pytest.approx(0.01) and rattles[-1] == pytest.approx(0.08)
    for a in vacancy:
        shift = a.positions - CU.positions[1:]
        assert 0 < np.abs(shift).max() < 0.5 and np.allclose(a.cell[:], CU.cell[:])
    assert missed_checks({"vacancy_formation_eV": 0.2}, {"vacancy_formation_eV": 0.05}) == {
        "vacancy": ["vacancy_formation_eV"]
    }
    gens = {a.info["generator"] for a in eos + elastic + phonons + vacancy}
    assert gens == {"property:eos", "property:elastic", "property:phonons", "property:vacancy"}


def test_a_missed_tolerance_adds_its_structures_to_the_next_evaluation(model_paths, tmp_path):
    import ase.io

    from nequix_fw.campaign import CampaignLog
    from nequix_fw.campaign.stages import SystemCandidates, run_ensemble_stage
    from nequix_fw.results import read_results
    from nequix_fw.settings import EnsembleSettings

    ase.io.write(tmp_path / "pool.extxyz", CU.repeat((1, 1, 1)))
    ase.io.write(tmp_path / "cu.extxyz", CU)
    log = CampaignLog(tmp_path / "run", "p")
    log.record(
        0,
        properties={"v0_percent": 0.1, "bulk_modulus_percent": 35.0},
        reference_bulk_modulus_GPa=140.0,  # so the E-V check also runs NPT on the ensemble
    )
    spec = {
        "tolerances": {
            "v0_percent": 0.5,
            "bulk_modulus_percent": 5,
            "phonon_percent": 5,
            "vacancy_formation_eV": 0.05,
        },
        "n": 6,
        "structure": str(tmp_path / "cu.extxyz"),
        "testset": [],
        "supercell": [2, 2, 2],
        "seed": 1,
    }
    out = tmp_path / "run" / "iter_001" / "run_ensemble" / "ensemble_results.json"
    system = SystemCandidates(None, None, [tmp_path / "pool.extxyz"], out)
    record = run_ensemble_stage(log, 1, model_paths, EnsembleSettings(), [system], spec)
    npt = record["property_exploration"]["eos"]["npt"]  # up to 4 (random models may stop it)
    eos, phonons, vacancy = (
        str(out.parent / f"property_candidates_{c}.extxyz") for c in ("eos", "phonons", "vacancy")
    )
    assert record["property_exploration"] == {
        "eos": {"missed": ["bulk_modulus_percent"], "added": 6 + npt, "npt": npt, "file": eos},
        # no phonon or vacancy value recorded: missed
        "phonons": {"missed": ["phonon_percent"], "added": 6, "file": phonons},
        "vacancy": {"missed": ["vacancy_formation_eV"], "added": 6, "file": vacancy},
    }
    sources = [r["source"] for r in read_results(out)[1]]
    assert sources.count(str(tmp_path / "pool.extxyz")) == 1
    assert sources.count(eos) == 6 and sources.count(phonons) == 6
    assert sources.count(vacancy) == 6 and {len(a) for a in ase.io.read(vacancy, ":")} == {3}
    npt_file = out.parent / "property_candidates_eos_npt.extxyz"
    assert sources.count(str(npt_file)) == npt and npt_file.is_file() == (npt > 0)
    gens = {a.info["generator"] for a in ase.io.read(eos, index=":")}
    assert gens == {"property:eos"}
    # with systems, the first system explored takes them (its trust levels and quota)
    two = [
        SystemCandidates(name, None, [tmp_path / "pool.extxyz"], tmp_path / f"r_{name}.json")
        for name in ("cu", "cuau")
    ]
    spec_eos = {**spec, "tolerances": {"bulk_modulus_percent": 5}}
    record = run_ensemble_stage(log, 1, model_paths, EnsembleSettings(), two, spec_eos)
    added = record["property_exploration"]["eos"]["added"]
    assert added == 6 + record["property_exploration"]["eos"]["npt"]
    assert len(list(read_results(tmp_path / "r_cu.json")[1])) == 1 + added
    assert len(list(read_results(tmp_path / "r_cuau.json")[1])) == 1
    # every check within its tolerance: nothing added
    met = {"v0_percent": 0.1, "bulk_modulus_percent": 1.0, "phonon_percent": 2}
    log.record(1, properties={**met, "vacancy_formation_eV": -0.01})
    out2 = tmp_path / "run" / "iter_002" / "run_ensemble" / "ensemble_results.json"
    system = SystemCandidates(None, None, [tmp_path / "pool.extxyz"], out2)
    record = run_ensemble_stage(log, 2, model_paths, EnsembleSettings(), [system], spec)
    assert record["property_exploration"] == {} and record["n_evaluated"] == 1


def _checked_campaign(tmp_path, tolerances: dict, validate: dict) -> dict:
    """The settings of a campaign (an empty test set in `tmp_path`) judging `tolerances` with
    the `validate` section."""
    (tmp_path / "t.xyz").write_text("")
    campaign = {
        "directory": str(tmp_path / "r"),
        "initial_structures": "i.xyz",
        "testset": [str(tmp_path / "t.xyz")],
        "property_tolerances": tolerances,
    }
    return {"campaign": campaign, "validate": validate}


def test_the_campaign_passes_property_exploration_to_its_evaluation(tmp_path):
    import yaml

    from nequix_fw.campaign import Campaign
    from nequix_fw.workflows import campaign_sections, run_ensemble_fw

    settings = _checked_campaign(
        tmp_path,
        {"elastic_percent": 10},
        {"reference": "emt", "elastic": True, "phonon_supercell": [3, 3, 3]},
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    task = run_ensemble_fw(Campaign(campaign_sections(cfg)), 2).tasks[0]
    assert task["properties"] == {
        "tolerances": {"elastic_percent": 10.0},
        "n": 16,
        "structure": None,
        "testset": [str(tmp_path / "t.xyz")],
        "supercell": [3, 3, 3],
        "seed": 2,
    }
    settings["campaign"]["systems"] = [  # with systems too: the first explored takes them
        {"name": "cu", "initial_structures": str(tmp_path / "t.xyz")},
        {"name": "al", "initial_structures": str(tmp_path / "t.xyz")},
    ]
    cfg.write_text(yaml.safe_dump(settings))
    task = run_ensemble_fw(Campaign(campaign_sections(cfg)), 2).tasks[0]
    assert task["properties"]["tolerances"] == {"elastic_percent": 10.0}
    assert [s["name"] for s in task["systems"]] == ["cu", "al"]
    settings["campaign"]["property_exploration"] = 0  # off
    cfg.write_text(yaml.safe_dump(settings))
    assert "properties" not in run_ensemble_fw(Campaign(campaign_sections(cfg)), 2).tasks[0]


def test_npt_candidates_cross_the_ev_curve():
    """NPT on EMT copper at the pressures of -6 % ... +6 % volume (from its bulk modulus):
    compressed under pressure, expanded under tension, in the order of the pressures."""
    from ase.calculators.emt import EMT

    from nequix_fw.exploration.properties import NPT_VOLUME_STRAINS, npt_candidates

    frames = npt_candidates(CU, EMT(), 134.0, 4, seed=1)
    assert len(frames) == len(NPT_VOLUME_STRAINS) == 4
    assert {a.info["generator"] for a in frames} == {"property:eos:npt"}
    pressures = [a.info["pressure_GPa"] for a in frames]
    assert pressures == pytest.approx([8.04, 4.02, -4.02, -8.04])
    strains = [a.get_volume() / CU.get_volume() - 1 for a in frames]
    assert strains == sorted(strains)  # higher pressure, smaller cell
    assert -0.08 < strains[0] < -0.02 and 0.02 < strains[-1] < 0.15


def test_npt_candidates_on_an_ensemble_run_batched_as_one_at_a_time(trained, monkeypatch):
    """On an `Ensemble`, the four NPT trajectories run as batched walkers (one ensemble call a
    step for all four) and give the frames the ensemble's ASE calculator gives one trajectory
    after the other."""
    import nequix_fw.exploration.walkers as walkers
    from nequix_fw.ensemble import Ensemble, EnsembleCalculator
    from nequix_fw.exploration.properties import npt_candidates

    calls = []
    run = walkers.run_walkers

    def counted(*args, **kwargs):
        trajectories, evaluate = run(*args, **kwargs)
        calls.append(evaluate)
        return trajectories, evaluate

    monkeypatch.setattr(walkers, "run_walkers", counted)
    ens = Ensemble.from_specs(sorted(trained["dir"].glob("member_*.nqx")))
    cell = CU.repeat((1, 1, 2))
    one = npt_candidates(cell, EnsembleCalculator(ens), 134.0, 16, seed=3)  # the campaign's n
    assert not calls
    batched = npt_candidates(cell, ens, 134.0, 16, seed=3)
    assert len(calls) == 1 and calls[0].calls < 0.5 * calls[0].walker_steps
    assert len(batched) == len(one) > 0
    for a, b in zip(one, batched, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-4)
        np.testing.assert_allclose(a.cell[:], b.cell[:], atol=1e-5)
        assert a.info["pressure_GPa"] == b.info["pressure_GPa"]


def test_stress_derived_tolerances_without_stress_training_warn(tmp_path, caplog):
    """B0 and elastic constants are derivatives of the stress: a campaign that judges them while
    training on no stress says so when its settings are read, and is quiet once it trains on
    stresses (or judges only phonons)."""
    import yaml

    from nequix_fw.workflows import campaign_sections

    settings = _checked_campaign(
        tmp_path, {}, {"reference": "emt", "elastic": True, "phonons": True}
    )
    cfg = tmp_path / "c.yaml"
    for tolerances, weight, warned in [
        ({"bulk_modulus_percent": 5, "elastic_percent": 10}, 0, True),
        ({"bulk_modulus_percent": 5, "elastic_percent": 10}, 1000, False),
        ({"phonon_percent": 5}, 0, False),
    ]:
        settings["campaign"]["property_tolerances"] = tolerances
        settings["train_ensemble"] = {"stress_weight": weight}
        cfg.write_text(yaml.safe_dump(settings))
        caplog.clear()
        campaign_sections(cfg)
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(said) == warned
        if warned:
            assert str(cfg) in said[0] and "stress_weight is 0" in said[0]
            assert "bulk_modulus_percent and elastic_percent" in said[0]
