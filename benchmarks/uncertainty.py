"""Which uncertainty knows where a fine-tuned (or from-scratch) ensemble is wrong? (issue 35)

Every method trains on the same labelled set (8-atom fcc Cu-Au cells with 0-2 Au: rattled,
mildly strained, and MD frames at 300 and 600 K) and is scored on a fixed test set the training
never sees, grouped by kind: E-V cells at +-6 % volume, elastic strains (tetragonal and shear,
1-3 %), phonon displacements (one atom by 0.03 Å), MD frames at 900 K (300 K hotter than
explored), vacancies, and other compositions (4-6 Au of 8). A calibration set from the training
distribution stands in for a campaign's validation set. The reference is EMT (ASE), or CP2K on
silicon (`--reference cp2k`: Si8 cells, vacancies and the same strains; no other composition).

Methods (`nequix_fw` settings, `--methods`):

- ``splits``: 4 members, own split and seed each (the default before issue 35);
- ``seeds``: 4 members, one split, seeds only; ``bootstrap``: own split and a bootstrap resample;
- ``readout`` / ``last_layer``: fine-tuned members with a re-initialised readout / last layer;
- ``committee``: members fine-tuned alternately from nequix-mp-1 and nequix-oam-1;
- ``foundation``: 3 fine-tuned members plus the foundation model itself, frozen;
- ``llpr``: 1 member with 16 LLPR heads (`train_ensemble.uncertainty: llpr`);
- ``llpr4``: the default 4 members, each with LLPR heads (spread of members and heads).

``llpr`` and ``llpr4`` are the ``splits`` run's members 0 (resp. 0-3), with heads fitted on each
member's own split as `train_ensemble` fits them (training them again would give the same
members: same seeds and splits); their training time is those members' plus the fit.

Per method and seed: Spearman(max_force_dev, true max-atom force error of the mean), ROC AUC
for the worst quarter of the test frames, the share of worst-quarter frames called accurate
(max_force_dev below lo = their error threshold / the calibration set's conformal factor, as
`select.lo: auto` does), the median of calibrated uncertainty (scale x max_force_dev) over the
median error, and the training and evaluation wall times. Results go to `--output`
(uncertainty.json, one JSON per run in runs/, uncertainty.png: uncertainty against error).

Usage: python benchmarks/uncertainty.py [--modes finetune scratch] [--seeds 0 1 2]
       [--methods ...] [--reference emt|cp2k] [--output DIR] [--report JSON...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta
from scipy.stats import spearmanr

from nequix_fw.dataset import read_labelled
from nequix_fw.ensemble import Ensemble
from nequix_fw.exploration import distorted_copies
from nequix_fw.llpr import fit_llpr
from nequix_fw.models import load_model
from nequix_fw.settings import TrainingSettings
from nequix_fw.training import split_members, train_ensemble
from nequix_fw.uncertainty import atomic_force_deviation, calibrate, heads_path
from nequix_fw.validation import roc_auc

FOUNDATION = "nequix-mp-1"
OTHER_FOUNDATION = "nequix-oam-1"
METHODS = {
    "splits": {},
    "seeds": {"strategy": "seeds"},
    "bootstrap": {"strategy": "bootstrap"},
    "readout": {"reinitialise": "readout"},
    "last_layer": {"reinitialise": "last_layer"},
    "committee": {"_finetune_from": [FOUNDATION, OTHER_FOUNDATION]},
    "foundation": {"n_models": 3, "foundation_member": True},
    "llpr": {"n_models": 1, "uncertainty": "llpr"},
    "llpr4": {"uncertainty": "llpr"},
}
FINETUNE_ONLY = {"readout", "last_layer", "committee", "foundation"}
KINDS = ("eos", "elastic", "phonon", "hot_md", "vacancy", "composition")


# -- data -----------------------------------------------------------------------------------------


def _ideal(system: str, n_au: int, rng) -> Atoms:
    if system == "si":
        return bulk("Si", "diamond", a=5.47, cubic=True)
    a = bulk("Cu", "fcc", a=3.61 + 0.06 * n_au, cubic=True).repeat((2, 1, 1))
    a.numbers[rng.choice(len(a), n_au, replace=False)] = 79
    return a


def _md(start: Atoms, temperature: float, n: int, rng, calc, every: int = 25) -> list[Atoms]:
    a = start.copy()
    a.calc = calc
    thermalize_momenta(a, temperature, rng=rng)
    dyn = Langevin(a, 2 * units.fs, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False)
    out = []
    for _ in range(n):
        dyn.run(every)
        out.append(Atoms(a.numbers, a.positions, cell=a.cell, pbc=True))
    return out


def _strained(a: Atoms, eps: np.ndarray) -> Atoms:
    b = a.copy()
    b.set_cell(a.cell @ (np.eye(3) + eps), scale_atoms=True)
    return b


def structures(system: str, kind: str, seed: int) -> list[Atoms]:
    """Unlabelled structures of `kind` (train, calibration or a test kind)."""
    rng = np.random.default_rng(seed)
    md_calc = EMT() if system == "cuau" else None  # MD of silicon runs on the foundation model
    if md_calc is None:
        from nequix.calculator import NequixCalculator

        md_calc = NequixCalculator(FOUNDATION, backend="jax", use_kernel=False)
    au = (lambda: int(rng.integers(0, 3))) if system == "cuau" else (lambda: 0)
    out: list[Atoms] = []
    if kind in ("train", "calibration"):
        n = 6 if kind == "train" else 4
        for _ in range(n):
            out += distorted_copies(
                _ideal(system, au(), rng),
                1,
                rattle_std=0.08,
                strain_max=0.01,
                seed=int(rng.integers(1 << 30)),
            )
        for t in (300, 600):
            out += _md(_ideal(system, au(), rng), t, n, rng, md_calc)
    elif kind == "eos":
        for s in (-0.06, -0.04, 0.04, 0.06, -0.05, 0.05):
            a = _strained(_ideal(system, au(), rng), np.eye(3) * ((1 + s) ** (1 / 3) - 1))
            a.rattle(0.02, seed=int(rng.integers(1 << 30)))
            out.append(a)
    elif kind == "elastic":  # rattled a little: an ideal strained cell has no forces
        for s in (0.01, 0.02, 0.03):
            shear = np.zeros((3, 3))
            shear[0, 1] = shear[1, 0] = s
            for eps in (np.diag([s, -s / 2, -s / 2]), shear):
                a = _strained(_ideal(system, au(), rng), eps)
                a.rattle(0.02, seed=int(rng.integers(1 << 30)))
                out.append(a)
    elif kind == "phonon":
        for i in range(6):
            a = _ideal(system, au(), rng)
            a.positions[i % len(a), i % 3] += 0.03
            out.append(a)
    elif kind == "hot_md":
        for _ in range(2):
            out += _md(_ideal(system, au(), rng), 900, 3, rng, md_calc)
    elif kind == "vacancy":
        for _ in range(3):
            a = _ideal(system, au(), rng)
            del a[int(rng.integers(len(a)))]
            out += _md(a, 300, 2, rng, md_calc)
    elif kind == "composition":
        if system == "si":
            return []
        for _ in range(6):
            a = _ideal(system, int(rng.integers(4, 7)), rng)
            a.rattle(0.06, seed=int(rng.integers(1 << 30)))
            out.append(a)
    return out


def _label(frames: list[Atoms], reference: str, workdir: Path) -> list[Atoms]:
    if reference == "emt":
        out = []
        for a in frames:
            a = a.copy()
            a.calc = EMT()
            labels = dict(
                energy=a.get_potential_energy(), forces=a.get_forces(), stress=a.get_stress()
            )
            a.calc = SinglePointCalculator(a, **labels)
            out.append(a)
        return out
    from nequix_fw.labelling import label_structures, make_backend  # CP2K, as a campaign does
    from nequix_fw.settings import LabellingSettings, load_settings

    src = workdir / "unlabelled.extxyz"
    ase.io.write(src, frames)
    preset = Path(__file__).resolve().parents[1] / "workflows" / "cp2k_si.yaml"
    settings = load_settings(preset, LabellingSettings)
    label_structures(src, workdir / "cp2k", make_backend(settings), settings, progress=True)
    out = []
    for d in read_labelled([workdir / "cp2k"]):
        a = d.frame.atoms.copy()
        a.calc = SinglePointCalculator(a, energy=d.energy, forces=d.forces, stress=d.stress)
        out.append(a)
    return out


def datasets(system: str, reference: str, out: Path) -> dict[str, Path]:
    """The labelled training, calibration and test sets (made once, then read back)."""
    data = out / f"data_{system}_{reference}"
    data.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, kind in enumerate(("train", "calibration", *KINDS)):
        path = data / f"{kind}.extxyz"
        if not path.exists():
            frames = structures(system, kind, 1000 + i)
            if not frames:
                continue
            work = data / f"work_{kind}"
            work.mkdir(exist_ok=True)
            ase.io.write(path, _label(frames, reference, work))
        paths[kind] = path
    return paths


# -- one run --------------------------------------------------------------------------------------


def settings_for(mode: str, method: str, seed: int, epochs: int) -> tuple[TrainingSettings, list]:
    spec = dict(METHODS[method])
    finetune = spec.pop("_finetune_from", [FOUNDATION]) if mode == "finetune" else None
    base = dict(n_models=4, seed=seed, save_torch=False, patience=None, batch_size=4)
    if mode == "finetune":
        base.update(epochs=epochs, learning_rate=1e-3)
    else:
        base.update(
            epochs=4 * epochs,
            architecture={"hidden_irreps": "32x0e + 16x1o", "n_layers": 2, "lmax": 2},
        )
    return TrainingSettings(**{**base, **spec}), finetune


def _predict(models: list[str], path: Path) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """max_force_dev and the mean's true max-atom force error per structure, their kinds, and
    the wall time of a second (compiled) evaluation."""
    data = read_labelled([path])
    ens = Ensemble.from_specs(models)
    atoms = [d.frame.atoms for d in data]
    ens.predict(atoms)
    t = time.perf_counter()
    preds = ens.predict(atoms)
    seconds = time.perf_counter() - t
    dev = np.array([atomic_force_deviation(p.forces).max() for p in preds])
    err = np.array(
        [
            np.linalg.norm(p.forces.mean(0) - d.forces, axis=1).max()
            for p, d in zip(preds, data, strict=True)
        ]
    )
    return dev, err, [path.stem] * len(data), seconds


def _with_heads(settings: TrainingSettings, splits_dir: Path, models_dir: Path, paths) -> list:
    """The `splits` run's first `settings.n_models` members, with LLPR heads fitted on each
    member's own split (as `train_ensemble` with `uncertainty: llpr` fits them)."""
    data = read_labelled([paths["train"]])
    splits = split_members(len(data), settings)
    models_dir.mkdir(parents=True, exist_ok=True)
    metas = []
    for k, (train, valid) in enumerate(splits):
        meta = json.loads((splits_dir / f"member_{k}.json").read_text())
        shutil.copy(splits_dir / f"member_{k}.nqx", models_dir / f"member_{k}.nqx")
        t = time.perf_counter()
        heads = fit_llpr(
            load_model(models_dir / f"member_{k}.nqx"),
            [data[j] for j in train],
            [data[j] for j in valid],
            (settings.energy_weight, settings.force_weight, settings.stress_weight),
            settings.llpr_heads,
            seed=settings.seed + k,
        )
        heads.save(heads_path(models_dir / f"member_{k}.nqx"))
        fit_s = time.perf_counter() - t
        metas.append({"wall_time_s": meta["wall_time_s"] + fit_s, "llpr_fit_s": fit_s})
    return metas


