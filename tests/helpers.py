"""What the tests share besides fixtures (those are in conftest.py): structures, labelled
sets, small architectures, preset inputs, the CP2K template, and a campaign run through
FireWorks commands. Tests import from here, never from one another."""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import yaml
from ase.build import bulk

NFW = str(Path(sys.executable).parent / "nequix-fw")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MP1 = SHARED / "models" / "nequix-mp-1.nqx"


def make_cells(n: int = 10, seed: int = 0, au_every: int = 3) -> list:
    """Rattled fcc Cu cells of 4-16 atoms, every `au_every`-th with one Au."""
    rng = np.random.default_rng(seed)
    cells = []
    for i in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1 + i % 2, 1 + (i // 2) % 2, 1))
        if au_every and i % au_every == 0:
            a.numbers[0] = 79
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        cells.append(a)
    return cells


def emt_labelled(n: int, seed: int, max_au: int = 4, rattle: float = 0.1) -> list:
    """Rattled/strained 16-atom fcc Cu cells with up to `max_au` Au, labelled by ASE's EMT."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    from nequix_fw.exploration import distorted_copies

    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    out = []
    for a in distorted_copies(base, n, rattle_std=rattle, strain_max=0.03, seed=seed):
        a.numbers[rng.choice(len(a), size=rng.integers(0, max_au + 1), replace=False)] = 79
        a.calc = EMT()
        labels = dict(energy=a.get_potential_energy(), forces=a.get_forces(), stress=a.get_stress())
        a.calc = SinglePointCalculator(a, **labels)
        out.append(a)
    return out


TINY_ARCH = {"hidden_irreps": "16x0e + 8x1o", "n_layers": 2, "lmax": 1, "radial_mlp_size": 16}


def preset_inputs(d: Path, element: str) -> None:
    """initial_structures/, candidates/ and validation_set/ for a preset run in `d` (and the
    property checks' si8_ideal.vasp for silicon)."""
    for sub in ("initial_structures", "candidates", "validation_set"):
        (d / sub).mkdir()
    if element in ("Si", "SiC"):
        ideal = {"Si": ("diamond", 5.47), "SiC": ("zincblende", 4.38)}[element]
        cells = [bulk(element, ideal[0], a=ideal[1], cubic=True) for _ in range(3)]
        for k, a in enumerate(cells):
            a.rattle(0.05, seed=k)
        ase.io.write(d / "initial_structures" / "cells.extxyz", cells)
        ase.io.write(d / "validation_set" / "any.extxyz", emt_labelled(2, seed=1))  # any labels
        ideal_cell = bulk(element, ideal[0], a=ideal[1], cubic=True)
        ase.io.write(d / f"{element.lower()}8_ideal.vasp", ideal_cell, format="vasp")
    else:
        ase.io.write(d / "initial_structures" / "cells.extxyz", make_cells(5, seed=3))
        ase.io.write(d / "candidates" / "pool.extxyz", make_cells(4, seed=5))
        ase.io.write(d / "validation_set" / "test.extxyz", emt_labelled(4, seed=9))


# -- CP2K ---------------------------------------------------------------------------------------

TEMPLATE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "cp2k" / "si8_pbe_energy_force.inp"
)

#: Diagonalisation with Broyden mixing and Fermi-Dirac smearing: 9 SCF steps for Si8 here, where
#: the shared input's OT needs over 100 (5 s instead of 45 s a run; the same energy to 1e-6 Ha).
SCF = """    &SCF
      SCF_GUESS ATOMIC
      EPS_SCF 1.0E-5
      MAX_SCF 100
      ADDED_MOS 8
      &DIAGONALIZATION
        ALGORITHM STANDARD
      &END DIAGONALIZATION
      &MIXING
        METHOD BROYDEN_MIXING
        ALPHA 0.4
      &END MIXING
      &SMEAR ON
        METHOD FERMI_DIRAC
        ELECTRONIC_TEMPERATURE [K] 300
      &END SMEAR
    &END SCF"""


def quick_cp2k_template(path: Path) -> Path:
    """The shared Si8 PBE input with a smaller cutoff (150 Ry) and the faster SCF, at `path`."""
    text = TEMPLATE.read_text().replace("CUTOFF 300", "CUTOFF 150")
    scf = text[text.index("    &SCF") : text.index("    &END SCF") + len("    &END SCF")]
    path.write_text(text.replace(scf, SCF))
    return path


# -- a campaign through FireWorks' commands ----------------------------------------------------

BIN = Path(sys.executable).parent

SETTINGS = """
campaign:
  name: {name}
  directory: run
  initial_structures: initial.extxyz
  testset: [testset.extxyz]
  max_iterations: 2
train_ensemble:
  n_models: 2
  epochs: ">>train_epochs<<"
  batch_size: 4
  architecture: {{hidden_irreps: "8x0e + 4x1o", n_layers: 1, lmax: 1, radial_mlp_size: 8}}
label:
  backend: ase
  calculator: ">>reference_calculator<<"
explore:
  temperatures_K: [800]
  steps: 20
  check_every: 10
  sample_every: 10
select:
  lo: {lo}
  max_selected: 3
"""


QUERY = """
import json
from nequix_fw.store import (COLLECTION, ITERATIONS, LABEL_TASKS, MODELS, SELECTIONS,
                             VALIDATION, launchpad_db)
db = launchpad_db("my_launchpad.yaml")
docs = list(db[COLLECTION].find())
print(json.dumps({
    "fireworks": sorted((f["name"], f["state"]) for f in db.fireworks.find()),
    "workflow_state": [w["state"] for w in db.workflows.find()],
    "workflows": [(w["name"], len(w["nodes"]), (w.get("metadata") or {}).get("iteration"))
                  for w in db.workflows.find()],
    "dataset": sorted((d["dataset"], d["info"].get("iteration", -1)) for d in docs),
    "ids": sorted(d["structure_id"] for d in docs),
    "backends": sorted({d["info"]["backend"] for d in docs}),
    "counts": {c: db[c].count_documents({}) for c in (ITERATIONS, LABEL_TASKS, MODELS,
                                                       VALIDATION, SELECTIONS)},
    "iterations": [(d["iteration"], d.get("dataset_size"), d.get("stop_reason"),
                    (d.get("validation") or {}).get("force_rmse_eV_per_A"))
                   for d in db[ITERATIONS].find().sort("iteration", 1)],
    "tasks": sorted((d["iteration"], d["status"], len(d["settings_hash"]))
                    for d in db[LABEL_TASKS].find()),
    "models": sorted((d["iteration"], d["file"], d["sha256"]) for d in db[MODELS].find()),
    "indexes": sorted(db[LABEL_TASKS].index_information()),
    "fizzled": [l["action"]["stored_data"]["_exception"]["_stacktrace"][-1500:]
                for l in db.launches.find({"state": "FIZZLED"})],
}))
"""


def fireworks(tmp_path: Path, *commands: list) -> dict:
    """Run FireWorks commands one after another on the campaign's database; its state and
    campaign.json afterwards."""
    env = dict(os.environ)
    for cmd in [*commands, [sys.executable, "-c", QUERY]]:
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-3000:])
    db = json.loads(p.stdout.strip().splitlines()[-1])
    log = json.loads((tmp_path / "run" / "campaign.json").read_text())
    return {"db": db, "log": log["iterations"], "dir": tmp_path / "run"}


