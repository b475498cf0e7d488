"""Validation of models against labelled reference data: errors, uncertainty quality, physics.

Units in the report: energy errors in meV/atom, forces in eV/Å, stress in GPa, volumes in
Å³/atom, bulk moduli in GPa.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.eos import EquationOfState
from ase.io import read
from ase.optimize import BFGS
from ase.units import GPa
from matplotlib.figure import Figure
from scipy.stats import rankdata, spearmanr
from tqdm import tqdm

from nequix_fw.dataset import DatasetStore, read_labelled
from nequix_fw.ensemble import Ensemble, EnsembleCalculator, Prediction
from nequix_fw.errors import NequixFWError, SettingsError, StructureError
from nequix_fw.exploration.md import run_md
from nequix_fw.exploration.walkers import run_trajectories
from nequix_fw.forgetting import forgetting_report
from nequix_fw.labelling.ase_calc import calculator_class, check_parameters
from nequix_fw.labels import Labelled
from nequix_fw.properties import (
    PhononCheck,
    elastic_check,
    elastic_components,
    phonon_check,
    strained_cells,
)
from nequix_fw.schemas import ValidationReport
from nequix_fw.settings import (
    LABEL_REFERENCE,
    EnsembleSettings,
    ExplorationSettings,
    ValidationSettings,
)
from nequix_fw.structures import EV_STRAINS, atomic_path, check_output, iter_frames, scaled_cells
from nequix_fw.uncertainty import atomic_force_deviation, calibrate, uncertainty_error_ratio

logger = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.95, 0.99)


def _err_stats(err: np.ndarray) -> dict:
    err = np.asarray(err, dtype=np.float64).ravel()
    if err.size == 0:
        return {"rmse": None, "mae": None, "n": 0}
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "n": int(err.size),
        "quantiles_abs": {
            f"q{int(q * 100)}": float(np.quantile(np.abs(err), q)) for q in QUANTILES
        },
    }


def error_metrics(data: Sequence[Labelled], energies, forces, stresses) -> dict:
    """Errors of one set of predictions for `data`: energies (n,) eV, per structure forces
    (N, 3) eV/Å and stresses (6,) eV/Å³ (or None)."""
    n_atoms = np.array([len(d.frame.atoms) for d in data])
    e_err = (np.asarray(energies) - np.array([d.energy for d in data])) / n_atoms * 1000.0
    f_err = [f - d.forces for f, d in zip(forces, data, strict=True)]
    s_err = [
        (s - d.stress) / GPa
        for s, d in zip(stresses, data, strict=True)
        if s is not None and d.stress is not None
    ]
    numbers = np.concatenate([d.frame.atoms.numbers for d in data])
    f_all = np.concatenate(f_err)
    per_element = {
        chemical_symbols[z]: _err_stats(f_all[numbers == z]) for z in sorted(set(numbers.tolist()))
    }
    return {
        "energy_per_atom_meV": _err_stats(e_err),
        "forces_eV_per_A": _err_stats(f_all),
        "stress_GPa": _err_stats(np.array(s_err)),
        "forces_per_element_eV_per_A": per_element,
    }


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied ranks); None with one class only."""

    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def uncertainty_quality(
    data: Sequence[Labelled], preds: Sequence[Prediction], threshold: float
) -> dict:
    """How well `max_force_dev` ranks the true max force error of the ensemble mean."""

    dev = np.array([atomic_force_deviation(p.forces).max() for p in preds])
    err = np.array(
        [
            np.linalg.norm(p.forces.mean(0) - d.forces, axis=1).max()
            for p, d in zip(preds, data, strict=True)
        ]
    )
    rho = spearmanr(dev, err).statistic if len(dev) > 2 else np.nan
    try:
        calibration = calibrate(dev, err)
    except ValueError:  # too few structures with a spread
        calibration = None
    return {
        "n_structures": len(dev),
        "calibration": calibration,
        "spearman_max_force_dev_vs_max_force_error": None if np.isnan(rho) else float(rho),
        "roc_auc": roc_auc(dev, err > threshold),
        "error_threshold_eV_per_A": threshold,
        "n_above_threshold": int((err > threshold).sum()),
        "uncertainty_error_ratio": uncertainty_error_ratio(dev, err),
        "max_force_dev": dev.tolist(),
        "max_force_error": err.tolist(),
    }


