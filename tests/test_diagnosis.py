"""Why a property check stalls (`nequix_fw.diagnosis`), in the campaign's record, its stop
reason and `campaign-status`."""

import json
import shutil

import ase.io
import numpy as np
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from helpers import emt_labelled

from nequix_fw.diagnosis import (
    DISAGREEMENT,
    diagnose,
    fit_error,
    labelled_of_kind,
    stalled,
    worst_quantity,
)
from nequix_fw.ensemble import Ensemble
from nequix_fw.labels import labels_of
from nequix_fw.structures import Frame, structure_id

ELASTIC = {
    "elastic": {
        "constants_GPa": {
            "C11": {"model": 160.0, "model_std": 2.0, "reference": 170.0},
            "C12": {"model": 140.0, "model_std": 1.0, "reference": 110.0},
        },
        "error_percent": 27.3,
    }
}


def test_a_missed_tolerance_stalls_when_its_error_falls_by_less_than_a_tenth():
    tolerances = {"bulk_modulus_percent": 5, "elastic_percent": 10, "vacancy_formation_eV": 0.05}
    history = [
        {"bulk_modulus_percent": -14.0, "elastic_percent": 30.0, "vacancy_formation_eV": 0.3},
        {"bulk_modulus_percent": -15.0, "elastic_percent": 25.0, "vacancy_formation_eV": 0.3},
        {"bulk_modulus_percent": -13.0, "elastic_percent": 20.0, "vacancy_formation_eV": 0.3},
    ]
    # B0: 14 -> 13 % is less than a tenth, the vacancy's 0.3 eV did not move; elastic fell by
    # a third
    assert stalled(history, tolerances) == {
        "bulk_modulus_percent": [-14.0, -15.0, -13.0],
        "vacancy_formation_eV": [0.3, 0.3, 0.3],
    }
    assert stalled(history, {"no_such_check": 1}) == {}
    assert stalled(history[1:], tolerances) == {}  # two iterations only
    history[2]["bulk_modulus_percent"] = -4.0  # met
    history[1]["elastic_percent"] = None  # not computed once: no stall to see
    history[2]["vacancy_formation_eV"] = 0.2  # fell by a third
    assert stalled(history, tolerances) == {}
    assert stalled([None, *history[1:]], tolerances) == {}


def test_the_worst_quantity_and_the_diagnosis_of_each_kind_of_evidence():
    assert worst_quantity(ELASTIC, "elastic") == ("C12", 30.0, 1.0)
    assert worst_quantity(ELASTIC, "eos") is None and worst_quantity(None, "elastic") is None
    phonons = {
        "phonons": {
            "qpoints": {
                "X": {
                    "model_THz": [4.0, 6.0],
                    "reference_THz": [4.5, 6.2],
                    "model_std_THz": [0.3, 0.05],
                    "error_percent": [-11.1, -3.2],
                }
            }
        }
    }
    name, err, spread = worst_quantity(phonons, "phonons")
    assert name == "X mode 1" and np.isclose(err, -0.5) and spread == 0.3
    worst = worst_quantity(ELASTIC, "elastic")
    assert diagnose("elastic_percent", 10, 0, 0.01, worst).startswith(
        "no labels of its kind were added: set campaign.property_labels"
    )
    assert diagnose("elastic_percent", 10, 4, 0.25, worst).startswith(
        "the models do not fit the labelled cells of its kind (stress error 25.0% of their "
        "stress, above the tolerance's 10 %): raise the capacity"
    )
    assert diagnose("phonon_percent", 5, 4, 0.08, None).startswith(
        "the models do not fit the labelled cells of its kind (force error 8.0%"
    )
    assert diagnose("vacancy_formation_eV", 0.05, 3, 0.2, None) == (
        "the models do not fit the labelled cells of its kind (energy error 0.2 eV per cell, "
        "above the tolerance's 0.05 eV): raise the capacity (train_ensemble.architecture)"
    )
    assert diagnose("vacancy_formation_eV", 0.05, 3, 0.01, None).startswith(
        "the models fit the labelled cells of its kind (energy error 0.01 eV per cell) but miss"
    )
    disagreeing = ("C12", 30.0, DISAGREEMENT * 30.0)
    assert diagnose("elastic_percent", 10, 4, 0.05, disagreeing) == (
        "the ensemble disagrees on the check (C12: spread 15 against an error of +30): more "
        "labels will help"
    )
    assert diagnose("elastic_percent", 10, 4, 0.05, worst) == (
        "the models fit the labelled cells of its kind (stress error 5.0% of their stress) "
        "but miss the check: more or other cells are needed"
    )


def _eos_cells(n: int) -> list:
    """EMT-labelled Cu cells at volumes -6 .. +6 %, as the E-V check's candidates are."""
    out = []
    for s in np.linspace(-0.06, 0.06, n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True)
        a.set_cell(a.cell * (1 + s) ** (1 / 3), scale_atoms=True)
        a.rattle(0.02, seed=len(out))
        a.calc = EMT()
        a.get_potential_energy(), a.get_stress()
        a.info["structure_id"] = structure_id(a)
        out.append(a)
    return out


