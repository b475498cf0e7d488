"""`nequix-fw` command line: a thin layer over the stage functions.

User errors print one line (``error: ...``) and exit with code 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from nequix_fw import LOG_FORMAT, __version__
from nequix_fw.errors import NequixFWError, SettingsError

#: The database of a LaunchPad file that `db start` writes, unless --name says another.
DEFAULT_DATABASE = "nequix_fw"

#: The commands, in the order of `nequix-fw --help`: {name: (help, add_arguments, handler)}.
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def _command(name: str, help_: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated handler as command `name`, whose options `arguments` adds."""

    def register(handler: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = (help_, arguments, handler)
        return handler

    return register


def _run_ensemble_arguments(r: argparse.ArgumentParser) -> None:
    """The options of `run-ensemble`."""
    from nequix_fw.settings import EnsembleSettings

    r.add_argument(
        "--models",
        nargs="+",
        required=True,
        help="checkpoints (.nqx/.pt) or pretrained names (e.g. nequix-mp-1)",
    )
    r.add_argument(
        "--structures",
        nargs="+",
        required=True,
        help="structure files (any ASE format, multi-frame too) or directories",
    )
    r.add_argument(
        "--output", required=True, help="results JSON to write (its arrays file goes beside it)"
    )
    _config(r, EnsembleSettings)
    for field in ("backend", "max_edges_per_batch", "max_structures_per_batch", "results_format"):
        _setting(r, EnsembleSettings, field)
    _setting(
        r,
        EnsembleSettings,
        "store_per_model",
        "--no-per-model",
        action="store_const",
        const=False,
        help="omit per-model energies/forces/stresses from the results",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


@_command("run-ensemble", "evaluate structures with an ensemble of models", _run_ensemble_arguments)
def _cmd_run_ensemble(args: argparse.Namespace) -> int:
    from nequix_fw.evaluation import run_ensemble
    from nequix_fw.settings import EnsembleSettings, load_settings

    settings = load_settings(
        args.config, EnsembleSettings, **_settings_from(args, EnsembleSettings)
    )
    summary = run_ensemble(
        args.models, args.structures, args.output, settings, progress=not args.no_progress
    )
    print(
        f"evaluated {summary['n_structures']} structures ({summary['n_atoms']} atoms) with "
        f"{len(args.models)} models; {summary['n_failed']} failed -> {args.output}"
    )
    return 0


def _select_arguments(s: argparse.ArgumentParser) -> None:
    """The options of `select`."""
    from nequix_fw.settings import SelectionSettings

    s.add_argument("--ensemble", required=True, help="results JSON from run-ensemble")
    s.add_argument("--output", required=True, help="directory for selected structures")
    _config(s, SelectionSettings)
    s.add_argument("--threshold", type=float, help="same as --lo (eV/Å)")
    s.add_argument("--lo", help="lower trust level on max_force_dev (eV/Å), or auto")
    ss = SelectionSettings
    _setting(s, ss, "target_force_error")
    s.add_argument("--calibration", help="--lo auto: validate report holding the calibration")
    for field in ("hi", "relative_force_level", "stress_lo", "stress_hi", "max_selected"):
        _setting(s, ss, field)
    _setting(s, ss, "diverse", action="store_const", const=True)
    for field in ("descriptor", "format", "method", "seed"):
        _setting(s, ss, field)
    _setting(s, ss, "min_distance_A", "--min-distance")
    s.add_argument("--exclude-dataset", help="training set (dir or db:NAME) not to select again")
    s.add_argument("--launchpad", help="LaunchPad file of the store (db:NAME datasets)")


@_command("select", "select uncertain structures from ensemble results", _select_arguments)
def _cmd_select(args: argparse.Namespace) -> int:
    from nequix_fw.selection import select_from_results
    from nequix_fw.settings import SelectionSettings, load_settings

    if args.threshold is not None and args.lo is not None:
        raise SettingsError("give --threshold or --lo, not both (--threshold is --lo)")
    lo = args.threshold if args.threshold is not None else args.lo
    if lo is not None and lo != "auto":
        try:
            lo = float(lo)
        except ValueError:
            raise SettingsError(f"--lo {lo!r}: a number (eV/Å) or auto") from None
    settings = load_settings(
        args.config, SelectionSettings, lo=lo, **_settings_from(args, SelectionSettings)
    )
    calibration = None
    if settings.lo == "auto":
        if not args.calibration:
            raise SettingsError("--lo auto needs --calibration (a validate report)")
        report = _json_document(args.calibration, "--calibration", "a validate report")
        calibration = (report.get("uncertainty") or {}).get("calibration")
    exclude, known = None, None
    if args.exclude_dataset:
        from nequix_fw.dataset import dataset_ids, training_structures

        exclude = dataset_ids(args.exclude_dataset, _store(args))
        if settings.diverse:  # the picks also keep away from the training set's structures
            known = training_structures(args.exclude_dataset, _store(args))
    manifest = select_from_results(
        args.ensemble,
        args.output,
        settings,
        exclude,
        known,
        calibration=calibration,
        calibration_of=args.calibration or "",
    )
    if settings.lo == "auto":
        lo = manifest["settings"]["lo"]
        print(f"lo = {lo:.4g} eV/Å from the calibration in {args.calibration}")
    c = manifest["counts"]
    print(
        f"{c['accurate']} accurate, {c['candidate']} candidate, {c['failed']} failed; "
        f"selected {c['selected']} -> {args.output}"
        + (f" ({c['already_labelled']} already labelled)" if c["already_labelled"] else "")
    )
    return 0


def _train_ensemble_arguments(t: argparse.ArgumentParser) -> None:
    """The options of `train-ensemble`."""
    from nequix_fw.settings import TrainingSettings

    t.add_argument(
        "--dataset",
        nargs="+",
        required=True,
        help="labelled structures (extxyz/traj/vasprun.xml/..., files or directories) or a "
        "store dataset db:NAME",
    )
    t.add_argument("--launchpad", help="LaunchPad file of the store (db:NAME datasets)")
    t.add_argument("--outdir", required=True, help="directory for member_<k>.nqx and metadata")
    _config(t, TrainingSettings)
    for field in ("n_models", "epochs", "strategy", "seed"):
        _setting(t, TrainingSettings, field)
    _setting(t, TrainingSettings, "n_workers", "--workers")
    for field in ("uncertainty", "llpr_heads", "reinitialise"):
        _setting(t, TrainingSettings, field)
    _setting(t, TrainingSettings, "foundation_member", action="store_const", const=True)
    t.add_argument(
        "--finetune-from",
        nargs="+",
        help="foundation model(s) (paths or pretrained names); several: a heterogeneous "
        "committee, member k from model k mod n",
    )
    t.add_argument("--warm-start", help="previous iteration's model directory")
    t.add_argument(
        "--save-torch",
        action="store_true",
        help="also write .pt checkpoints (the default; see --no-torch)",
    )
    t.add_argument("--no-torch", action="store_true", help="write .nqx checkpoints only")
    _setting(t, TrainingSettings, "backend")
    t.add_argument("--overwrite", action="store_true", help="replace models in --outdir")
    t.add_argument(
        "--allow-mixed",
        action="store_true",
        help="train on labels from different levels of theory together",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


@_command("train-ensemble", "train an ensemble of Nequix models", _train_ensemble_arguments)
def _cmd_train_ensemble(args: argparse.Namespace) -> int:
    from nequix_fw.settings import TrainingSettings, load_settings
    from nequix_fw.training import train_ensemble

    settings = load_settings(
        args.config,
        TrainingSettings,
        **_settings_from(args, TrainingSettings),
        save_torch=False if args.no_torch else (True if args.save_torch else None),
    )
    metas = train_ensemble(
        args.dataset,
        args.outdir,
        settings,
        finetune_from=args.finetune_from,
        warm_start=args.warm_start,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        store=_store(args),
    )
    for m in metas:
        best = m["best_valid"]
        print(
            f"member {m['member']}: {m['start']}, seed {m['seed']}, {m['epochs_run']} epochs, "
            f"best epoch {m['best_epoch']}: loss {best['loss']:.4g}"
            + (f", force MAE {best['force_mae']:.4g} eV/Å" if "force_mae" in best else "")
        )
    print(f"wrote {len(metas)} members to {args.outdir}")
    return 0


def property_lines(properties: dict | None) -> list[str]:
    """The elastic and phonon checks of a validation report, one line each."""
    if not properties:
        return []
    out = []
    el = properties.get("elastic")
    if el:
        consts = ", ".join(
            f"{n} {v['model']:.1f} ± {v['model_std']:.1f} ({v['reference']:.1f}, "
            f"{v['error_percent']:+.1f} %)"
            for n, v in el["constants_GPa"].items()
        )
        out.append(f"elastic constants (GPa; reference in brackets): {consts}")
    ph = properties.get("phonons")
    if ph:
        points = ", ".join(
            f"{q} "
            + "/".join(f"{f:.2f}" for f in v["model_THz"])
            + " ("
            + "/".join(f"{f:.2f}" for f in v["reference_THz"])
            + ")"
            for q, v in ph["qpoints"].items()
        )
        worst = ph["error_percent"]
        out.append(
            f"phonons (THz; reference in brackets): {points}; largest error "
            f"{'-' if worst is None else format(worst, '.1f')} %"
        )
    return out


def _validate_arguments(v: argparse.ArgumentParser) -> None:
    """The options of `validate`."""
    from nequix_fw.settings import ValidationSettings

    v.add_argument(
        "--models", nargs="+", required=True, help="checkpoints (.nqx/.pt) or pretrained names"
    )
    v.add_argument("--testset", nargs="+", required=True, help="labelled files or db:NAME")
    v.add_argument("--launchpad", help="LaunchPad file of the store (db:NAME datasets)")
    v.add_argument("--output", required=True, help="report JSON (plots are written beside it)")
    v.add_argument(
        "--error-threshold",
        type=float,
        default=0.1,
        help="true max force error (eV/Å) counted as 'bad' for ROC AUC",
    )
    _setting(v, ValidationSettings, "reference")
    _setting(v, ValidationSettings, "reference_data")
    _setting(v, ValidationSettings, "structure", "--ev-structure")
    v.add_argument("--no-plots", action="store_true", help="no PNG plots beside the report")
    v.add_argument(
        "--allow-mixed",
        action="store_true",
        help="test sets from different levels of theory together",
    )
    _config(v, ValidationSettings)
    v.add_argument(
        "--md-stability",
        action="store_true",
        help="NVT runs of the ensemble mean from the test structures: stable?",
    )
    _setting(v, ValidationSettings, "md_temperature_K", "--md-temperature")
    _setting(v, ValidationSettings, "md_steps")
    _setting(v, ValidationSettings, "md_n_runs", "--md-runs")
    for field in ("elastic", "phonons"):
        _setting(v, ValidationSettings, field, action="store_const", const=True)
    _setting(v, ValidationSettings, "phonon_supercell", type=int)
    v.add_argument(
        "--foundation",
        help="the foundation model the models were fine-tuned from (path or name): adds the "
        "forgetting and repulsive-wall checks",
    )
    v.add_argument("--no-progress", action="store_true", help="no progress bar")


@_command("validate", "errors and uncertainty quality on a labelled test set", _validate_arguments)
def _cmd_validate(args: argparse.Namespace) -> int:
    from nequix_fw.settings import ValidationSettings, load_settings
    from nequix_fw.validation import validate

    checks = load_settings(
        args.config,
        ValidationSettings,
        md_stability=True if args.md_stability else None,
        **_settings_from(args, ValidationSettings),
    )
    report = validate(
        args.models,
        args.testset,
        args.output,
        checks,
        error_threshold=args.error_threshold,
        plots=not args.no_plots,
        store=_store(args),
        allow_mixed=args.allow_mixed,
        progress=not args.no_progress,
        foundation=args.foundation,
    )
    mean = report["ensemble_mean"]
    line = (
        f"ensemble mean on {report['n_structures']} structures: energy RMSE "
        f"{mean['energy_per_atom_meV']['rmse']:.2f} meV/atom, force RMSE "
        f"{mean['forces_eV_per_A']['rmse']:.4f} eV/Å"
    )
    if mean["stress_GPa"]["rmse"] is not None:
        line += f", stress RMSE {mean['stress_GPa']['rmse']:.3f} GPa"
    print(line)
    uq = report.get("uncertainty")
    if uq:
        rho, auc = uq["spearman_max_force_dev_vs_max_force_error"], uq["roc_auc"]
        print(
            f"uncertainty: Spearman {rho if rho is None else round(rho, 3)}, "
            f"ROC AUC {auc if auc is None else round(auc, 3)} "
            f"(error > {uq['error_threshold_eV_per_A']} eV/Å)"
        )
    md = report.get("md_stability")
    if md:
        n_ok = sum(r["stop_reason"] == "stable" for r in md["runs"])
        stops = ", ".join(sorted({r["stop_reason"] for r in md["runs"]} - {"stable"}))
        others = f" (others: {stops})" if stops else ""
        print(
            f"MD stability at {md['temperature_K']:g} K: {n_ok} of {md['n_runs']} runs stable "
            f"for {md['length_fs'] / 1000:g} ps{others}"
        )
    for line in property_lines(report.get("properties")):
        print(line)
    if report.get("forgetting"):
        from nequix_fw.forgetting import forgetting_summary, summary_line

        print(summary_line(forgetting_summary(report["forgetting"])))
    phys = report.get("physics")
    if phys and phys["v0_error_percent"] is None:
        print(
            f"E-V of {phys['formula']} against {phys['reference']}: the model's curve has no "
            f"fit ({phys['ev_model']['fit_error']})"
        )
    elif phys:
        print(
            f"E-V of {phys['formula']} against {phys['reference']}: V0 error "
            f"{phys['v0_error_percent']:+.2f} %, B0 error "
            f"{phys['bulk_modulus_error_percent']:+.1f} %"
        )
    print(f"report -> {args.output}")
    return 0


def _label_arguments(lb: argparse.ArgumentParser) -> None:
    """The options of `label`."""
    lb.add_argument("--structures", required=True, help="selected structures (directory/file)")
    lb.add_argument("--output", required=True, help="directory for one task directory each")
    lb.add_argument("--iteration", type=_iteration, help="AL iteration (>= 0; provenance)")
    _labelling_arguments(lb)


@_command("label", "label selected structures with a reference method", _label_arguments)
def _cmd_label(args: argparse.Namespace) -> int:
    from nequix_fw.labelling import label_structures, make_backend

    settings = _labelling_settings(args)
    backend = make_backend(settings, _fworker_env(args.fworker))
    summary = label_structures(
        args.structures,
        args.output,
        backend,
        settings,
        iteration=args.iteration,
        progress=not args.no_progress,
    )
    reused = f" ({summary['n_reused']} from an earlier run)" if summary["n_reused"] else ""
    print(
        f"labelled {summary['n_success']} of {summary['n_structures']} structures with "
        f"{summary['backend']}{reused}; {summary['n_failed']} failed -> {args.output}"
    )
    for f in summary["failed"]:
        print(f"  failed {f['structure_id']}: {f['reason']}")
    return 0


def _json_document(path: str | Path, flag: str, kind: str) -> dict:
    """The JSON object in file `path` (given by `flag`), or one line naming the file."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{flag} {path}: not {kind} (not JSON: {exc})") from None
    if not isinstance(doc, dict):
        raise SettingsError(f"{flag} {path}: not {kind} (a JSON {type(doc).__name__})")
    return doc


def _fworker_env(path: str | Path | None) -> dict:
    """The ``env`` of a FireWorks worker file (my_fworker.yaml); {} without one."""
    from fireworks import FWorker

    if path is None:
        return {}

    try:
        return dict(FWorker.from_file(str(path)).env or {})
    except FileNotFoundError:
        raise SettingsError(f"{path}: FireWorks worker file not found") from None
    except Exception as exc:
        raise SettingsError(f"{path}: not a FireWorks worker file ({exc})") from None


def _labelling_settings(args: argparse.Namespace):
    """The labelling section of --config with the command line's values over it."""
    from nequix_fw.settings import LabellingSettings, load_settings

    params = None
    if args.calculator_params:
        try:
            params = json.loads(args.calculator_params)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"--calculator-params is not valid JSON ({exc})") from None
    return load_settings(
        args.config,
        LabellingSettings,
        calculator_params=params,
        **_settings_from(args, LabellingSettings),
    )


def _relabel_arguments(rl: argparse.ArgumentParser) -> None:
    """The options of `relabel`."""
    rl.add_argument("--dataset", required=True, help="dataset to relabel (directory or db:NAME)")
    _into_arguments(rl, "new dataset (directory or db:NEW)")
    _labelling_arguments(rl)


@_command(
    "relabel",
    "label every structure of a dataset again, into a new dataset",
    _relabel_arguments,
)
def _cmd_relabel(args: argparse.Namespace) -> int:
    from nequix_fw.labelled_sets import relabel
    from nequix_fw.labelling import make_backend

    settings = _labelling_settings(args)
    backend = make_backend(settings, _fworker_env(args.fworker))
    r = relabel(
        args.dataset,
        args.to,
        backend,
        settings,
        args.output,
        _store(args),
        progress=not args.no_progress,
    )
    lab, ds = r["labels"], r["dataset"]
    reused = f" ({lab['n_reused']} from an earlier run)" if lab["n_reused"] else ""
    print(
        f"relabelled {lab['n_success']} of {lab['n_structures']} structures with "
        f"{lab['backend']}{reused}; {lab['n_failed']} failed; added {ds['n_added']} "
        f"({ds['n_duplicates']} already there); {ds['n_total']} in {ds['dataset']}"
    )
    for f in lab["failed"]:
        print(f"  failed {f['structure_id']}: {f['reason']}")
    return 0


def _ev_set_arguments(ev: argparse.ArgumentParser) -> None:
    """The options of `ev-set`."""
    ev.add_argument("--structure", required=True, help="the (periodic) structure file")
    _into_arguments(ev, "dataset of the E-V set (directory or db:NAME)")
    _labelling_arguments(ev)


@_command(
    "ev-set",
    "label a structure at 7 volumes (-6 to +6 %%): E-V reference data",
    _ev_set_arguments,
)
def _cmd_ev_set(args: argparse.Namespace) -> int:
    from nequix_fw.labelled_sets import label_ev_set
    from nequix_fw.labelling import make_backend
    from nequix_fw.structures import iter_frames

    settings = _labelling_settings(args)
    backend = make_backend(settings, _fworker_env(args.fworker))
    structure = next(iter_frames([args.structure])).atoms
    r = label_ev_set(
        structure,
        args.to,
        backend,
        settings,
        args.output,
        _store(args),
        progress=not args.no_progress,
    )
    lab, ds = r["labels"], r["dataset"]
    reused = f" ({lab['n_reused']} from an earlier run)" if lab["n_reused"] else ""
    print(
        f"E-V set of {structure.get_chemical_formula()}: labelled {lab['n_success']} of "
        f"{lab['n_structures']} volumes with {lab['backend']}{reused}; {ds['n_total']} in "
        f"{ds['dataset']} (validate --reference-data {args.to})"
    )
    return 0


def _update_dataset_arguments(u: argparse.ArgumentParser) -> None:
    """The options of `update-dataset`."""
    from nequix_fw.settings import LabellingSettings

    u.add_argument("--new", required=True, help="label output directory (or labelled files)")
    u.add_argument(
        "--dataset", required=True, help="training-set directory, or db:NAME in the store"
    )
    u.add_argument("--launchpad", help="LaunchPad file of the store (db:NAME datasets)")
    u.add_argument("--iteration", type=_iteration, help="AL iteration (>= 0; provenance)")
    u.add_argument(
        "--allow-mixed", action="store_true", help="merge labels from different levels of theory"
    )
    _config(u, LabellingSettings)  # the limits labelling applies hold for imported files too
    _setting(u, LabellingSettings, "max_force")
    _setting(u, LabellingSettings, "min_distance_A", "--min-distance")


@_command(
    "update-dataset",
    "add labelled structures to the training set",
    _update_dataset_arguments,
)
def _cmd_update_dataset(args: argparse.Namespace) -> int:
    from nequix_fw.dataset import update_dataset
    from nequix_fw.settings import LabellingSettings, load_settings

    limits = load_settings(
        args.config, LabellingSettings, **_settings_from(args, LabellingSettings)
    )
    s = update_dataset(
        args.new, args.dataset, args.iteration, args.allow_mixed, _store(args), limits=limits
    )
    print(
        f"added {s['n_added']} structures ({s['n_duplicates']} already present, "
        f"{s['n_conflicts']} conflicts, {s['n_failed_tasks_skipped']} failed tasks skipped); "
        f"{s['n_total']} in {s['dataset']}"
    )
    for c in s["conflicts"]:
        print(
            f"  conflict {c['structure_id']} ({c['source']}): stored energy "
            f"{c['energy_stored']:.6f} eV, new {c['energy_new']:.6f} eV; kept the stored labels"
        )
    return 0


def _explore_arguments(x: argparse.ArgumentParser) -> None:
    """The options of `explore`."""
    from nequix_fw.settings import ExplorationSettings

    x.add_argument(
        "--models", nargs="+", required=True, help="the ensemble driving MD (checkpoints or names)"
    )
    x.add_argument("--structures", nargs="+", required=True, help="starting structures")
    x.add_argument("--output", required=True, help="directory for candidates.extxyz + manifest")
    _config(x, ExplorationSettings)
    xs = ExplorationSettings
    _setting(x, xs, "temperatures_K", "--temperatures")
    _setting(x, xs, "pressures_GPa", "--pressures")
    _setting(x, xs, "steps")
    _setting(x, xs, "timestep_fs", "--timestep")
    _setting(x, xs, "sample_every")
    _setting(x, xs, "check_every")
    _setting(x, xs, "stop_force_dev", "--hi", "--stop-force-dev")
    _setting(x, xs, "seeds")
    _setting(x, xs, "thermostat")
    _setting(x, xs, "barostat")
    _setting(x, xs, "n_workers", "--workers")
    _setting(x, xs, "walkers")
    _setting(x, xs, "n_distortions", "--distortions")
    _setting(x, xs, "rattle_A", "--rattle")
    _setting(x, xs, "strain_max", "--strain")
    _setting(x, xs, "strain_volumetric")
    _setting(x, xs, "strain_shear")
    _setting(x, xs, "vacancies")
    x.add_argument("--substitute", nargs="+", metavar="OLD:NEW", help="element swaps in copies")
    _setting(x, xs, "substitution_fraction")
    x.add_argument(
        "--random",
        nargs="+",
        metavar="FORMULA:DENSITY[:N]",
        help="random packings, density in g/cm³",
    )
    x.add_argument("--no-progress", action="store_true", help="no progress bar")


@_command("explore", "ensemble-driven MD: candidate structures", _explore_arguments)
def _cmd_explore(args: argparse.Namespace) -> int:
    from nequix_fw.ensemble import Ensemble
    from nequix_fw.exploration import explore, stop_counts
    from nequix_fw.settings import ExplorationSettings, load_settings
    from nequix_fw.structures import iter_frames

    values = _settings_from(args, ExplorationSettings)
    settings = load_settings(
        args.config,
        ExplorationSettings,
        **values,
        substitutions=_pairs(args.substitute, "--substitute", "OLD:NEW"),
        random_packing=_random_packing(args.random),
    )
    shaping = {
        "rattle_A": "--rattle",
        "strain_max": "--strain",
        "strain_volumetric": "--strain-volumetric",
        "strain_shear": "--strain-shear",
        "vacancies": "--vacancies",
        "substitutions": "--substitute",
    }
    values["substitutions"] = args.substitute
    asked = [flag for field, flag in shaping.items() if values.get(field) is not None]
    if asked and not settings.n_distortions:
        raise SettingsError(
            f"{asked[0]} shapes distorted copies, but none are made: give --distortions N"
        )
    ensemble = Ensemble.from_specs(args.models)
    manifest = explore(
        ensemble,
        list(iter_frames(args.structures)),
        args.output,
        settings,
        progress=not args.no_progress,
    )
    reasons = stop_counts(manifest["trajectories"])
    stops = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    print(
        f"{len(manifest['trajectories'])} trajectories ({stops}); "
        f"{len(manifest['frames'])} unique frames -> {args.output}"
    )
    return 0


def _pairs(items: list[str] | None, flag: str, form: str) -> dict[str, str] | None:
    if items is None:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or not key or not value:
            raise SettingsError(f"{flag} {item!r}: expected {form}")
        out[key] = value
    return out


def _store(args: argparse.Namespace):
    """The store of ``--launchpad`` (connected only when a db:NAME dataset is used)."""
    from nequix_fw.store import Store

    return Store(args.launchpad)


def _random_packing(items: list[str] | None) -> list[dict] | None:
    if items is None:
        return None
    out = []
    for item in items:
        parts = item.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            out.append(
                {
                    "composition": parts[0],
                    "density_g_cm3": float(parts[1]),
                    "n_structures": int(parts[2]) if len(parts) == 3 else 1,
                }
            )
        except ValueError:
            raise SettingsError(
                f"--random {item!r}: expected FORMULA:DENSITY[:N], e.g. Cu16Au16:12.5:4"
            ) from None
    return out


def _campaign_arguments(cp: argparse.ArgumentParser) -> None:
    """The options of `campaign`."""
    cp.add_argument("--config", required=True, help="settings YAML with a 'campaign' section")
    cp.add_argument("--launchpad", help="LaunchPad file: add the workflow there (the store too)")
    cp.add_argument("--write", help="write the workflow YAML for `lpad add` instead")


@_command("campaign", "build an active-learning campaign's FireWorks workflow", _campaign_arguments)
def _cmd_campaign(args: argparse.Namespace) -> int:
    from nequix_fw.settings import AUTO_STRESS_WEIGHT
    from nequix_fw.workflows import campaign_sections, campaign_workflow

    if args.write is None and args.launchpad is None:
        raise SettingsError("give --launchpad (add the workflow there) or --write FILE")
    if args.write:
        from nequix_fw.structures import check_output

        check_output(args.write, "file")
    launchpad = Path(args.launchpad).resolve() if args.launchpad else None
    chosen: dict = {}
    wf = campaign_workflow(campaign_sections(args.config, launchpad, chosen))
    notes = {
        "fine-tuning": "one member's LLPR uncertainty; see the guide's uncertainty page",
        "property checks": f"auto: {AUTO_STRESS_WEIGHT:g} when every label carries a stress; "
        "V0, B0 and the elastic constants follow the stresses",
    }
    for why, values in chosen.items():
        listed = ", ".join(f"{k} = {v}" for k, v in values.items())
        print(f"{why} defaults: {listed} ({notes[why]})")
    if args.write:
        from nequix_fw.structures import atomic_path

        with atomic_path(Path(args.write)) as tmp:
            wf.to_file(str(tmp), f_format="yaml")
        print(
            f"wrote {wf.name} ({len(wf.fws)} Fireworks for iteration 0) -> {args.write}; "
            f"add it with: lpad add {args.write}"
        )
    else:
        from fireworks import LaunchPad

        if not launchpad.is_file():
            raise SettingsError(f"{args.launchpad}: LaunchPad file not found")
        lp = LaunchPad.from_file(str(launchpad))
        if not lp.fw_id_assigner.count_documents({}) and not lp.workflows.count_documents({}):
            lp.reset("", require_password=False)  # a new, empty database: nothing to lose
            print(f"initialised the empty FireWorks database {lp.name}")
        ids = lp.add_wf(wf)
        print(
            f"added {wf.name}: Fireworks {sorted(ids.values())}; run it with: "
            f"rlaunch -l {args.launchpad} rapidfire (or qlaunch rapidfire)"
        )
    return 0


def _campaign_status_arguments(cs: argparse.ArgumentParser) -> None:
    """The options of `campaign-status`."""
    cs.add_argument("directory", help="the campaign directory (holds campaign.json)")
    cs.add_argument("--plot", action="store_true", help="(re)write <directory>/campaign.png")


@_command("campaign-status", "per-iteration summary of a campaign", _campaign_status_arguments)
def _cmd_campaign_status(args: argparse.Namespace) -> int:
    from nequix_fw.campaign.report import status_lines
    from nequix_fw.schemas.campaign import check_iterations, read_campaign_log

    path = Path(args.directory) / "campaign.json"
    log = read_campaign_log(path)
    its, where = log["iterations"], str(path)
    if log.get("launchpad") and Path(log["launchpad"]).is_file():
        from nequix_fw.store import CampaignStore

        its = CampaignStore(log["launchpad"], log["name"]).iterations() or its
        where = f"MongoDB ({log['launchpad']})"
        check_iterations(its, where)
    print(f"campaign {log['name']} (from {where})")
    print("\n".join(status_lines(its)))
    if args.plot:
        from nequix_fw.campaign import plot_progress

        print(f"plot -> {plot_progress(args.directory)}")
    return 0


def _db_arguments(db: argparse.ArgumentParser) -> None:
    """The options of `db`."""
    db.add_argument(
        "action", choices=["start", "status", "stop"], help="start, check or stop the server"
    )
    db.add_argument(
        "--dir",
        default="nequix_fw_db",
        help="server directory: data, pid and log files (default ./nequix_fw_db)",
    )
    db.add_argument("--port", type=_port, help="port (default: the last one used, else a free one)")
    db.add_argument("--host", default="127.0.0.1", help="address to listen on")
    db.add_argument(
        "--launchpad",
        default="my_launchpad.yaml",
        help="start: LaunchPad file to write for this server",
    )
    db.add_argument(
        "--name",
        help=f"start: database name in that file (default: the last one used, else "
        f"{DEFAULT_DATABASE})",
    )
    db.add_argument("--username", help="start: require SCRAM authentication as this user")
    db.add_argument(
        "--password-file", help="start: file holding the password (else $NEQUIX_FW_DB_PASSWORD)"
    )


@_command("db", "the local MongoDB server (start, status, stop)", _db_arguments)
def _cmd_db(args: argparse.Namespace) -> int:
    import os

    import yaml

    from nequix_fw import server

    if args.action == "status":
        st = server.status(args.dir)
        state = f"running (pid {st.pid})" if st.running else "not running"
        print(
            f"{st.directory}: {state} on {st.host}:{st.port}"
            + (", authentication on" if st.auth else "")
        )
        return 0 if st.running else 3
    if args.action == "stop":
        st = server.stop(args.dir)
        print(
            f"{st.directory}: stopped (pid {st.pid})"
            if st.running
            else f"{st.directory}: was not running"
        )
        return 0
    password = None
    if args.username:
        if args.password_file:
            try:
                password = Path(args.password_file).read_text().strip()
            except OSError as exc:
                raise SettingsError(
                    f"{args.password_file}: cannot read the password file ({exc.strerror})"
                ) from None
        else:
            password = os.environ.get("NEQUIX_FW_DB_PASSWORD")
        if not password:
            raise SettingsError(
                "--username needs a password: --password-file FILE or the "
                "environment variable NEQUIX_FW_DB_PASSWORD"
            )
    lp = Path(args.launchpad)
    if lp.is_dir():
        raise SettingsError(f"--launchpad {lp}: is a directory; give the LaunchPad file to write")
    st = server.start(
        args.dir, args.port, args.host, args.username, password, database=args.name or None
    )
    print(
        f"{st.directory}: MongoDB server (SecantusDB) running (pid {st.pid}) on "
        f"{st.host}:{st.port}" + (", authentication on" if st.auth else "")
    )
    name = st.database or DEFAULT_DATABASE
    config = server.launchpad_config(st, name, args.username, password)
    if lp.is_file():
        try:
            old = yaml.safe_load(lp.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        if not isinstance(old, dict):
            old = {}
        if old.get("host") not in (None, "localhost", "127.0.0.1", st.host):
            print(
                f"{lp} points at {old.get('host')}: left as it is; for this server use host "
                f"{st.host}, port {st.port}"
            )
            return 0
        if any(old.get(k) != config[k] for k in ("port", "name", "username", "password")):
            kept = _keep_beside(lp)  # another server's or database's file: never lost
            print(f"{lp} pointed at another server or database: kept as {kept}")
    server.write_launchpad(lp, config)
    print(f"LaunchPad file -> {lp} (database {name})")
    return 0


def _keep_beside(path: Path) -> Path:
    """Move `path` to the first free ``<path>.orig``, ``<path>.orig.1``, ... beside it."""
    kept, n = path.with_name(path.name + ".orig"), 0
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.name}.orig.{n}")
    path.replace(kept)
    return kept


def _export_arguments(ex: argparse.ArgumentParser) -> None:
    """The options of `export`."""
    ex.add_argument("--dataset", help="store dataset db:NAME")
    ex.add_argument("--models", help="CAMPAIGN/ITERATION: that ensemble's checkpoints (GridFS)")
    ex.add_argument("--output", required=True, help="file (dataset) or directory (models)")
    ex.add_argument(
        "--format", choices=["extxyz", "ase-db"], default="extxyz", help="the dataset file's format"
    )
    ex.add_argument("--launchpad", help="LaunchPad file of the store")
    ex.add_argument("--iteration", nargs="+", type=_iteration, help="only these iterations")
    ex.add_argument("--backend", help="only labels of this backend (ase, vasp, cp2k, script)")
    ex.add_argument("--settings-hash", help="only labels of this level of theory")


@_command("export", "write a store dataset (or a campaign's models) out", _export_arguments)
def _cmd_export(args: argparse.Namespace) -> int:
    from nequix_fw.store import CampaignStore, export_dataset

    if args.models is not None:
        campaign, _, k = args.models.rpartition("/")
        if not campaign or not k.isdigit():
            raise SettingsError(f"--models {args.models!r}: expected CAMPAIGN/ITERATION")
        paths = CampaignStore(args.launchpad, campaign).fetch_members(int(k), Path(args.output))
        print(f"wrote {len(paths)} checkpoints of {args.models} -> {args.output}")
        return 0
    if args.dataset is None:
        raise SettingsError("give --dataset db:NAME or --models CAMPAIGN/ITERATION")
    n = export_dataset(
        args.dataset,
        args.output,
        args.format,
        args.launchpad,
        args.iteration,
        args.backend,
        args.settings_hash,
    )
    print(f"exported {n} structures of {args.dataset} -> {args.output} ({args.format})")
    return 0


def _model_info_arguments(m: argparse.ArgumentParser) -> None:
    """The options of `model-info`."""
    m.add_argument("models", nargs="+", help="checkpoints (.nqx/.pt) or pretrained names")
    m.add_argument("--full", action="store_true", help="include the architecture")


@_command("model-info", "print path, sha256, elements, cutoff, parameters", _model_info_arguments)
def _cmd_model_info(args: argparse.Namespace) -> int:
    from nequix_fw.models import load_model

    infos = []
    for spec in args.models:
        info = load_model(spec).info.to_dict()
        if not args.full:
            info.pop("architecture")
        infos.append(info)
    print(json.dumps(infos, indent=1))
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port}: not a TCP port (1-65535)")
    return port


def _iteration(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if k < 0:
        raise argparse.ArgumentTypeError(f"{k}: iterations count from 0")
    return k


def _setting(parser: argparse.ArgumentParser, cls, field: str, *flags: str, **kw):
    """An option that mirrors settings field `cls.field`: its type, list-ness, choices and help
    come from the field; `_settings_from` hands its value to that field. `flags`: its flags
    (default: --FIELD)."""
    annotation = cls.model_fields[field].annotation
    if get_origin(annotation) in (Union, UnionType):  # X | None
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        kw.setdefault("choices", list(get_args(annotation)))
    elif get_origin(annotation) is list:
        kw.setdefault("nargs", "+")
        kw.setdefault("type", get_args(annotation)[0])
    elif annotation in (int, float):
        kw.setdefault("type", annotation)
    description = cls.model_fields[field].description or ""
    first = re.split(r"(?<!e\.g)(?<!i\.e)\.\s", description)[0]  # its first sentence
    kw.setdefault("help", first.rstrip(".").replace("%", "%%"))
    action = parser.add_argument(*(flags or ["--" + field.replace("_", "-")]), **kw)
    options = parser.get_default("_settings_options") or []
    parser.set_defaults(_settings_options=[*options, (action.dest, cls, field)])


def _config(parser: argparse.ArgumentParser, cls) -> None:
    """The --config option of a command whose settings are those of `cls`."""
    from nequix_fw.settings import section_name

    parser.add_argument("--config", help=f"settings YAML (section '{section_name(cls)}')")


def _settings_from(args: argparse.Namespace, cls) -> dict:
    """The values of the options `_setting` added for settings class `cls`, by field."""
    return {field: getattr(args, dest) for dest, c, field in args._settings_options if c is cls}


def _into_arguments(parser: argparse.ArgumentParser, to_help: str) -> None:
    """The options of a command that labels frozen structures into a dataset, resumably."""
    parser.add_argument("--to", required=True, help=to_help)
    parser.add_argument("--output", required=True, help="work directory (a rerun resumes there)")
    parser.add_argument("--launchpad", help="LaunchPad file of the store (db:NAME datasets)")


def _labelling_arguments(lb: argparse.ArgumentParser) -> None:
    """The options of `label`, `relabel` and `ev-set`: most mirror the labelling settings."""
    from nequix_fw.settings import LabellingSettings

    for field in (
        "backend",
        "cp2k_cmd",
        "cp2k_template",
        "vasp_cmd",
        "vasp_inputs",
        "vasp_input_set",
        "vasp_psp_dir",
        "cp2k_input_set",
        "command",
        "calculator",
    ):
        _setting(lb, LabellingSettings, field)
    _setting(lb, LabellingSettings, "min_distance_A", "--min-distance")
    _setting(lb, LabellingSettings, "timeout_s", "--timeout")
    lb.add_argument("--fworker", help="FireWorks worker file whose env fills >>key<< values")
    lb.add_argument("--calculator-params", help="calculator keywords as JSON")
    _config(lb, LabellingSettings)
    lb.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nequix-fw", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"nequix-fw {__version__}")
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="what the stages log to stderr (info: what a long run did)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_, arguments, handler) in _COMMANDS.items():
        parser = sub.add_parser(name, help=help_)
        arguments(parser)
        parser.set_defaults(func=handler)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("nequix_fw")
    logger.addHandler(handler)
    logger.setLevel(args.log_level.upper())
    try:
        return args.func(args)
    except NequixFWError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"error: interrupted (Ctrl-C): {args.command} stopped before it finished",
            file=sys.stderr,
        )
        return 130
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
