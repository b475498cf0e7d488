"""Every example command in the README and the documentation (`docs/`) is a valid command, and
a test runs it: either one test function holds the same subcommand with every flag it shows
(found by reading the tests' string literals), or the tests at the end of this file take the
command from the page and run it as written, only shorter (`SCALE`: fewer MD steps, epochs and
worker processes). `make demo` and `make test` are the quickstart itself (CI runs `make
test`); `tests/test_docs.py` runs the first tutorial end to end."""

import ast
import datetime
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from helpers import TEMPLATE, TINY_ARCH, emt_labelled, quick_cp2k_template

from nequix_fw.cli import build_parser, main
from nequix_fw.dataset import read_labelled
from nequix_fw.store import Store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STANDINS = ROOT / "tests" / "standins"
FIX = ROOT.parent / "shared" / "vasp-fixtures"
TOOLS = ("nequix-fw", "lpad", "rlaunch", "qlaunch", "bash")


#: The pages whose commands are checked: the README and every page of the documentation.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def doc_commands() -> list[list[str]]:
    """The commands of the pages' bash blocks, as argument lists (comments, continuation
    lines and environment assignments handled as the shell would)."""
    text = "\n".join(p.read_text() for p in PAGES)
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # VAR=value before the command
            if words and words[0] in TOOLS:
                out.append(words)
    return out


def _strings(node: ast.AST) -> set[str]:
    """The string literals in a node (f-strings' constant parts too), and their words."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            found.add(n.value)
            found.update(n.value.split())
    return found


def _test_functions() -> dict[str, set[str]]:
    """Per test function, the strings it holds and those of the helpers and constants it
    names (in its module, or imported from another test module), transitively."""
    modules = {}  # module name -> {top-level name: node}
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        defs = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                defs[node.name] = node
            elif isinstance(node, ast.Assign):
                defs.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
            elif isinstance(node, ast.ImportFrom) and (node.module or "") in {
                p.stem for p in (ROOT / "tests").glob("*.py")
            }:
                defs.update({a.asname or a.name: (node.module, a.name) for a in node.names})
        modules[path.stem] = defs

    def resolve(module: str, name: str):
        node = modules.get(module, {}).get(name)
        return resolve(*node) if isinstance(node, tuple) else (module, node)

    def strings(module: str, node: ast.AST, seen: set) -> set[str]:
        found = _strings(node)
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and (module, n.id) not in seen:
                seen.add((module, n.id))
                where, target = resolve(module, n.id)
                if target is not None and target is not node:
                    found |= strings(where, target, seen)
        return found

    funcs = {}
    for module, defs in modules.items():
        if module == Path(__file__).stem or not module.startswith("test_"):
            continue
        for name, node in defs.items():
            if name.startswith("test_") and isinstance(node, ast.FunctionDef):
                funcs[f"{module}.py::{name}"] = strings(module, node, set())
    return funcs


def _shape(words: list[str]) -> tuple[list[str], set[str]]:
    """What a test must contain: the tool's subcommand words and every flag."""
    tool, rest = words[0], words[1:]
    flags = {w.split("=", 1)[0] for w in rest if w.startswith("-")}
    if tool == "bash":
        return [Path(rest[0]).name], set()
    head = [w for w in rest if not w.startswith("-")][: 2 if tool == "nequix-fw" else 1]
    if tool == "nequix-fw" and head and head[0] != "db":
        head = head[:1]
    if tool in ("lpad", "rlaunch", "qlaunch"):  # `-l FILE` comes first; the verb after it
        verbs = [w for w in rest if not w.startswith("-") and not w.endswith(".yaml")]
        head = [tool, verbs[0]] if verbs else [tool]
        flags -= {"-l", "-w", "-q"}  # the files every FireWorks call names
    return head, flags


COMMANDS = doc_commands()


def test_the_docs_have_their_commands():
    assert len(COMMANDS) > 40
    assert {c[0] for c in COMMANDS} == set(TOOLS)


@pytest.mark.parametrize(
    "words", [c for c in COMMANDS if c[0] == "nequix-fw"], ids=lambda c: " ".join(c[1:3])
)
def test_doc_command_is_valid(words):
    """The real parser takes every nequix-fw command of the pages as written."""
    build_parser().parse_args(words[1:])


FUNCS = _test_functions()