# -- physics checks -------------------------------------------------------------------------------


def reference_calculator(name: str, params: dict | None = None):
    """An ASE calculator by name or 'module:Class', with keywords `params` (EMT is the cheap
    reference available everywhere)."""
    cls = calculator_class(name)
    check_parameters(cls, params or {}, name)
    try:
        return cls(**(params or {}))
    except TypeError as exc:
        raise SettingsError(f"calculator {name!r}: bad parameters ({exc})") from None


def birch_murnaghan(volumes: Sequence[float], energies: Sequence[float]) -> dict:
    """Birch-Murnaghan fit of per-atom volumes (Å³) and energies (eV): V0, E0, B (GPa); all
    None (and `fit_error` says why) for a curve the fit cannot follow, e.g. one without a
    minimum (an undertrained model)."""
    out = {"volumes": list(volumes), "energies": list(energies)}
    try:
        v0, e0, b = EquationOfState(out["volumes"], out["energies"], eos="birchmurnaghan").fit()
    except (RuntimeError, ValueError) as exc:
        why = str(exc)
    else:
        # a minimum up to half the sampled span outside it is extrapolated, farther is none
        lo, hi = min(out["volumes"]), max(out["volumes"])
        lo, hi = lo - (hi - lo) / 2, hi + (hi - lo) / 2
        if np.isfinite([v0, e0, b]).all() and b > 0 and lo <= v0 <= hi:
            return {**out, "v0": float(v0), "e0": float(e0), "bulk_modulus_GPa": float(b / GPa)}
        why = f"no minimum between {lo:.4g} and {hi:.4g} Å³/atom (fit: V0 {v0:.4g}, B {b:.3g})"
    return {**out, "v0": None, "e0": None, "bulk_modulus_GPa": None, "fit_error": why}


def energy_volume(atoms: Atoms, calc, strains: Sequence[float] = EV_STRAINS) -> dict:
    """E-V curve by isotropic scaling; Birch-Murnaghan fit (V0 in Å³/atom, B in GPa)."""
    vols, ens = [], []
    for a in scaled_cells(atoms, strains):
        a.calc = calc
        vols.append(a.get_volume() / len(a))
        ens.append(a.get_potential_energy() / len(a))
    return birch_murnaghan(vols, ens)


def _ev_errors(ev_m: dict, ev_r: dict, reference: str) -> dict:
    """V0 and B0 errors (%) of the model's E-V fit (None where it failed) against the
    reference's, which must fit."""
    if ev_r["v0"] is None:
        raise StructureError(
            f"E-V curve of {reference}: no Birch-Murnaghan fit ({ev_r['fit_error']}); is the "
            "structure near its equilibrium volume (the curve spans -6..+6 %)?"
        )

    def err(key):
        return None if ev_m[key] is None else 100 * (ev_m[key] - ev_r[key]) / ev_r[key]

    return {
        "ev_model": ev_m,
        "ev_reference": ev_r,
        "v0_error_percent": err("v0"),
        "bulk_modulus_error_percent": err("bulk_modulus_GPa"),
    }


