import json

import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import GPa
from helpers import emt_labelled

from nequix_fw.cli import main
from nequix_fw.dataset import read_labelled
from nequix_fw.ensemble import Ensemble
from nequix_fw.errors import StructureError
from nequix_fw.settings import ValidationSettings
from nequix_fw.validation import roc_auc, validate


@pytest.fixture(scope="module")
def report(trained, emt_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("val") / "validation_report.json"
    models = sorted(trained["dir"].glob("member_*.nqx"))
    checks = ValidationSettings(reference="emt")
    rep = validate(models, [emt_data["test"]], out, checks, error_threshold=0.3)
    return {"report": rep, "path": out, "models": models}


def test_metrics_equal_numpy_on_the_same_predictions(report, emt_data):
    rep = report["report"]
    data = read_labelled([emt_data["test"]])
    preds = Ensemble.from_specs(report["models"]).predict([d.frame.atoms for d in data])
    n = np.array([len(d.frame.atoms) for d in data])
    e_ref = np.array([d.energy for d in data])
    f_ref = np.concatenate([d.forces for d in data])
    s_ref = np.array([d.stress for d in data])
    for m, key in enumerate(rep["per_model"]):
        e_err = (np.array([p.energies[m] for p in preds]) - e_ref) / n * 1000
        f_err = np.concatenate([p.forces[m] for p in preds]) - f_ref
        s_err = (np.array([p.stresses[m] for p in preds]) - s_ref) / GPa
        got = rep["per_model"][key]
        assert got["energy_per_atom_meV"]["rmse"] == pytest.approx(np.sqrt(np.mean(e_err**2)))
        assert got["energy_per_atom_meV"]["mae"] == pytest.approx(np.mean(np.abs(e_err)))
        assert got["forces_eV_per_A"]["rmse"] == pytest.approx(np.sqrt(np.mean(f_err**2)))
        assert got["forces_eV_per_A"]["mae"] == pytest.approx(np.mean(np.abs(f_err)))
        assert got["stress_GPa"]["rmse"] == pytest.approx(np.sqrt(np.mean(s_err**2)))
        numbers = np.concatenate([d.frame.atoms.numbers for d in data])
        au = f_err[numbers == 79]
        assert got["forces_per_element_eV_per_A"]["Au"]["rmse"] == pytest.approx(
            np.sqrt(np.mean(au**2))
        )
        q90 = np.quantile(np.abs(f_err), 0.9)
        assert got["forces_eV_per_A"]["quantiles_abs"]["q90"] == pytest.approx(q90)
    mean_f = np.concatenate([p.forces.mean(0) for p in preds]) - f_ref
    assert rep["ensemble_mean"]["forces_eV_per_A"]["rmse"] == pytest.approx(
        np.sqrt(np.mean(mean_f**2))
    )
    # uncertainty quality on the same numbers
    dev = [np.sqrt(((p.forces - p.forces.mean(0)) ** 2).sum(-1).mean(0)).max() for p in preds]
    uq = rep["uncertainty"]
    np.testing.assert_allclose(uq["max_force_dev"], dev, rtol=1e-9)
    from scipy.stats import spearmanr

    rho = spearmanr(dev, uq["max_force_error"]).statistic
    assert uq["spearman_max_force_dev_vs_max_force_error"] == pytest.approx(rho)


def test_plots_and_physics_written(report):
    rep, path = report["report"], report["path"]
    assert json.loads(path.read_text())["n_structures"] == 16
    assert set(rep["plots"]) == {
        "validation_report_parity.png",
        "validation_report_per_element.png",
        "validation_report_uncertainty.png",
        "validation_report_ev.png",
    }
    import matplotlib.image

    for name in rep["plots"]:
        img = matplotlib.image.imread(path.parent / name)  # a real image with something drawn
        assert img.shape[0] > 200 and img.shape[1] > 200 and img[..., :3].std() > 0.05
    phys = rep["physics"]
    assert phys["ev_reference"]["bulk_modulus_GPa"] > 50  # EMT Cu-Au: ~100-140 GPa
    assert abs(phys["v0_error_percent"]) < 25
    rel = phys["relaxation"]
    # the models are not EMT: their minimum lies elsewhere, and on EMT's surface no lower than
    # EMT's own minimum of the same basin
    assert 0 < rel["position_rmsd_A"] < 0.5
    assert rel["reference_energy_of_model_minimum_minus_reference_minimum_eV"] > -1e-3


def test_energy_volume_and_relaxation_reproduce_known_emt_values():
    """EMT copper: a0 3.59 Å and B 134 GPa (ASE's equation-of-state tutorial); a rattled
    cell relaxes back to the ideal lattice's energy with forces under fmax."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from nequix_fw.validation import energy_volume, relaxation

    ev = energy_volume(bulk("Cu", "fcc", a=3.6), EMT(), np.linspace(-0.06, 0.06, 7))
    assert (4 * ev["v0"]) ** (1 / 3) == pytest.approx(3.59, abs=0.005)
    assert ev["bulk_modulus_GPa"] == pytest.approx(134, rel=0.02)
    ideal = bulk("Cu", "fcc", a=3.5898, cubic=True).repeat(2)
    start = ideal.copy()
    start.rattle(0.05, seed=1)
    relaxed = relaxation(start, EMT(), fmax=0.01)
    assert np.abs(relaxed.get_forces()).max() < 0.01
    ideal.calc = EMT()
    e_ideal = ideal.get_potential_energy()
    assert relaxed.get_potential_energy() == pytest.approx(e_ideal, abs=1e-3 * len(ideal))


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=40)
    pos = scores + rng.normal(scale=1.0, size=40) > 0.3
    pairs = [(s1 > s0) + 0.5 * (s1 == s0) for s1 in scores[pos] for s0 in scores[~pos]]
    assert roc_auc(scores, pos) == pytest.approx(np.mean(pairs))
    assert roc_auc(scores, np.ones(40, bool)) is None


def test_validate_cli(report, emt_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        [
            "validate",
            "--models",
            *map(str, report["models"]),
            "--testset",
            str(emt_data["test"]),
            "--output",
            str(out),
            "--no-plots",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0 and "ensemble mean on 16 structures: energy RMSE" in stdout
    assert "uncertainty: Spearman" in stdout and out.is_file()
    assert not list(tmp_path.glob("*.png"))
    # the calibration of the uncertainty is in the report, with MD stability on request
    doc = json.loads(out.read_text())
    cal = doc["uncertainty"]["calibration"]
    dev = np.array(doc["uncertainty"]["max_force_dev"])
    err = np.array(doc["uncertainty"]["max_force_error"])
    assert cal["scale"] == pytest.approx(np.exp(np.mean(np.log(err / dev))), rel=1e-9)
    assert np.mean(err <= cal["conformal_factor"] * dev) >= 0.9
    ratio = doc["uncertainty"]["uncertainty_error_ratio"]
    assert ratio == pytest.approx(np.median(dev) / np.median(err), rel=1e-9)
    code = main(
        [
            "validate",
            "--models",
            *map(str, report["models"]),
            "--testset",
            str(emt_data["test"]),
            "--output",
            str(out),
            "--no-plots",
            "--md-stability",
            "--md-temperature",
            "300",
            "--md-steps",
            "20",
        ]
    )
    stdout = capsys.readouterr().out
    md = json.loads(out.read_text())["md_stability"]
    assert code == 0 and md["n_runs"] == 4 and md["length_fs"] == 40.0
    n_ok = sum(r["stop_reason"] == "stable" for r in md["runs"])
    assert f"MD stability at 300 K: {n_ok} of 4 runs stable for 0.04 ps" in stdout


def test_testset_without_forces(report, tmp_path, capsys):
    a = emt_labelled(1, seed=2)[0]
    a.calc = SinglePointCalculator(a, energy=-1.0)
    ase.io.write(tmp_path / "noforces.extxyz", a)
    with pytest.raises(StructureError, match="noforces.extxyz frame 0: no forces label"):
        validate(report["models"], [tmp_path / "noforces.extxyz"], tmp_path / "r.json")
    bad = str(tmp_path / "noforces.extxyz")
    code = main(
        [
            "validate",
            "--models",
            *map(str, report["models"]),
            "--testset",
            bad,
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 2 and "no forces label" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_md_stability_flags_a_collapsing_trajectory():
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.morse import MorsePotential

    from nequix_fw.validation import md_stability

    cells = [bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2)) for _ in range(2)]
    s = ValidationSettings(md_stability=True, md_temperature_K=600, md_steps=200, md_n_runs=2)
    ok = md_stability(cells, EMT(), s)
    assert ok["stable_fraction"] == 1.0 and ok["length_fs"] == 400.0
    assert all(r["survived_fs"] == 400.0 for r in ok["runs"])
    assert all(r["energy_drift_eV_per_atom_ps"] < 0.05 for r in ok["runs"])
    # a pair potential with its minimum at 0.5 Å pulls the atoms together: a collapse
    bad = md_stability(
        cells, MorsePotential(epsilon=3.0, r0=0.5, rho0=2.0, rcut1=3.0, rcut2=4.0), s
    )
    assert bad["stable_fraction"] == 0.0
    assert [r["stop_reason"] for r in bad["runs"]] == ["collapsed", "collapsed"]
    assert all(0 < r["survived_fs"] < 400.0 for r in bad["runs"])


def test_validate_cli_md_stability_runs(trained, emt_data, tmp_path, capsys):
    """`validate --md-stability --md-runs N` runs N starts of the test set for --md-steps,
    with a progress bar of finished runs."""
    from nequix_fw.cli import main

    models = [str(p) for p in sorted(trained["dir"].glob("member_*.nqx"))]
    out = tmp_path / "r.json"
    code = main(
        [
            "validate",
            "--models",
            *models,
            "--testset",
            str(emt_data["test"]),
            "--output",
            str(out),
            "--no-plots",
            "--md-stability",
            "--md-temperature",
            "300",
            "--md-steps",
            "40",
            "--md-runs",
            "3",
        ]
    )
    assert code == 0
    md = json.loads(out.read_text())["md_stability"]
    assert md["n_runs"] == 3 and md["temperature_K"] == 300.0 and md["length_fs"] == 80.0
    printed = capsys.readouterr()
    assert "MD stability at 300 K" in printed.out
    assert "MD stability: 100%" in printed.err and "3/3" in printed.err  # the progress bar


def test_md_stability_of_an_ensemble_runs_as_batched_walkers(trained):
    """The ensemble's mean: every start a walker of one batched run; an energy-drift limit
    below what the runs reach stops them with that reason."""
    from ase.build import bulk

    from nequix_fw.ensemble import Ensemble
    from nequix_fw.settings import ValidationSettings
    from nequix_fw.validation import md_stability

    ens = Ensemble.from_specs(sorted(trained["dir"].glob("member_*.nqx")))
    cells = [bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1)) for _ in range(3)]
    s = ValidationSettings(
        md_stability=True,
        md_temperature_K=300,
        md_steps=100,
        md_n_runs=3,
        md_max_energy_drift_eV_per_atom_ps=10.0,
    )
    ok = md_stability(cells, ens, s)
    assert ok["n_runs"] == 3 and ok["stable_fraction"] == 1.0
    drifts = [r["energy_drift_eV_per_atom_ps"] for r in ok["runs"]]
    assert all(r["survived_fs"] == 200.0 for r in ok["runs"]) and 0 < min(drifts)
    tight = s.model_copy(update={"md_max_energy_drift_eV_per_atom_ps": 0.5 * min(drifts)})
    bad = md_stability(cells, ens, tight)
    assert [r["stop_reason"] for r in bad["runs"]] == ["energy drift"] * 3


def test_physics_checks_against_any_reference_with_vacancy():
    """The structural checks of a calculator against itself find no error; the vacancy
    formation energy of EMT copper is in its known range (about 1 eV); an alloy has none."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from nequix_fw.errors import SettingsError
    from nequix_fw.validation import physics_checks, reference_calculator

    cu = bulk("Cu", "fcc", a=3.59, cubic=True).repeat(2)
    phys = physics_checks(EMT(), cu, reference_calculator("EMT"))
    assert phys["v0_error_percent"] == pytest.approx(0, abs=1e-9)
    assert phys["bulk_modulus_error_percent"] == pytest.approx(0, abs=1e-9)
    assert phys["relaxation"]["position_rmsd_A"] == pytest.approx(0, abs=1e-9)
    vac = phys["vacancy"]
    assert vac["error_eV"] == pytest.approx(0, abs=1e-9) and 0.8 < vac["reference_eV"] < 1.4
    alloy = cu.copy()
    alloy.numbers[0] = 79
    assert physics_checks(EMT(), alloy, EMT())["vacancy"] is None
    with pytest.raises(SettingsError, match="calculator 'emt': bad parameters \\(unknown sigma"):
        reference_calculator("emt", {"sigma": 1.0})


def test_ev_check_against_a_labelled_ev_set_equals_the_calculator_check(
    report, emt_data, tmp_path, capsys
):
    """`ev-set` labels a structure at 7 volumes (any backend; EMT here) into a dataset, once: a
    rerun labels nothing again. `validate --reference-data` on that set gives the same V0 and
    B0 errors as `--reference emt` (the same cells, the same reference energies)."""
    first = ase.io.read(emt_data["test"], index=0)
    ase.io.write(tmp_path / "start.extxyz", first)
    ev = [
        "ev-set",
        "--structure",
        str(tmp_path / "start.extxyz"),
        "--to",
        str(tmp_path / "ev_set"),
        "--output",
        str(tmp_path / "ev_work"),
        "--backend",
        "ase",
        "--calculator",
        "emt",
        "--no-progress",
    ]
    assert main(ev) == 0
    assert "labelled 7 of 7 volumes with ase; 7 in" in capsys.readouterr().out
    assert main(ev) == 0  # once: the rerun reuses every label and adds nothing
    assert "(7 from an earlier run); 7 in" in capsys.readouterr().out
    models = [str(m) for m in report["models"]]
    base = ["validate", "--models", *models, "--testset", str(emt_data["test"]), "--no-plots"]
    assert main([*base, "--output", str(tmp_path / "calc.json"), "--reference", "emt"]) == 0
    assert (
        main(
            [
                *base,
                "--output",
                str(tmp_path / "data.json"),
                "--reference-data",
                str(tmp_path / "ev_set"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    calc = json.loads((tmp_path / "calc.json").read_text())["physics"]
    data = json.loads((tmp_path / "data.json").read_text())["physics"]
    assert data["reference"] == str(tmp_path / "ev_set") and data["relaxation"] is None
    for key in ("v0_error_percent", "bulk_modulus_error_percent"):  # to the file's digits
        assert data[key] == pytest.approx(calc[key], rel=1e-4)
    assert data["ev_reference"]["v0"] == pytest.approx(calc["ev_reference"]["v0"], rel=1e-7)
    assert f"against {tmp_path / 'ev_set'}: V0 error {data['v0_error_percent']:+.2f} %" in printed
    # both references at once, or data that is no E-V set: one clear error line, exit 2
    code = main(
        [
            *base,
            "--output",
            str(tmp_path / "x.json"),
            "--reference",
            "emt",
            "--reference-data",
            str(tmp_path / "ev_set"),
        ]
    )
    assert code == 2 and "exclude each other" in capsys.readouterr().err
    code = main(
        [*base, "--output", str(tmp_path / "x.json"), "--reference-data", str(emt_data["test"])]
    )
    err = capsys.readouterr().err
    assert code == 2 and "an E-V reference set is one composition at >= 5 volumes" in err
    assert not (tmp_path / "x.json").exists()


def test_an_ev_curve_without_a_minimum_has_no_fit_and_no_error():
    """An undertrained model's E-V curve without a minimum: no V0/B0 (the property is not met)
    instead of a crashed validation; a reference without one is a clear error."""
    from nequix_fw.validation import _ev_errors, birch_murnaghan

    vols = np.linspace(15, 18, 7)
    flat = birch_murnaghan(vols, -0.5 * vols)  # monotonic: no minimum
    assert flat["v0"] is None and flat["bulk_modulus_GPa"] is None and flat["fit_error"]
    good = birch_murnaghan(vols, 0.1 * (vols - 16.5) ** 2)
    assert good["v0"] == pytest.approx(16.5, rel=1e-3)
    errors = _ev_errors(flat, good, "ref")
    assert errors["v0_error_percent"] is None and errors["bulk_modulus_error_percent"] is None
    with pytest.raises(StructureError, match="E-V curve of ref: no Birch-Murnaghan fit"):
        _ev_errors(good, flat, "ref")


def test_ev_set_refuses_molecules_and_too_few_labelled_volumes(tmp_path, capsys):
    """`ev-set` on a non-periodic structure, or with fewer than 5 of its 7 volumes labelled
    (here the three compressed fcc Cu cells fall below label.min_distance_A): one error
    line naming the structure and the cause, exit 2, nothing added to the dataset."""
    from ase.build import bulk, molecule

    ase.io.write(tmp_path / "h2o.extxyz", molecule("H2O"))
    ev = [
        "ev-set",
        "--to",
        str(tmp_path / "ev_set"),
        "--output",
        str(tmp_path / "w"),
        "--backend",
        "ase",
        "--calculator",
        "emt",
        "--no-progress",
    ]
    assert main([*ev, "--structure", str(tmp_path / "h2o.extxyz")]) == 2
    assert "H2O: an E-V set needs a periodic cell" in capsys.readouterr().err
    cu = bulk("Cu", "fcc", a=3.61, cubic=True)  # nearest neighbours 2.553 Å
    ase.io.write(tmp_path / "cu.extxyz", cu)
    assert main([*ev, "--structure", str(tmp_path / "cu.extxyz"), "--min-distance", "2.545"]) == 2
    *warnings, error = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: E-V set of Cu4: 4 of 7 volumes labelled (>= 5 needed)")
    assert len(warnings) == 3 and all("min interatomic distance" in w for w in warnings)
    assert not (tmp_path / "ev_set").exists()


def test_elastic_and_phonon_checks_against_the_reference(trained, emt_data, tmp_path, capsys):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from nequix_fw.campaign.stages import _property_errors
    from nequix_fw.properties import (
        PhononCheck,
        cubic_constants,
        elastic_tensor,
        ensemble_elastic,
        ensemble_phonons,
        strained_cells,
    )

    cu = bulk("Cu", "fcc", a=3.61, cubic=True)
    ase.io.write(tmp_path / "cu.extxyz", cu)
    models = [str(m) for m in sorted(trained["dir"].glob("member_*.nqx"))]
    code = main(
        [
            "validate",
            "--models",
            *models,
            "--testset",
            str(emt_data["test"]),
            "--output",
            str(tmp_path / "v.json"),
            "--reference",
            "emt",
            "--ev-structure",
            str(tmp_path / "cu.extxyz"),
            "--elastic",
            "--phonons",
            "--no-plots",
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0 and "elastic constants (GPa" in out and "phonons (THz" in out
    # a = 3.61 Å is 1.7 % in volume off EMT's own V0: said, with the scale that fixes it
    assert "off the reference's V0 of 11.5" in captured.err and "lattice x 0.99" in captured.err
    props = json.loads((tmp_path / "v.json").read_text())["properties"]
    # the reference side, computed here with EMT directly
    stresses = []
    for a in strained_cells(cu):
        a.calc = EMT()
        stresses.append(a.get_stress())
    ref = cubic_constants(elastic_tensor(np.array(stresses)))
    consts = props["elastic"]["constants_GPa"]
    assert set(consts) == {"C11", "C12", "C44"} and props["elastic"]["cubic"]
    for name, value in ref.items():  # the check strains xx and yz only (cubic): the same
        assert consts[name]["reference"] == pytest.approx(value, rel=1e-6)
    # the model side: each member's constants, their mean and spread
    ens = Ensemble.from_specs(models)
    mine = cubic_constants(ensemble_elastic(ens.predict, cu, components=(0, 3))["mean"])
    for name, value in mine.items():
        assert consts[name]["model"] == pytest.approx(value, rel=1e-5)
        err = 100 * (value - ref[name]) / ref[name]
        assert consts[name]["error_percent"] == pytest.approx(err, rel=1e-5)
    worst = max((v["error_percent"] for v in consts.values()), key=abs)  # with its sign
    assert props["elastic"]["error_percent"] == pytest.approx(worst)
    check = PhononCheck(cu)
    forces = []
    for a in check.supercells():
        a.calc = EMT()
        forces.append(a.get_forces())
    ref_f = check.frequencies(np.array(forces))
    model_f = ensemble_phonons(ens.predict, PhononCheck(cu))
    for q in ("G", "X", "L"):
        np.testing.assert_allclose(props["phonons"]["qpoints"][q]["reference_THz"], ref_f[q])
        np.testing.assert_allclose(props["phonons"]["qpoints"][q]["model_THz"], model_f[q]["mean"])
    assert props["phonons"]["qpoints"]["G"]["error_percent"] == [None, None, None]  # acoustic
    points = props["phonons"]["qpoints"].values()
    errs = [e for p in points for e in p["error_percent"] if e is not None]
    assert props["phonons"]["error_percent"] == max(errs, key=abs)  # with its sign
    # what the campaign records, by tolerance name
    errors = _property_errors(None, props)
    assert errors == {
        "elastic_percent": props["elastic"]["error_percent"],
        "phonon_percent": props["phonons"]["error_percent"],
    }


def test_elastic_and_phonon_checks_against_a_backends_labels(trained, emt_data, tmp_path):
    """The campaign's way (validate.reference: label): the checks' cells labelled once by a
    labelling backend (here ASE's EMT through the 'ase' backend) give the same as the EMT
    calculator; a cell whose labelling failed leaves the property unmet, with the reason."""
    from ase.build import bulk

    from nequix_fw.campaign.stages import _property_errors
    from nequix_fw.labelling import make_backend
    from nequix_fw.labelling.property_set import label_cells
    from nequix_fw.settings import LabellingSettings

    cu = bulk("Cu", "fcc", a=3.61, cubic=True)
    ase.io.write(tmp_path / "cu.extxyz", cu)
    models = sorted(trained["dir"].glob("member_*.nqx"))
    checks = dict(structure=tmp_path / "cu.extxyz", elastic=True, phonons=True)
    by_calc = validate(
        models,
        [emt_data["test"]],
        tmp_path / "a.json",
        ValidationSettings(reference="emt", **checks),
    )["properties"]
    settings = LabellingSettings(backend="ase", calculator="emt")
    asked = []

    def label(check, cells):
        asked.append((check, len(cells)))
        return label_cells(cells, tmp_path / f"ref_{check}", make_backend(settings), settings)

    by_labels = validate(
        models,
        [emt_data["test"]],
        tmp_path / "b.json",
        ValidationSettings(reference="emt", **checks),
        label_reference=label,
    )["properties"]
    assert asked == [("elastic", 4), ("phonons", 1)]  # cubic: xx and yz, ± each
    for name, c in by_calc["elastic"]["constants_GPa"].items():
        got = by_labels["elastic"]["constants_GPa"][name]
        assert got["reference"] == pytest.approx(c["reference"], rel=1e-6)
        assert got["model"] == pytest.approx(c["model"], rel=1e-6)
    for q, point in by_calc["phonons"]["qpoints"].items():
        np.testing.assert_allclose(
            by_labels["phonons"]["qpoints"][q]["reference_THz"], point["reference_THz"], atol=0.01
        )  # the labels' round trip through extxyz: Γ's acoustic modes are 0 within 0.002 THz
    assert len(list((tmp_path / "ref_elastic" / "labels").glob("*/task.json"))) == 4

    def one_failed(check, cells):
        done = label(check, cells)
        return [None, *done[1:]]

    failed = validate(
        models,
        [emt_data["test"]],
        tmp_path / "c.json",
        ValidationSettings(reference="emt", **checks),
        label_reference=one_failed,
    )["properties"]
    assert failed["elastic"]["error"] == "3 of 4 strained cells labelled; the fit needs all of them"
    assert failed["phonons"]["error"].startswith("0 of 1 displaced supercells labelled")
    assert _property_errors(None, failed) == {"elastic_percent": None, "phonon_percent": None}


def test_a_check_structure_off_the_references_equilibrium_is_warned_about(caplog):
    """The elastic and phonon checks at a strained state: a warning naming the structure, the
    reference's V0 and the scale to it; none within 1 % of V0, or without an E-V fit."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from nequix_fw.validation import energy_volume, warn_off_equilibrium

    cu = bulk("Cu", "fcc", a=3.61, cubic=True)
    physics = {"ev_reference": energy_volume(cu, EMT())}
    v0 = physics["ev_reference"]["v0"]
    with caplog.at_level("WARNING", logger="nequix_fw.validation"):
        off = warn_off_equilibrium(cu, physics, "cu.vasp")
        assert off == pytest.approx(100 * (cu.get_volume() / 4 - v0) / v0)
        assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith(
            f"cu.vasp: {cu.get_volume() / 4:.4g} Å³/atom, {off:+.1f} % off the reference's V0 "
            f"of {v0:.4g} Å³/atom"
        )
        caplog.clear()
        at_v0 = cu.copy()
        at_v0.set_cell(cu.cell * (v0 * 4 / cu.get_volume()) ** (1 / 3), scale_atoms=True)
        assert abs(warn_off_equilibrium(at_v0, physics, "cu.vasp")) < 1e-6
        assert warn_off_equilibrium(cu, {"ev_reference": {"v0": None}}, "cu.vasp") is None
        assert not caplog.records
