"""Scale: wall time and peak memory of every stage apart from the model itself, against the
size of the training set (N) and of the candidate set (C).

Data: EMT-labelled, rattled and strained fcc Cu-Ni cells of 32 atoms (`--atoms 108` for
3x3x3 cells), generated once into `--workdir` and reused. The candidates' ensemble results are
two "models" whose forces are EMT's plus independent Gaussian noise (0.05 eV/Å per component)
and whose energies differ likewise, with nequix-mp-1's cutoff of 6 Å, so that each record keeps
its structure's geometry descriptor, computed from the models' graph, as run-ensemble's do. The
model's own cost is not measured here (see bench_ensemble.py), the results file and what reads
it are. Every stage runs as its own
process (`nequix-fw ...` where a command exists), on a local MongoDB server started for the
run, and reports its wall time and peak RSS:

- ingest: `update-dataset` of the N structures into an empty `db:` dataset, then of 1,000 more;
- select: `select --diverse --max-selected 1000 --exclude-dataset db:` against the N
  (with `--quotas`, also with max_per_composition quotas);
- read: the training set read up to train-ensemble's first step (structures, labels, graphs);
- results: writing and reading back the results file of C candidates;
- export: `export` of the dataset;
- campaign-status: a campaign of 50 iterations, read back from MongoDB.

Each stage's log-log slope against N (or C) is printed under the table. `--stages` measures
some stages only; select, read and export then use the datasets an earlier ingest left
on the server in `--workdir`.

Usage: python benchmarks/bench_scale.py [--n 1000 10000] [--c 1000 10000] [--atoms 32]
           [--models 2] [--workdir bench_scale_data] [--quotas] [--stages results select ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nequix_fw.results import arrays_path

STAGES = ["results", "ingest", "select", "read", "export", "status"]
BIN = Path(sys.executable).parent
NFW = str(BIN / "nequix-fw")
#: The stand-in models' cutoff (Å): nequix-mp-1's.
CUTOFF = 6.0
#: Runs `argv` and prints its wall time (s) and peak RSS (MB) as JSON on the last line.
MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
if p.returncode:
    sys.exit(p.stderr[-3000:] or p.stdout[-3000:])
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(p.stdout[-500:]); print(json.dumps({"wall_s": wall, "rss_MB": rss}))
"""