def ev_checks_against_labels(calc, data: Sequence[Labelled], where: str) -> dict:
    """The E-V check against labelled reference data (`where`: its name in the report): one
    composition at several volumes, e.g. an E-V set labelled with VASP or CP2K. The model's
    curve is computed on the same cells; both are fitted (Birch-Murnaghan)."""
    formulas = {d.frame.atoms.get_chemical_formula(empirical=True) for d in data}
    volumes = sorted({round(d.frame.atoms.get_volume() / len(d.frame.atoms), 6) for d in data})
    if len(formulas) != 1 or len(volumes) < 5:
        raise StructureError(
            f"{where}: an E-V reference set is one composition at >= 5 volumes; found "
            f"{', '.join(sorted(formulas))} at {len(volumes)} volume(s) in {len(data)} structures"
        )
    data = sorted(data, key=lambda d: d.frame.atoms.get_volume() / len(d.frame.atoms))
    vols = [d.frame.atoms.get_volume() / len(d.frame.atoms) for d in data]
    ref = [d.energy / len(d.frame.atoms) for d in data]
    mine = []
    for d in data:
        a = Atoms(
            d.frame.atoms.numbers,
            d.frame.atoms.positions,
            cell=d.frame.atoms.cell,
            pbc=d.frame.atoms.pbc,
            calculator=calc,
        )
        mine.append(a.get_potential_energy() / len(a))
    return {
        "reference": where,
        "formula": data[0].frame.atoms.get_chemical_formula(),
        **_ev_errors(birch_murnaghan(vols, mine), birch_murnaghan(vols, ref), where),
        "relaxation": None,
        "vacancy": None,
    }


def relaxation(atoms: Atoms, calc, fmax: float = 0.02, steps: int = 200) -> Atoms:
    a = atoms.copy()
    a.calc = calc
    BFGS(a, logfile=None).run(fmax=fmax, steps=steps)
    return a


def vacancy_formation_energy(atoms: Atoms, calc) -> float:
    """E(N-1) - (N-1)/N E(N) (eV) of an elemental periodic cell, both with relaxed positions at
    the cell's volume (the first atom removed)."""
    perfect = relaxation(atoms, calc)
    vacancy = perfect.copy()
    del vacancy[0]
    n = len(perfect)
    return float(
        relaxation(vacancy, calc).get_potential_energy()
        - (n - 1) / n * perfect.get_potential_energy()
    )


def physics_checks(calc, structure: Atoms, reference) -> dict:
    """E-V curve, relaxation and (elemental periodic cells) vacancy formation energy of
    `structure` with `calc` (e.g. an `EnsembleCalculator` of the ensemble mean) and with the
    `reference` ASE calculator; errors relative to the reference."""
    ev_m, ev_r = energy_volume(structure, calc), energy_volume(structure, reference)
    start = structure.copy()
    start.rattle(0.05, seed=0)
    rel_m, rel_r = relaxation(start, calc), relaxation(start, reference)
    # compare relaxed geometries on the reference's energy surface
    e_mine_on_ref = float(Atoms(rel_m, calculator=reference).get_potential_energy())
    disp = rel_m.positions - rel_r.positions
    out = {
        "reference": type(reference).__name__,
        "formula": structure.get_chemical_formula(),
        **_ev_errors(ev_m, ev_r, type(reference).__name__),
        "relaxation": {
            "reference_energy_of_model_minimum_minus_reference_minimum_eV": e_mine_on_ref
            - float(rel_r.get_potential_energy()),
            "position_rmsd_A": float(np.sqrt((disp**2).sum(1).mean())),
        },
        "vacancy": None,
    }
    if structure.pbc.all() and len(set(structure.numbers)) == 1 and len(structure) > 1:
        e_m = vacancy_formation_energy(structure, calc)
        e_r = vacancy_formation_energy(structure, reference)
        out["vacancy"] = {"formation_energy_eV": e_m, "reference_eV": e_r, "error_eV": e_m - e_r}
    return out


_REASONS = {
    "completed": "stable",
    "min_distance": "collapsed",
    "temperature": "temperature runaway",
    "energy_drift": "energy drift",
    "non-finite": "non-finite",
}