LPAD = [BIN / "lpad", "-l", "my_launchpad.yaml"]
RLAUNCH = [BIN / "rlaunch", "-l", "my_launchpad.yaml", "-w", "my_fworker.yaml", "rapidfire"]


def run_campaign(tmp_path: Path, name: str, lo: float, extra: str = "") -> dict:
    assert (tmp_path / "my_launchpad.yaml").is_file()  # the launchpad_file fixture's
    (tmp_path / "my_fworker.yaml").write_text(
        "name: cpu_worker\ncategory: ''\nquery: '{}'\nenv:\n  reference_calculator: emt\n"
        "  train_epochs: 3\n"
    )
    ase.io.write(tmp_path / "initial.extxyz", make_cells(4, seed=3))
    ase.io.write(tmp_path / "testset.extxyz", emt_labelled(6, seed=9))
    settings = yaml.safe_load(SETTINGS.format(name=name, lo=lo))
    for section, values in yaml.safe_load(extra or "{}").items():
        settings.setdefault(section, {}).update(values)
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(settings))
    today = datetime.date.today().isoformat()
    return fireworks(
        tmp_path,
        [
            BIN / "nequix-fw",
            "campaign",
            "--config",
            "campaign.yaml",
            "--launchpad",
            "my_launchpad.yaml",
            "--write",
            "wf.yaml",
        ],
        [*LPAD, "reset", "--password", today],
        [*LPAD, "add", "wf.yaml"],
        RLAUNCH,
    )
