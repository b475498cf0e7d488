"""Fine-tuning nequix-mp-1: learning rate, stress weight, frozen layers, and what it forgets.
(issue 36)

One member fine-tuned per arm on the labelled Cu-Au set of benchmarks/uncertainty.py (8-atom
fcc cells with 0-2 Au: rattled, strained, MD at 300 and 600 K; EMT labels with stresses), the
same split and seed for every arm. Per arm:

- accuracy on the uncertainty benchmark's test kinds (E-V cells, elastic strains, phonon
  displacements, 900 K MD, vacancies, other compositions): force RMSE (eV/Å), stress RMSE
  (GPa), and the bulk modulus of ideal fcc Cu (Birch-Murnaghan on +-6 % volume) against EMT's;
- forgetting (`nequix_fw.forgetting`): force drift from nequix-mp-1 on the foundation-domain
  set (Cu and Au in other prototypes; Ni, Zn, Ag, Pt), error against EMT where EMT labels, as a
  ratio to nequix-mp-1's own, and the repulsive-wall check;
- cost: the mean epoch time after the first (which compiles), the best epoch, the epochs run.

Arms (`--arms`): ``old`` (the from-scratch defaults: 5e-3, no stress), ``lr1e-3``, ``sw3000``
(1e-3, stress weight 3000), ``default`` (what `finetune_from` chooses now: 1e-3, stress
weight auto), ``freeze2`` (that, the first 2 of 4 interaction layers frozen), ``backbone``
(that, only the readout and reference energies trained). The row ``foundation`` is
nequix-mp-1 itself, with its reference energies shifted to the data.

Usage: python benchmarks/finetuning.py [--arms ...] [--epochs 30] [--output DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.units import GPa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uncertainty import KINDS, datasets  # noqa: E402  (the same labelled sets)

from nequix_fw.dataset import read_labelled  # noqa: E402
from nequix_fw.ensemble import Ensemble  # noqa: E402
from nequix_fw.forgetting import forgetting_report  # noqa: E402
from nequix_fw.settings import TrainingSettings  # noqa: E402
from nequix_fw.training import train_ensemble  # noqa: E402
from nequix_fw.validation import birch_murnaghan  # noqa: E402

FOUNDATION = "nequix-mp-1"
ARMS = {
    "old": dict(learning_rate=5e-3, stress_weight=0.0),
    "lr1e-3": dict(learning_rate=1e-3, stress_weight=0.0),
    "sw3000": dict(learning_rate=1e-3, stress_weight=3000.0),
    "default": {},
    "freeze2": dict(freeze=2),
    "backbone": dict(freeze="backbone"),
}


def _bulk_modulus(predict_energy) -> float:
    cu = bulk("Cu", "fcc", a=3.61, cubic=True)
    volumes, energies = [], []
    for s in np.linspace(-0.06, 0.06, 7):
        a = cu.copy()
        a.set_cell(cu.cell * (1 + s) ** (1 / 3), scale_atoms=True)
        volumes.append(a.get_volume())
        energies.append(predict_energy(a))
    return birch_murnaghan(volumes, energies)["bulk_modulus_GPa"]


def _emt_energy(a) -> float:
    a = a.copy()
    a.calc = EMT()
    return a.get_potential_energy()


def _accuracy(models: list[str], paths: dict) -> dict:
    ens = Ensemble.from_specs(models)
    test = [d for kind in KINDS if kind in paths for d in read_labelled([paths[kind]])]
    preds = ens.predict([d.frame.atoms for d in test])
    df = np.concatenate(
        [(p.forces.mean(0) - d.forces).ravel() for p, d in zip(preds, test, strict=True)]
    )
    ds = np.concatenate(
        [
            (p.stresses.mean(0) - d.stress)
            for p, d in zip(preds, test, strict=True)
            if d.stress is not None
        ]
    )
    b0 = _bulk_modulus(lambda a: float(ens.predict([a])[0].energies.mean()))
    b0_ref = _bulk_modulus(_emt_energy)
    return {
        "force_rmse_eV_per_A": float(np.sqrt(np.mean(df**2))),
        "stress_rmse_GPa": float(np.sqrt(np.mean(ds**2)) / GPa),
        "bulk_modulus_GPa": b0,
        "bulk_modulus_error_percent": 100 * (b0 - b0_ref) / b0_ref,
        "forgetting": forgetting_report(ens, FOUNDATION, [29, 79], EMT()),
    }


def run(arm: str, paths: dict, out: Path, epochs: int) -> dict:
    d = out / "runs" / arm
    base = dict(n_models=1, uncertainty="ensemble", epochs=epochs, patience=10, batch_size=4)
    base.update(save_torch=False, seed=0)
    if arm == "foundation":  # forces, B0 and the drift do not see its reference energies
        result = {"arm": arm, "settings": {"learning_rate": 0, "stress_weight": 0, "freeze": "-"}}
        result.update(train_s=0.0, epoch_s=0.0, epochs_run=0, best_epoch=0)
        result.update(_accuracy([FOUNDATION], paths))
    else:
        t0 = time.perf_counter()
        s = TrainingSettings(**base, **ARMS[arm])
        (meta,) = train_ensemble(
            [paths["train"]], d, s, finetune_from=FOUNDATION, overwrite=True, progress=False
        )
        train_s = time.perf_counter() - t0
        with open(d / "member_0_log.csv") as f:
            rows = list(csv.DictReader(f))
        epoch_s = [float(r["epoch_s"]) for r in rows[1:]] or [float(rows[0]["epoch_s"])]
        result = {
            "arm": arm,
            "settings": {
                k: meta["settings"][k] for k in ("learning_rate", "stress_weight", "freeze")
            },
            "train_s": train_s,
            "epoch_s": float(np.mean(epoch_s)),
            "epochs_run": meta["epochs_run"],
            "best_epoch": meta["best_epoch"],
            **_accuracy([str(d / "member_0.nqx")], paths),
        }
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{arm}.json").write_text(json.dumps(result, indent=1))
    f = result["forgetting"]["domain"]
    print(
        f"{arm}: forces {result['force_rmse_eV_per_A']:.3f} eV/Å, stress "
        f"{result['stress_rmse_GPa']:.2f} GPa, B0 {result['bulk_modulus_error_percent']:+.1f} %, "
        f"drift {f['campaign elements']['force_drift_rmse_eV_per_A']:.3f} / "
        f"{f['other elements']['force_drift_rmse_eV_per_A']:.3f} eV/Å, wall "
        f"{result['forgetting']['wall']['passed']}, {result['epoch_s']:.1f} s/epoch",
        flush=True,
    )
    return result


def report(results: list[dict]) -> None:
    print(
        "\n| arm | lr | stress weight | freeze | force RMSE (eV/Å) | stress RMSE (GPa) | B0 error "
        "| drift, Cu/Au elsewhere (eV/Å) | error vs EMT / mp-1's there | drift, other elements "
        "(eV/Å) | error vs EMT / mp-1's there | wall | s/epoch | best epoch / run |"
    )
    print("| --- " + "| ---: " * 11 + "| --- | ---: | ---: |")
    for r in results:
        own = r["forgetting"]["domain"]["campaign elements"]
        other = r["forgetting"]["domain"]["other elements"]
        st = r["settings"]
        print(
            f"| {r['arm']} | {st['learning_rate']:g} | {st['stress_weight']:g} | {st['freeze']} | "
            f"{r['force_rmse_eV_per_A']:.3f} | {r['stress_rmse_GPa']:.2f} | "
            f"{r['bulk_modulus_error_percent']:+.1f} % | {own['force_drift_rmse_eV_per_A']:.3f} | "
            f"{own.get('error_ratio', float('nan')):.2f} | "
            f"{other['force_drift_rmse_eV_per_A']:.3f} | "
            f"{other.get('error_ratio', float('nan')):.2f} | "
            f"{'pass' if r['forgetting']['wall']['passed'] else 'FAIL'} | {r['epoch_s']:.1f} | "
            f"{r['best_epoch']} / {r['epochs_run']} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--arms", nargs="+", choices=["foundation", *ARMS], default=["foundation", *ARMS]
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--output", type=Path, default=Path("finetuning"))
    p.add_argument("--data", type=Path, help="an uncertainty benchmark's output (its data)")
    args = p.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    paths = datasets("cuau", "emt", args.data or args.output)
    results = [run(arm, paths, args.output, args.epochs) for arm in args.arms]
    (args.output / "finetuning.json").write_text(json.dumps(results, indent=1))
    report(results)


if __name__ == "__main__":
    main()
