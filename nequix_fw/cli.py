"""`nequix-fw` command line: a thin layer over the stage functions.

User errors print one line (``error: ...``) and exit with code 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from nequix_fw import __version__
from nequix_fw.errors import NequixFWError, SettingsError


def _cmd_run_ensemble(args: argparse.Namespace) -> int:
    from nequix_fw.ensemble import run_ensemble
    from nequix_fw.settings import EnsembleSettings, load_settings

    settings = load_settings(
        args.config,
        EnsembleSettings,
        backend=args.backend,
        max_edges_per_batch=args.max_edges_per_batch,
        max_structures_per_batch=args.max_structures_per_batch,
        store_per_model=False if args.no_per_model else None,
    )
    summary = run_ensemble(
        args.models, args.structures, args.output, settings, progress=not args.no_progress
    )
    print(
        f"evaluated {summary['n_structures']} structures ({summary['n_atoms']} atoms) with "
        f"{len(args.models)} models; {summary['n_failed']} failed -> {args.output}"
    )
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from nequix_fw.selection import select_from_results
    from nequix_fw.settings import SelectionSettings, load_settings

    if args.threshold is not None and args.lo is not None:
        raise SettingsError("give --threshold or --lo, not both (--threshold is --lo)")
    lo = args.threshold if args.threshold is not None else args.lo
    settings = load_settings(
        args.config,
        SelectionSettings,
        lo=lo,
        hi=args.hi,
        max_selected=args.max_selected,
        diverse=True if args.diverse else None,
        min_distance=args.min_distance,
        format=args.format,
    )
    manifest = select_from_results(args.ensemble, args.output, settings)
    c = manifest["counts"]
    print(
        f"{c['accurate']} accurate, {c['candidate']} candidate, {c['failed']} failed; "
        f"selected {c['selected']} -> {args.output}"
    )
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nequix-fw", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"nequix-fw {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run-ensemble", help="evaluate structures with an ensemble of models")
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
    r.add_argument("--output", required=True, help="results JSON to write")
    r.add_argument("--config", help="settings YAML (section 'ensemble')")
    r.add_argument("--backend", choices=["jax", "torch"])
    r.add_argument("--max-edges-per-batch", type=int)
    r.add_argument("--max-structures-per-batch", type=int)
    r.add_argument(
        "--no-per-model",
        action="store_true",
        help="omit per-model energies/forces/stresses from the JSON",
    )
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_cmd_run_ensemble)

    s = sub.add_parser("select", help="select uncertain structures from ensemble results")
    s.add_argument("--ensemble", required=True, help="results JSON from run-ensemble")
    s.add_argument("--output", required=True, help="directory for selected structures")
    s.add_argument("--config", help="settings YAML (section 'selection')")
    s.add_argument("--threshold", type=float, help="same as --lo (eV/Å)")
    s.add_argument("--lo", type=float, help="lower trust level on max_force_dev (eV/Å)")
    s.add_argument("--hi", type=float, help="upper trust level (eV/Å); above: failed")
    s.add_argument("--max-selected", type=int, help="most structures selected")
    s.add_argument(
        "--diverse", action="store_true", help="farthest-point sampling instead of top uncertainty"
    )
    s.add_argument("--min-distance", type=float, help="minimum interatomic distance (Å)")
    s.add_argument("--format", choices=["vasp", "extxyz"])
    s.set_defaults(func=_cmd_select)

    m = sub.add_parser("model-info", help="print path, sha256, elements, cutoff, parameters")
    m.add_argument("models", nargs="+")
    m.add_argument("--full", action="store_true", help="include the architecture")
    m.set_defaults(func=_cmd_model_info)
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NequixFWError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