def measure(*argv, cwd: Path) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, argv)], cwd=cwd, capture_output=True, text=True
    )
    if p.returncode:
        raise SystemExit(f"{argv[:3]} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def emt_cells(n: int, seed: int, atoms: int) -> list:
    """`n` EMT-labelled Cu-Ni cells of `atoms` atoms (32 or 108)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    reps = {32: (2, 2, 2), 108: (3, 3, 3)}[atoms]
    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=3.58, cubic=True).repeat(reps)
    calc = EMT()
    out = []
    for _ in range(n):
        a = base.copy()
        a.numbers[rng.random(len(a)) < rng.uniform(0, 0.5)] = 28
        strain = np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))
        a.set_cell(a.cell[:] @ (strain + strain.T) / 2, scale_atoms=True)
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        a.calc = calc
        labels = dict(energy=a.get_potential_energy(), forces=a.get_forces(), stress=a.get_stress())
        a.calc = SinglePointCalculator(a, **labels)
        out.append(a)
    return out


def data_file(workdir: Path, name: str, n: int, seed: int, atoms: int) -> Path:
    import ase.io

    path = workdir / f"{name}_{n}_{atoms}.extxyz"
    if not path.is_file():
        t = time.perf_counter()
        ase.io.write(path, emt_cells(n, seed, atoms))
        print(f"  (made {path.name} in {time.perf_counter() - t:.0f} s)", flush=True)
    return path


def results_file(workdir: Path, c: int, atoms: int, n_models: int = 2) -> Path:
    """Ensemble results of C candidates: `n_models` 'models', EMT + noise (see the module
    doc), in the default format. The 'models' have nequix-mp-1's cutoff, 6 Å: each record
    keeps its structure's geometry, from the graph the models would use, as run-ensemble's
    do."""
    import ase.io
    from nequix.data import atomic_numbers_to_indices

    from nequix_fw.descriptors import graph_geometry
    from nequix_fw.ensemble import EnsembleRecord, Prediction
    from nequix_fw.graphs import build_graph
    from nequix_fw.results import ResultsWriter
    from nequix_fw.structures import Frame, structure_id
    from nequix_fw.uncertainty import ensemble_metrics

    path = workdir / f"results_{c}_{atoms}_{n_models}.json"
    if path.is_file():
        return path
    source = data_file(workdir, "candidates", c, 2, atoms)
    rng = np.random.default_rng(3)
    models = [
        {
            "name": f"m{k}",
            "path": f"m{k}.nqx",
            "sha256": f"{k}" * 64,
            "backend": "jax",
            "elements": ["Cu", "Ni"],
            "cutoff": CUTOFF,
            "n_params": 0,
        }
        for k in range(n_models)
    ]
    index = atomic_numbers_to_indices([28, 29])
    with ResultsWriter(path, models, {"store_per_model": True}) as w:
        for i, a in enumerate(ase.io.iread(source, ":")):
            e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
            pred = Prediction(
                energies=e + rng.normal(0, 0.01 * len(a) ** 0.5, n_models),
                forces=f + rng.normal(0, 0.05 * rng.uniform(0.2, 3), (n_models, *f.shape)),
                stresses=s + rng.normal(0, 1e-4, (n_models, 6)),
            )
            frame = Frame(a, str(source), i)
            metrics = ensemble_metrics(pred.energies, pred.forces, pred.stresses)
            geo = graph_geometry(a, build_graph(a, index, CUTOFF), CUTOFF)
            w.write(EnsembleRecord(frame, structure_id(a), pred, metrics, "ok", geometry=geo))
    return path


READ_TRAINING = """
import sys, time
from nequix.data import atomic_numbers_to_indices
from nequix_fw.dataset import read_labelled
from nequix_fw.store import Store
from nequix_fw.training import _graph_dict
t = time.perf_counter()
data = read_labelled([sys.argv[1]], Store(sys.argv[2]))
index = atomic_numbers_to_indices([28, 29])
graphs = [_graph_dict(d, index, 5.0) for d in data]
print(len(graphs), "graphs in", round(time.perf_counter() - t, 1), "s")
"""

READ_RESULTS = """
import sys
from nequix_fw.results import read_results
header, records = read_results(sys.argv[1])
print(sum(1 for _ in records), "records")
"""

WRITE_RESULTS = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from bench_scale import results_file
print(results_file(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])))
"""

CAMPAIGN = """
import json, sys
from pathlib import Path
from nequix_fw.store import CampaignStore
d = Path(sys.argv[1]); d.mkdir(exist_ok=True)
store = CampaignStore(sys.argv[2], "scale")
its = []
for k in range(50):
    rec = {"iteration": k, "n_candidates": 1000, "n_selected": 200, "n_labelled": 200,
           "dataset_size": 200 * (k + 1), "selection_method": "uncertainty",
           "validation": {"force_rmse_eV_per_A": 0.05, "energy_rmse_meV_per_atom": 3.0},
           "calibration": {"conformal_factor": 2.0}}
    store.save_iteration(k, rec); its.append(rec)
(d / "campaign.json").write_text(json.dumps({"name": "scale", "launchpad": sys.argv[2],
                                             "iterations": its}))
"""


def slope(sizes: list[int], values: list[float]) -> str:
    if len(sizes) < 2 or min(values) <= 0:
        return "-"
    return f"{np.polyfit(np.log(sizes), np.log(values), 1)[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000], help="training sets")
    ap.add_argument("--c", type=int, nargs="+", default=[1000, 10000], help="candidate sets")
    ap.add_argument("--atoms", type=int, default=32, choices=[32, 108])
    ap.add_argument("--workdir", type=Path, default=Path("bench_scale_data"))
    ap.add_argument("--models", type=int, default=2, help="models in the results file")
    ap.add_argument("--quotas", action="store_true", help="also select with quotas")
    ap.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=STAGES,
        help="what to measure (results are made for select when not measured)",
    )
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    server = work / "db"
    subprocess.run(
        [
            NFW,
            "db",
            "start",
            "--dir",
            server,
            "--launchpad",
            work / "lp.yaml",
            "--name",
            "bench_scale",
        ],
        check=True,
        capture_output=True,
    )
    lp = str(work / "lp.yaml")
    rows: list[tuple[str, str, int, dict]] = []

    def record(stage: str, axis: str, size: int, m: dict) -> None:
        rows.append((stage, axis, size, m))
        print(
            f"{stage:<28} {axis}={size:<7} {m['wall_s']:8.1f} s {m['rss_MB']:8.0f} MB", flush=True
        )

    try:
        from nequix_fw.store import COLLECTION, DATASETS, launchpad_db

        docs = launchpad_db(lp)[COLLECTION]
        extra = data_file(work, "extra", 1000, 9, args.atoms)
        c_max = max(args.c)
        results = {}
        for c in args.c:
            data_file(work, "candidates", c, 2, args.atoms)  # made before, not timed
            m = measure(
                sys.executable,
                "-c",
                WRITE_RESULTS,
                work,
                c,
                Path(__file__).parent,
                args.atoms,
                args.models,
                cwd=work,
            )
            results[c] = work / f"results_{c}_{args.atoms}_{args.models}.json"
            if "results" not in args.stages:
                continue
            record("results: write", "C", c, m)
            m2 = measure(sys.executable, "-c", READ_RESULTS, results[c], cwd=work)
            record("results: read", "C", c, m2)
            size = sum(
                p.stat().st_size for p in (results[c], arrays_path(results[c])) if p.exists()
            )
            print(f"  results of {c} ({args.models} models): {size / 2**20:.0f} MB", flush=True)
        for n in args.n:
            train = data_file(work, "train", n, 1, args.atoms)
            name = f"scale_{n}_{args.atoms}"
            ds = f"db:{name}"
            if "ingest" in args.stages:
                docs.delete_many({"dataset": name})
                docs.database[DATASETS].delete_one({"_id": name})
                for stage, new in (("ingest (empty dataset)", train), ("ingest 1000 more", extra)):
                    argv = ["update-dataset", "--new", new, "--dataset", ds, "--launchpad", lp]
                    record(stage, "N", n, measure(NFW, *argv, cwd=work))
            sel = [
                "select",
                "--ensemble",
                results[c_max],
                "--lo",
                "0.05",
                "--diverse",
                "--max-selected",
                "1000",
                "--exclude-dataset",
                ds,
                "--launchpad",
                lp,
            ]
            if "select" in args.stages:
                out = measure(NFW, *sel, "--output", work / "sel", cwd=work)
                record(f"select (C={c_max})", "N", n, out)
            if "select" in args.stages and args.quotas:
                (work / "quotas.yaml").write_text("select: {max_per_composition: 3}\n")
                quotas = ["--config", work / "quotas.yaml", "--output", work / "selq"]
                record(f"select, quotas (C={c_max})", "N", n, measure(NFW, *sel, *quotas, cwd=work))
            if "read" in args.stages:
                out = measure(sys.executable, "-c", READ_TRAINING, ds, lp, cwd=work)
                record("read to the first step", "N", n, out)
            if "export" in args.stages:
                argv = ["export", "--dataset", ds, "--output", work / "export.extxyz"]
                record("export", "N", n, measure(NFW, *argv, "--launchpad", lp, cwd=work))
        n_max = max(args.n)
        for c in args.c if "select" in args.stages else []:
            sel = [
                "select",
                "--ensemble",
                results[c],
                "--lo",
                "0.05",
                "--diverse",
                "--max-selected",
                "1000",
                "--exclude-dataset",
                f"db:scale_{n_max}_{args.atoms}",
                "--launchpad",
                lp,
            ]
            record(
                f"select (N={n_max})",
                "C",
                c,
                measure(NFW, *sel, "--output", work / "sel", cwd=work),
            )
        if "status" in args.stages:
            subprocess.run([sys.executable, "-c", CAMPAIGN, work / "campaign", lp], check=True)
            out = measure(NFW, "campaign-status", work / "campaign", cwd=work)
            record("campaign-status", "iterations", 50, out)
    finally:
        subprocess.run([NFW, "db", "stop", "--dir", server], capture_output=True)

    print(f"\n{args.atoms}-atom cells; wall time (s) and peak RSS (MB) per size")
    stages = list(dict.fromkeys((s, a) for s, a, _, _ in rows))
    for stage, axis in stages:
        got = [(size, m) for s, a, size, m in rows if (s, a) == (stage, axis)]
        sizes = [size for size, _ in got]
        cells = "  ".join(
            f"{axis}={size}: {m['wall_s']:.1f} s, {m['rss_MB']:.0f} MB" for size, m in got
        )
        print(f"| {stage} | {cells} | slope {slope(sizes, [m['wall_s'] for _, m in got])} |")


if __name__ == "__main__":
    main()