def test_a_stalled_property_is_diagnosed_recorded_and_named_in_the_stop(trained, tmp_path, capsys):
    """A campaign whose B0 error stays at -14 % over iterations 1-3 while its E-V cells were
    labelled: the record of iteration 3 names the stall with the labels of its kind, the
    ensemble's real stress error on them and the diagnosis; the max_iterations stop and
    `campaign-status` say it, with C12 for the elastic check."""
    from nequix_fw.campaign import Campaign
    from nequix_fw.campaign.stages import stalled_properties
    from nequix_fw.cli import main
    from nequix_fw.stopping import iteration_stop
    from nequix_fw.workflows import campaign_sections

    eos = _eos_cells(4)
    other = emt_labelled(3, seed=5)
    for a in other:
        a.info["structure_id"] = structure_id(a)
    (tmp_path / "data").mkdir()
    ase.io.write(tmp_path / "data" / "training_set.extxyz", eos + other)
    (tmp_path / "t.xyz").write_text("")
    settings = {
        "campaign": {
            "directory": str(tmp_path / "r"),
            "initial_structures": "i.xyz",
            "dataset": str(tmp_path / "data"),
            "testset": [str(tmp_path / "t.xyz")],
            "max_iterations": 3,
            "property_tolerances": {"bulk_modulus_percent": 5, "elastic_percent": 10},
        },
        "validate": {"reference": "emt", "elastic": True},
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    c = Campaign(campaign_sections(cfg))
    c.record(1, properties={"bulk_modulus_percent": -14.0, "elastic_percent": 40.0})
    c.record(2, properties={"bulk_modulus_percent": -14.5, "elastic_percent": 20.0})
    reason = "property check eos missed (bulk_modulus_percent)"
    for k, cells in ((1, eos[:2]), (3, eos[2:])):  # E-V cells labelled in iterations 1 and 3
        entries = [
            {"id": a.info["structure_id"], "selected": True, "reason": reason} for a in cells
        ]
        entries.append({"id": other[0].info["structure_id"], "selected": True, "reason": "x"})
        (c.stage_dir(k, "select")).mkdir(parents=True)
        (c.stage_dir(k, "select") / "manifest.json").write_text(json.dumps({"structures": entries}))
    members = c.stage_dir(3, "train_ensemble")
    members.mkdir(parents=True)
    for m in trained["dir"].glob("member_*.nqx"):
        shutil.copy(m, members)
    report = {
        "physics": {"v0_error_percent": 0.2, "bulk_modulus_error_percent": -14.2},
        "properties": ELASTIC,
    }
    stalls = stalled_properties(c, 3, report)
    assert set(stalls) == {"bulk_modulus_percent"}  # elastic fell from 40 to 27 %: no stall
    b0 = stalls["bulk_modulus_percent"]
    assert (b0["iterations"], b0["errors"]) == ([1, 3], [-14.0, -14.5, -14.2])
    assert (b0["labels_added"], b0["labels_of_its_kind"]) == (2, 4)  # iterations 2-3; all
    ensemble = Ensemble.from_specs(c.models(3))
    data = [labels_of(Frame(a, "eos", i)) for i, a in enumerate(eos)]
    preds = ensemble.predict([d.frame.atoms for d in data])
    label = np.concatenate([d.stress for d in data])
    mean = np.concatenate([p.stresses.mean(0) for p in preds])
    expected = np.sqrt(np.mean((mean - label) ** 2)) / np.sqrt(np.mean(label**2))
    assert np.isclose(b0["fit_error"], expected, rtol=1e-5) and b0["fit_error"] > 0
    assert b0["diagnosis"] == diagnose("bulk_modulus_percent", 5, 2, expected, None)
    assert np.isclose(fit_error(ensemble.predict, data, "eos"), b0["fit_error"], rtol=1e-5)
    energies = np.array([p.energies.mean() - d.energy for d, p in zip(data, preds, strict=True)])
    rmse = np.sqrt(np.mean(energies**2))  # the vacancy's measure: eV per cell
    assert np.isclose(fit_error(ensemble.predict, data, "vacancy"), rmse, rtol=1e-5)
    assert labelled_of_kind([c.stage_dir(1, "select") / "manifest.json"], "eos") == {
        a.info["structure_id"] for a in eos[:2]
    }
    record = c.record(
        3,
        properties={"bulk_modulus_percent": -14.2, "elastic_percent": 27.3},
        elastic_worst="C12",
        stalled=stalls,
    )
    stop = iteration_stop(c, 3, record)
    assert stop == (
        "stopped: max_iterations (3) reached, not converged: B0 -14.2 %, C12 +27.3 %; B0 "
        f"stalled (-14, -14.5, -14.2 over iterations 1-3): {b0['diagnosis']}"
    )
    assert main(["campaign-status", str(c.directory)]) == 0
    out = capsys.readouterr().out
    assert f"      B0 stalled (-14, -14.5, -14.2 over iterations 1-3): {b0['diagnosis']}" in out