def readme_command(*words: str) -> list[str]:
    """The one command of the pages holding all of `words`."""
    found = [c for c in COMMANDS if all(w in c for w in words)]
    assert len(found) == 1, (words, found)
    return found[0]


#: The pages' commands that the tests below run as written (each found by these words).
RUN_HERE = [
    ("select", "--diverse"),
    ("select", "--exclude-dataset"),
    ("explore", "--hi"),
    ("explore", "--barostat"),
    ("label", "emt"),
    ("label", "vasp", "--iteration"),
    ("label", "cp2k"),
    ("label", "--timeout"),
    ("train-ensemble", "--strategy"),
    ("train-ensemble", "torch"),
    ("relabel",),
    ("export", "vasp"),
    ("get_wflows",),
]


@pytest.mark.parametrize("words", COMMANDS, ids=lambda c: " ".join(c[:3]))
def test_a_test_runs_the_readme_command(words):
    if any(all(w in words for w in key) for key in RUN_HERE):
        return  # run below
    head, flags = _shape(words)
    runs = [
        name
        for name, strings in FUNCS.items()
        if all(h in strings for h in head) and flags <= strings
    ]
    assert runs, f"no test runs `{shlex.join(words)}` (needs {head} and {sorted(flags)})"


# -- the pages' commands, run as written ---------------------------------------------------------

#: Shorter runs than the pages': MD steps, sampling, epochs, worker processes; training
#: commands get 2 epochs of the tiny model of `settings.yaml` where they do not say.
SCALE = {"--steps": "20", "--sample-every": "10", "--epochs": "2", "--workers": "2"}
SHORT_TRAINING = {"--epochs": "2", "--config": "settings.yaml"}


def run_readme(*words: str, process: bool = False) -> list[str]:
    """Run the pages' command holding `words` in the current directory, as the shell would
    (variables and globs expanded), with the `SCALE` values; in a process of its own with
    `process` (what FireWorks reads at import, e.g. ./my_launchpad.yaml, is then this
    directory's); its arguments."""
    command = readme_command(*words)
    argv, rest = [], iter(command[1:])
    for w in rest:
        argv.append(w)
        if w in SCALE:
            next(rest)
            argv.append(SCALE[w])
    if argv[0] == "train-ensemble":
        argv += [x for flag, v in SHORT_TRAINING.items() if flag not in argv for x in (flag, v)]
    argv = [os.path.expandvars(w) for w in argv]  # as in double quotes: $PWD
    argv = [x for w in argv for x in (sorted(glob.glob(w)) if "*" in w else [w])]
    if command[0] == "nequix-fw" and not process:
        assert main(argv) == 0, command
    else:
        p = subprocess.run([BIN / command[0], *argv], capture_output=True, text=True)
        assert p.returncode == 0, (command, p.stderr[-2000:])
    return argv


def _emt_script(path: Path) -> None:
    """A user's labelling script: EMT labels of the POSCAR in its directory."""
    path.write_text(
        f'{sys.executable} -c "import ase.io; from ase.calculators.emt import EMT; '
        "a = ase.io.read('POSCAR'); a.calc = EMT(); a.get_forces(); "
        "ase.io.write('labelled.extxyz', a)\"\n"
    )


def _vasp_inputs(d: Path, encut: int) -> None:
    from test_vasp import FAKE_POTCAR

    d.mkdir()
    (d / "INCAR").write_text(
        f"PREC = Accurate\nENCUT = {encut}\nISMEAR = 0\nSIGMA = 0.05\n"
        "EDIFF = 1e-06\nNSW = 0\nIBRION = -1\nLREAL = Auto\n"
    )
    (d / "KPOINTS").write_text("Automatic\n0\nGamma\n4 4 4\n")
    (d / "POTCAR").write_text(FAKE_POTCAR.format(el="Si"))


@pytest.fixture
def vasp_standin(monkeypatch):
    if not (FIX / "si2_relax").is_dir():
        pytest.skip("vasp fixtures not available")
    monkeypatch.setenv("PATH", f"{STANDINS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_VASP_FIXTURES", str(FIX))
    return ase.io.read(FIX / "si2_relax" / "vasprun.xml.gz", index=0)