def run(mode: str, method: str, seed: int, paths: dict, out: Path, epochs: int) -> dict:
    settings, finetune = settings_for(mode, method, seed, epochs)
    models_dir = out / "models" / f"{mode}_{method}_{seed}"
    t0 = time.perf_counter()
    if method in ("llpr", "llpr4"):
        splits_dir = out / "models" / f"{mode}_splits_{seed}"
        if not splits_dir.is_dir():  # a resumed run: its splits members were removed
            train_ensemble(
                [paths["train"]],
                splits_dir,
                settings_for(mode, "splits", seed, epochs)[0],
                finetune_from=finetune,
                progress=False,
            )
        metas = _with_heads(settings, splits_dir, models_dir, paths)
        train_s = sum(m["wall_time_s"] for m in metas)
    else:
        metas = train_ensemble(
            [paths["train"]],
            models_dir,
            settings,
            finetune_from=finetune,
            overwrite=True,
            progress=False,
        )
        train_s = time.perf_counter() - t0
    models = sorted(str(p) for p in models_dir.glob("member_*.nqx"))
    cal_dev, cal_err, _, _ = _predict(models, paths["calibration"])
    dev, err, kinds, eval_s = [], [], [], 0.0
    for kind in KINDS:
        if kind in paths:
            d, e, k, s = _predict(models, paths[kind])
            dev, err, kinds, eval_s = [*dev, *d], [*err, *e], [*kinds, *k], eval_s + s
    dev, err = np.array(dev), np.array(err)
    cal = calibrate(cal_dev, cal_err)
    worst = err > np.quantile(err, 0.75)
    lo = np.quantile(err, 0.75) / cal["conformal_factor"]
    return {
        "mode": mode,
        "method": method,
        "seed": seed,
        "n_members": len(models),
        "train_s": train_s,
        "member_train_s": [m["wall_time_s"] for m in metas],
        "llpr_fit_s": [m["llpr_fit_s"] for m in metas if "llpr_fit_s" in m],
        "eval_s": eval_s,
        "spearman": float(spearmanr(dev, err).statistic),
        "auroc_worst_quarter": roc_auc(dev, worst),
        "worst_called_accurate": float(np.mean(dev[worst] < lo)),
        "calibrated_ratio": float(np.median(cal["scale"] * dev) / np.median(err)),
        "calibration": cal,
        "force_rmse_test": float(np.sqrt(np.mean(err**2))),
        "max_force_dev": dev.tolist(),
        "max_force_error": err.tolist(),
        "kinds": kinds,
    }