def md_stability(
    structures: Sequence[Atoms], model, settings: ValidationSettings, progress: bool = False
) -> dict:
    """NVT runs (Bussi) of `model` from each structure: which stay physical, and for how long.
    `model` is an `Ensemble` (its mean; the runs go as batched walkers, one ensemble call a
    step for all of them) or any ASE calculator (one run after the other). A run stops when
    atoms come closer than `md_min_distance_A` ("collapsed"), the temperature runs away, forces
    or energies are not finite, or the conserved energy (potential + kinetic - what the
    thermostat exchanged) drifts by more than
    `md_max_energy_drift_eV_per_atom_ps` (Bussi et al., J. Chem. Phys. 126, 014101 (2007)).
    `progress`: a bar of finished runs."""

    s = settings
    starts = list(structures[: s.md_n_runs])
    md = ExplorationSettings(
        temperatures_K=[s.md_temperature_K],
        steps=s.md_steps,
        timestep_fs=s.md_timestep_fs,
        thermostat="bussi",
        taut_fs=100.0,
        check_every=s.md_check_every,
        sample_every=s.md_check_every * max(1, s.md_steps // s.md_check_every),
        stop_force_dev=None,
        stop_min_distance_A=s.md_min_distance_A,
        max_temperature_factor=s.md_max_temperature_factor,
        max_energy_drift_eV_per_atom_ps=s.md_max_energy_drift_eV_per_atom_ps,
        walkers=max(1, len(starts)),
    )
    jobs = [(a, s.md_temperature_K, None, i, f"md-stability-{i}") for i, a in enumerate(starts)]
    with tqdm(total=len(jobs), desc="MD stability", unit="run", disable=not progress) as bar:
        if isinstance(model, Ensemble):
            trajs = run_trajectories(model, jobs, md, bar.update)
        else:
            trajs = []
            for a, t, p, seed, pid in jobs:
                trajs.append(run_md(a, model, t, md, p, seed, pid))
                bar.update()
    runs = [
        {
            "formula": a.get_chemical_formula(),
            "stop_reason": _REASONS[t.stop_reason],
            "survived_fs": t.survived_step * s.md_timestep_fs,
            "energy_drift_eV_per_atom_ps": t.energy_drift,
        }
        for a, t in zip(starts, trajs, strict=True)
    ]
    stable = sum(r["stop_reason"] == "stable" for r in runs)
    return {
        "temperature_K": s.md_temperature_K,
        "length_fs": s.md_steps * s.md_timestep_fs,
        "n_runs": len(runs),
        "stable_fraction": stable / len(runs) if runs else None,
        "runs": runs,
    }


# -- plots ---------------------------------------------------------------------------------------


def property_checks(
    predict,
    structure: Atoms,
    reference,
    validation: ValidationSettings,
    label: Callable[[str, list[Atoms]], list[Atoms | None]] | None = None,
) -> dict:
    """The elastic and phonon checks `validation` asks for, of the ensemble (`predict`) against
    the `reference` ASE calculator on `structure`, or against the labels that `label(check,
    cells)` gives (e.g. the campaign's backend's; None where one failed). A check whose cells
    are not all labelled records why, and no error (the property is then not met)."""

    def labelled(check: str, cells: list[Atoms]) -> list[Atoms | None]:
        if label is not None:
            return label(check, cells)
        for a in cells:
            a.calc = reference
        return cells

    def missing(done: list, what: str) -> dict | None:
        n = sum(a is None for a in done)
        if not n:
            return None
        why = f"{len(done) - n} of {len(done)} {what} labelled; the fit needs all of them"
        return {"formula": structure.get_chemical_formula(), "error": why, "error_percent": None}

    out = {"reference": LABEL_REFERENCE if label is not None else type(reference).__name__}
    if validation.elastic:
        components = elastic_components(structure)
        done = labelled("elastic", strained_cells(structure, components=components))
        out["elastic"] = missing(done, "strained cells") or elastic_check(
            predict, structure, np.array([a.get_stress() for a in done])
        )
    if validation.phonons:
        check = PhononCheck(
            structure, validation.phonon_supercell, qpoints=validation.phonon_qpoints
        )
        done = labelled("phonons", check.supercells())
        out["phonons"] = missing(done, "displaced supercells") or phonon_check(
            predict, check, np.array([a.get_forces() for a in done])
        )
    return out


def _plots(report: dict, data, mean_e, mean_f, prefix: Path) -> list[str]:
    files = []

    def save(fig, name):
        path = prefix.parent / f"{prefix.name}_{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        files.append(path.name)

    n_atoms = np.array([len(d.frame.atoms) for d in data])
    ref_e = np.array([d.energy for d in data]) / n_atoms
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots(1, 2)
    ax[0].scatter(ref_e, np.asarray(mean_e) / n_atoms, s=8)
    lims = [min(ref_e.min(), (mean_e / n_atoms).min()), max(ref_e.max(), (mean_e / n_atoms).max())]
    ax[0].plot(lims, lims, "k--", lw=0.8)
    ax[0].set(
        xlabel="reference energy (eV/atom)", ylabel="ensemble mean (eV/atom)", title="energy parity"
    )
    rf = np.concatenate([d.forces for d in data]).ravel()
    mf = np.concatenate(mean_f).ravel()
    ax[1].scatter(rf, mf, s=3, alpha=0.5)
    lims = [min(rf.min(), mf.min()), max(rf.max(), mf.max())]
    ax[1].plot(lims, lims, "k--", lw=0.8)
    ax[1].set(xlabel="reference force (eV/Å)", ylabel="ensemble mean (eV/Å)", title="force parity")
    save(fig, "parity")

    per_el = report["ensemble_mean"]["forces_per_element_eV_per_A"]
    fig = Figure(figsize=(max(4, len(per_el) * 0.8), 3.5))
    ax = fig.subplots()
    ax.bar(list(per_el), [v["rmse"] for v in per_el.values()], label="RMSE")
    ax.bar(list(per_el), [v["mae"] for v in per_el.values()], width=0.5, label="MAE")
    ax.set(ylabel="force error (eV/Å)", title="force error per element")
    ax.legend()
    save(fig, "per_element")

    uq = report.get("uncertainty")
    if uq:
        fig = Figure(figsize=(4.5, 4))
        ax = fig.subplots()
        ax.scatter(uq["max_force_dev"], uq["max_force_error"], s=10)
        ax.axhline(uq["error_threshold_eV_per_A"], color="k", ls="--", lw=0.8)
        rho = uq["spearman_max_force_dev_vs_max_force_error"]
        title = f"error vs uncertainty (Spearman {rho:.2f})" if rho is not None else ""
        ax.set(xlabel="max_force_dev (eV/Å)", ylabel="true max force error (eV/Å)", title=title)
        save(fig, "uncertainty")

    phys = report.get("physics")
    if phys:
        fig = Figure(figsize=(4.5, 4))
        ax = fig.subplots()
        for key, label in (("ev_reference", phys["reference"]), ("ev_model", "ensemble mean")):
            ax.plot(phys[key]["volumes"], phys[key]["energies"], "o-", label=label)
        ax.set(
            xlabel="volume (Å³/atom)",
            ylabel="energy (eV/atom)",
            title=f"E-V curve {phys['formula']}",
        )
        ax.legend()
        save(fig, "ev")
    return files


# -- the stage function --------------------------------------------------------------------------


def check_validation(checks: ValidationSettings) -> None:
    """A reference calculator that cannot be imported, a check structure that cannot be read,
    and one the elastic and phonon checks cannot use (not a periodic crystal), refused before
    anything runs (by `validate`, and by `campaign --write` rather than in iteration 0)."""
    if checks.reference not in (None, LABEL_REFERENCE):
        try:
            calculator_class(checks.reference)
        except SettingsError as exc:
            raise SettingsError(f"validate.reference: {exc}") from None
    if checks.structure is None:
        return
    try:
        atoms = next(iter_frames([checks.structure])).atoms
    except (NequixFWError, StopIteration) as exc:
        cause = str(exc).removeprefix(f"{checks.structure}: ") or "no structure in it"
        raise SettingsError(
            f"validate.structure {checks.structure} (command line: --ev-structure): cannot be "
            f"read ({cause})"
        ) from None
    if (checks.elastic or checks.phonons) and (not atoms.pbc.all() or atoms.cell.rank < 3):
        raise SettingsError(
            f"validate.structure {checks.structure}: not a periodic crystal (pbc "
            f"{atoms.pbc.tolist()}, cell rank {atoms.cell.rank}): the elastic and phonon checks "
            "strain and displace a periodic cell"
        )


def _reference_calculator_name(validation: ValidationSettings) -> str | None:
    """The reference calculator of the structural checks (None: labelled reference data, or
    none), `validation` checked."""
    check_validation(validation)
    reference = validation.reference
    if reference == LABEL_REFERENCE:
        if not validation.reference_data:
            raise SettingsError(
                f"validate.reference {LABEL_REFERENCE!r} means an E-V set labelled by a "
                "campaign's label backend; outside a campaign give validate.reference_data "
                "(--reference-data), e.g. made by `nequix-fw ev-set`"
            )
        return None
    if reference is not None and validation.reference_data:
        raise SettingsError(
            "validate.reference (a calculator) and validate.reference_data "
            "(labelled E-V data) exclude each other: give one"
        )
    return reference


def _error_report(
    ensemble: Ensemble, data: Sequence[Labelled], preds: list[Prediction], error_threshold: float
) -> dict:
    """The errors of each model and of the ensemble mean, and (two models or more) the
    uncertainty's quality: the start of the validation report."""
    report: dict = {
        "models": ensemble.model_infos(),
        "n_structures": len(data),
        "per_model": {},
    }
    for m, model in enumerate(ensemble.models):
        rows = ensemble.model_rows(m)  # a model with LLPR heads: their mean, the model itself
        report["per_model"][f"{m}:{model.info.name}"] = error_metrics(
            data,
            [p.energies[rows].mean() for p in preds],
            [p.forces[rows].mean(0) for p in preds],
            [None if p.stresses is None else p.stresses[rows].mean(0) for p in preds],
        )
    report["ensemble_mean"] = error_metrics(
        data,
        np.array([p.energies.mean() for p in preds]),
        [p.forces.mean(0) for p in preds],
        [None if p.stresses is None else p.stresses.mean(0) for p in preds],
    )
    if len(ensemble) >= 2:
        report["uncertainty"] = uncertainty_quality(data, preds, error_threshold)
    return report


#: The elastic and phonon checks' structure is at the reference's equilibrium when its volume
#: is within this many % of the reference's V0.
EQUILIBRIUM_PERCENT = 1.0


def warn_off_equilibrium(structure: Atoms, physics: dict | None, where: str) -> float | None:
    """Warn when the elastic and phonon checks' `structure` (named `where`) is more than
    `EQUILIBRIUM_PERCENT` off the volume of the reference's E-V fit (in `physics`): its
    constants are then taken at a strained state. Returns the offset (%), None without a fit."""
    v0 = ((physics or {}).get("ev_reference") or {}).get("v0")
    if v0 is None or not structure.pbc.all():
        return None
    volume = structure.get_volume() / len(structure)
    off = 100 * (volume - v0) / v0
    if abs(off) > EQUILIBRIUM_PERCENT:
        logger.warning(
            "%s: %.4g Å³/atom, %+.1f %% off the reference's V0 of %.4g Å³/atom: the elastic "
            "constants and phonons are taken at a strained state; scale the structure to the "
            "reference's V0 (lattice x %.4f)",
            where,
            volume,
            off,
            v0,
            (v0 / volume) ** (1 / 3),
        )
    return off


def validate(
    model_specs: Sequence[str | Path],
    testset: Sequence[str | Path],
    output: str | Path,
    validation: ValidationSettings | None = None,
    error_threshold: float = 0.1,
    plots: bool = True,
    settings: EnsembleSettings | None = None,
    store: DatasetStore | None = None,
    allow_mixed: bool = False,
    progress: bool = False,
    label_reference: Callable[[str, list[Atoms]], list[Atoms | None]] | None = None,
    foundation: str | Path | None = None,
) -> dict:
    """Validate models on a labelled test set (files or store datasets ``db:NAME`` of `store`);
    write the JSON report (and PNG plots beside it). The checks besides the errors are those
    of `validation`: the structural checks compare with its `reference` calculator (E-V curve
    of its `structure`, relaxation, vacancy) or with labelled `reference_data` (an E-V set);
    MD stability runs if it asks. The elastic and phonon checks compare with the reference
    calculator, or with the labels `label_reference(check, cells)` gives (a campaign's own).
    Models fine-tuned from a `foundation` model get the forgetting and repulsive-wall checks
    (`nequix_fw.forgetting`) on the test set's elements. `progress`: bars for the long parts."""
    validation = validation or ValidationSettings()
    reference = _reference_calculator_name(validation)
    reference_params = validation.reference_params
    ev_structure, reference_data = validation.structure, validation.reference_data
    if error_threshold <= 0:
        raise SettingsError(f"error threshold must be > 0 eV/Å, got {error_threshold}")
    output = check_output(output, "file")
    data = read_labelled(testset, store, allow_mixed)
    if not data:
        raise NequixFWError("the test set is empty")
    ensemble = Ensemble.from_specs(model_specs, settings)
    for d in data:
        ensemble.check_covered(d.frame.atoms, d.where)
    preds = ensemble.predict([d.frame.atoms for d in data])
    bad = [d.where for d, p in zip(data, preds, strict=True) if not p.finite.all()]
    if bad:
        raise NequixFWError(f"{bad[0]}: a model predicts non-finite values")
    report = _error_report(ensemble, data, preds, error_threshold)
    if reference is not None:
        structure = read(ev_structure) if ev_structure else data[0].frame.atoms.copy()
        report["physics"] = physics_checks(
            EnsembleCalculator(ensemble),
            structure,
            reference_calculator(reference, reference_params),
        )
        report["physics"]["reference"] = reference
    elif reference_data:
        where = ", ".join(str(r) for r in reference_data)
        report["physics"] = ev_checks_against_labels(
            EnsembleCalculator(ensemble), read_labelled(reference_data, store), where
        )
    if validation.elastic or validation.phonons:
        if reference is None and label_reference is None:
            raise SettingsError(
                "validate.elastic and validate.phonons compare with a reference calculator "
                "(validate.reference: emt, or 'module:Class'), or in a campaign with its own "
                "labels (validate.reference: label)"
            )
        structure = read(ev_structure) if ev_structure else data[0].frame.atoms.copy()
        warn_off_equilibrium(structure, report.get("physics"), ev_structure or data[0].where)
        calc = None if reference is None else reference_calculator(reference, reference_params)
        report["properties"] = property_checks(
            ensemble.predict, structure, calc, validation, label_reference
        )
    if validation.md_stability:
        starts = [d.frame.atoms.copy() for d in data]
        report["md_stability"] = md_stability(starts, ensemble, validation, progress)
    if foundation is not None:
        elements = sorted({int(z) for d in data for z in d.frame.atoms.numbers})
        calc = None if reference is None else reference_calculator(reference, reference_params)
        report["forgetting"] = forgetting_report(ensemble, str(foundation), elements, calc)
    if plots:
        mean_e = np.array([p.energies.mean() for p in preds])
        mean_f = [p.forces.mean(0) for p in preds]
        report["plots"] = _plots(report, data, mean_e, mean_f, output.with_suffix(""))
    doc = ValidationReport(**report)
    doc.to_file(output)
    report = doc.to_dict()
    m = report["ensemble_mean"]
    logger.info(
        "validation on %d structures: energy RMSE %.3g meV/atom, force RMSE %.4g eV/Å -> %s",
        len(data),
        m["energy_per_atom_meV"]["rmse"],
        m["forces_eV_per_A"]["rmse"],
        output,
    )
    return report