@pytest.fixture
def workdir(trained, tmp_path, monkeypatch) -> Path:
    """The current directory of a walk through the pages' commands: `models/m1.nqx`,
    `models/m2.nqx` (the tiny trained ensemble), $PWD set as a shell would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))
    Path("models").mkdir()
    for i, m in enumerate(sorted(trained["dir"].glob("member_*.nqx")), start=1):
        shutil.copy(m, f"models/m{i}.nqx")
    return tmp_path


def test_docs_loop_by_hand(workdir, vasp_standin):
    """select (trust levels, cap, diversity, distance, extxyz), explore (NVT; NPT with the MTK
    barostat, worker processes, distortions, substitutions, random packings), label (EMT, VASP
    through mpirun, CP2K with a template, the user's script with a time-out) and training
    (4 members on splits in worker processes) as the pages write them."""
    Path("data/initial_structures").mkdir(parents=True)
    for i, a in enumerate(emt_labelled(12, seed=31)):
        ase.io.write(f"data/initial_structures/s{i}.extxyz", a)
    assert (
        main(
            [
                "run-ensemble",
                "--models",
                "models/m1.nqx",
                "models/m2.nqx",
                "--structures",
                "data/initial_structures/",
                "--output",
                "ensemble_results.json",
            ]
        )
        == 0
    )
    run_readme("select", "--diverse")
    manifest = json.loads(Path("selected_structures/manifest.json").read_text())
    chosen = [e for e in manifest["structures"] if e["selected"]]
    assert 0 < len(chosen) <= 50 and all(e["file"].endswith(".extxyz") for e in chosen)
    assert all(0.08 <= e["metrics"]["max_force_dev"] < 0.5 for e in chosen)
    run_readme("explore", "--hi")
    m = json.loads(Path("candidates/manifest.json").read_text())
    assert {t["temperature_K"] for t in m["trajectories"]} == {300.0, 800.0, 1200.0}
    shutil.move("candidates", "candidates_nvt")
    run_readme("explore", "--barostat")
    m = json.loads(Path("candidates/manifest.json").read_text())
    assert {t.get("pressure_GPa") for t in m["trajectories"]} == {0.0, 5.0}
    gens = [f["generator"] for f in m["frames"]]  # 20 distortions of each of the 12 starts
    assert gens.count("distortion") == 20 * 12 and gens.count("random_packing") == 4
    # labels: EMT, then a training set, then four members on splits in two processes
    run_readme("label", "emt")
    assert (
        main(
            [
                "update-dataset",
                "--new",
                "data/dft_results/",
                "--dataset",
                "data/training_set/",
                "--iteration",
                "1",
            ]
        )
        == 0
    )
    Path("settings.yaml").write_text(
        json.dumps({"train_ensemble": {"architecture": TINY_ARCH, "batch_size": 4}})
    )
    run_readme("train-ensemble", "--strategy")
    assert len(list(Path("models_new").glob("member_*.nqx"))) == 4
    # the user's script, per structure, under a time-out
    shutil.rmtree("data/dft_results")
    _emt_script(Path("run_vasp_here.sh"))
    run_readme("label", "--timeout")
    tasks = [json.loads(p.read_text()) for p in Path("data/dft_results").glob("*/task.json")]
    assert len(tasks) == len(chosen) and {t["status"] for t in tasks} == {"success"}
    # VASP through mpirun (the stand-ins replay a real Si2 run)
    shutil.rmtree("data/dft_results")
    shutil.rmtree("selected_structures")
    Path("selected_structures").mkdir()
    ase.io.write("selected_structures/si2.vasp", vasp_standin, format="vasp")
    _vasp_inputs(Path("vasp_inputs"), 520)
    run_readme("label", "vasp", "--iteration")
    (task,) = [json.loads(p.read_text()) for p in Path("data/dft_results").glob("*/task.json")]
    assert task["status"] == "success" and task["iteration"] == 1
    (label,) = read_labelled(sorted(Path("data/dft_results").glob("*/labelled.extxyz")))
    assert label.energy == pytest.approx(-10.84, abs=0.05)  # the Si2 run's energy (eV)
    # CP2K with the user's template (the shared Si8 input, made quick as in test_cp2k)
    if shutil.which("cp2k.psmp") and TEMPLATE.is_file():
        quick_cp2k_template(Path("si_pbe.inp"))
        shutil.rmtree("selected_structures")
        Path("selected_structures").mkdir()
        si8 = bulk("Si", "diamond", a=5.43, cubic=True)
        si8.rattle(0.05, seed=3)
        ase.io.write("selected_structures/si8.vasp", si8, format="vasp")
        run_readme("label", "cp2k")
        labels = read_labelled(
            sorted(Path("data/dft_results").glob("*/labelled.extxyz")), allow_mixed=True
        )
        cp2k = [d for d in labels if d.frame.atoms.get_chemical_formula() == "Si8"]
        assert len(cp2k) == 1 and np.abs(cp2k[0].forces).max() > 0.1


def test_docs_store_commands(workdir, launchpad_file, vasp_standin):
    """With the MongoDB store: select never re-selects what a dataset holds, torch training
    on a store dataset, relabelling a dataset at another level of theory, export by iteration
    and backend, and FireWorks' view of the same database."""
    Path("data/dft_results").mkdir(parents=True)
    for i, a in enumerate(emt_labelled(6, seed=41)):
        ase.io.write(f"data/dft_results/s{i}.extxyz", a)
    assert (
        main(
            [
                "update-dataset",
                "--new",
                "data/dft_results/",
                "--dataset",
                "db:cu_au",
                "--launchpad",
                "my_launchpad.yaml",
                "--iteration",
                "2",
            ]
        )
        == 0
    )
    # candidates: the dataset's own structures and 6 new ones
    ase.io.write("pool.extxyz", [*emt_labelled(6, seed=41), *emt_labelled(6, seed=42)])
    assert (
        main(
            [
                "run-ensemble",
                "--models",
                "models/m1.nqx",
                "models/m2.nqx",
                "--structures",
                "pool.extxyz",
                "--output",
                "ensemble_results.json",
            ]
        )
        == 0
    )
    Path("settings.yaml").write_text(
        json.dumps({"train_ensemble": {"architecture": TINY_ARCH, "batch_size": 4}})
    )
    run_readme("select", "--exclude-dataset")
    manifest = json.loads(Path("selected_structures/manifest.json").read_text())
    known = {d.id for d in read_labelled(["db:cu_au"], Store("my_launchpad.yaml"))}
    chosen = {e["id"] for e in manifest["structures"] if e["selected"]}
    assert chosen and not chosen & known
    run_readme("train-ensemble", "torch")
    assert len(list(Path("models_new").glob("member_*.pt"))) >= 2
    # VASP labels of Si2 (the stand-in's run) in db:cuau, relabelled at another ENCUT
    Path("selected").mkdir()
    ase.io.write("selected/si2.vasp", vasp_standin, format="vasp")
    _vasp_inputs(Path("inputs"), 520)
    _vasp_inputs(Path("inputs_pbe"), 600)
    assert (
        main(
            [
                "label",
                "--backend",
                "vasp",
                "--vasp-cmd",
                "vasp_std",
                "--vasp-inputs",
                "inputs/",
                "--structures",
                "selected/",
                "--output",
                "vasp_labels",
                "--iteration",
                "3",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "update-dataset",
                "--new",
                "vasp_labels",
                "--dataset",
                "db:cuau",
                "--launchpad",
                "my_launchpad.yaml",
            ]
        )
        == 0
    )
    run_readme("relabel")
    (new,) = read_labelled(["db:cuau_pbe"], Store("my_launchpad.yaml"))
    (old,) = read_labelled(["db:cuau"], Store("my_launchpad.yaml"))
    assert new.id == old.id and new.frame.atoms.info["relabelled_from"] == "db:cuau"
    assert new.frame.atoms.info["settings_hash"] != old.frame.atoms.info["settings_hash"]
    # export by iteration and backend: the VASP label joins db:cu_au (another level of theory)
    assert (
        main(
            [
                "update-dataset",
                "--new",
                "vasp_labels",
                "--dataset",
                "db:cu_au",
                "--launchpad",
                "my_launchpad.yaml",
                "--allow-mixed",
            ]
        )
        == 0
    )
    run_readme("export", "vasp", process=True)
    (exported,) = ase.io.read("new.extxyz", index=":")
    assert exported.get_chemical_formula() == "Si2"
    p = subprocess.run(
        [
            BIN / "lpad",
            "-l",
            "my_launchpad.yaml",
            "reset",
            "--password",
            datetime.date.today().isoformat(),
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    run_readme("get_wflows")