# -- report ---------------------------------------------------------------------------------------


def _ms(values, digits: int = 2) -> str:
    """Mean ± standard deviation over the seeds."""
    v = np.array([x for x in values if x is not None], float)
    if not len(v):
        return "-"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"


def report(results: list[dict], out: Path) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["mode"], r["method"]), []).append(r)
    print(
        "| mode | method | members | seeds | Spearman | AUROC (worst quarter) | worst called "
        "accurate | calibrated median ratio | force RMSE of the mean (eV/Å) | train (s) | "
        "eval (s) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (mode, method), rs in sorted(groups.items()):
        print(
            f"| {mode} | {method} | {rs[0]['n_members']} | {len(rs)} | "
            f"{_ms(r['spearman'] for r in rs)} | {_ms(r['auroc_worst_quarter'] for r in rs)} | "
            f"{_ms(100 * r['worst_called_accurate'] for r in rs)} % | "
            f"{_ms(r['calibrated_ratio'] for r in rs)} | "
            f"{_ms((r['force_rmse_test'] for r in rs), 3)} | "
            f"{_ms((r['train_s'] for r in rs), 0)} | "
            f"{_ms(r['eval_s'] for r in rs)} |"
        )
    _plot(groups, out / "uncertainty.png")


def _plot(groups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(groups)
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    colours = dict(zip(KINDS, plt.cm.tab10.colors, strict=False))
    for ax, key in zip(axes.flat, keys, strict=False):
        r = groups[key][0]
        dev, err = np.array(r["max_force_dev"]), np.array(r["max_force_error"])
        for kind in KINDS:
            m = np.array(r["kinds"]) == kind
            if m.any():
                ax.scatter(dev[m], err[m], s=10, color=colours[kind], label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{key[0]} {key[1]} (seed {r['seed']}): ρ {r['spearman']:.2f}", fontsize=8)
        ax.set_xlabel("max_force_dev (eV/Å)", fontsize=7)
        ax.set_ylabel("max force error (eV/Å)", fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def cost(out: Path, n_heads: tuple[int, ...] = (8, 16, 32)) -> None:
    """Evaluation cost of LLPR heads against one model and a 4-member ensemble: `nequix-mp-1`
    on ten rattled 32-atom Cu cells, warm (each compiled once first)."""
    from nequix_fw.models import pretrained_dir

    cells = []
    for k in range(10):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
        a.rattle(0.05, seed=k)
        cells.append(a)
    d = out / "cost"
    d.mkdir(parents=True, exist_ok=True)
    mp1 = d / "member_0.nqx"
    shutil.copy(pretrained_dir() / f"{FOUNDATION}.nqx", mp1)
    model = load_model(mp1)
    fit_data = read_labelled([datasets("cuau", "emt", out)["train"]])

    def timed(ens: Ensemble, repeats: int = 3) -> float:
        ens.predict(cells)
        t = time.perf_counter()
        for _ in range(repeats):
            ens.predict(cells)
        return (time.perf_counter() - t) / repeats

    one = timed(Ensemble([model]))
    rows = [("1 model", one), ("4 models", timed(Ensemble([model] * 4)))]
    for k in n_heads:
        t = time.perf_counter()
        heads = fit_llpr(model, fit_data[:12], fit_data[12:], (300.0, 10.0, 0.0), k)
        fit_s = time.perf_counter() - t
        rows.append(
            (
                f"1 model + {k} LLPR heads (fit on 18 cells: {fit_s:.0f} s)",
                timed(Ensemble([model], heads=[heads])),
            )
        )
    print("| evaluation (10 x 32-atom Cu, nequix-mp-1) | wall (s) | x one model |")
    print("| --- | ---: | ---: |")
    for name, sec in rows:
        print(f"| {name} | {sec:.2f} | {sec / one:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["finetune", "scratch"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--reference", choices=["emt", "cp2k"], default="emt")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (scratch: 4x)")
    p.add_argument("--output", type=Path, default=Path("bench_uncertainty"))
    p.add_argument("--report", nargs="+", type=Path, help="report saved runs (JSON files)")
    p.add_argument("--keep-models", action="store_true", help="keep the trained members")
    p.add_argument("--cost", action="store_true", help="only the evaluation cost of the heads")
    args = p.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    if args.cost:
        cost(args.output)
        return
    if args.report:
        results = [json.loads(f.read_text()) for f in args.report]
        report(results, args.output)
        return
    system = "si" if args.reference == "cp2k" else "cuau"
    paths = datasets(system, args.reference, args.output)
    runs = args.output / "runs"
    runs.mkdir(exist_ok=True)
    results = []
    methods = sorted(args.methods, key=lambda m: m.startswith("llpr"))  # after splits
    if any(m.startswith("llpr") for m in methods) and "splits" not in methods:
        p.error("llpr and llpr4 take the splits run's members: run splits too")
    for seed in args.seeds:
        for mode in args.modes:
            for method in methods:
                if mode == "scratch" and method in FINETUNE_ONLY:
                    continue
                f = runs / f"{args.reference}_{mode}_{method}_{seed}.json"
                if f.exists():  # resumable: a finished run is read back
                    results.append(json.loads(f.read_text()))
                    continue
                r = run(mode, method, seed, paths, args.output, args.epochs)
                r["reference"] = args.reference
                f.write_text(json.dumps(r))
                results.append(r)
                print(
                    f"{mode} {method} seed {seed}: Spearman {r['spearman']:.2f}, AUROC "
                    f"{r['auroc_worst_quarter']:.2f}, called accurate "
                    f"{100 * r['worst_called_accurate']:.0f} %, ratio "
                    f"{r['calibrated_ratio']:.2f}, train {r['train_s']:.0f} s",
                    flush=True,
                )
            if not args.keep_models:
                for d in (args.output / "models").glob(f"{mode}_*_{seed}"):
                    shutil.rmtree(d)
    (args.output / "uncertainty.json").write_text(json.dumps(results))
    report(results, args.output)


if __name__ == "__main__":
    main()
