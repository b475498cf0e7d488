"""The package's layers (docs/architecture.md): each module imports only from its own layer or
the ones below, and no import cycle exists."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nequix_fw"
LAYERS = {
    1: ["errors", "settings", "structures", "schemas", "__init__"],
    2: [
        "models",
        "graphs",
        "ensemble",
        "uncertainty",
        "llpr",
        "results",
        "descriptors",
        "features",
        "labels",
        "properties",
        "epochs",
        "store",
        "server",
        "secantus_atomic",
    ],
    3: [
        "evaluation",
        "selection",
        "exploration",
        "labelling",
        "dataset",
        "labelled_sets",
        "training",
        "training_torch",
        "validation",
        "forgetting",
        "diagnosis",
    ],
    4: ["campaign", "stopping", "firetasks", "workflows", "powerups"],
    5: ["cli"],
}
LAYER = {name: k for k, names in LAYERS.items() for name in names}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__") or "__init__"


def _imports(path: Path) -> set[str]:
    """The package modules `path` imports (top-level and nested), as dotted names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nequix_fw"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("nequix_fw")]
        for n in names:
            mod = n.removeprefix("nequix_fw").lstrip(".")
            if (PACKAGE / (mod.replace(".", "/") + ".py")).is_file() or (
                PACKAGE / mod.replace(".", "/") / "__init__.py"
            ).is_file():
                out.add(mod or "__init__")
    return out


def test_layers_and_no_cycles():
    graph = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    for mod in graph:  # every module has a layer
        assert mod.split(".")[0] in LAYER, f"{mod}: not in any layer of docs/architecture.md"
    upward = [
        (m, d)
        for m, deps in graph.items()
        for d in deps
        if LAYER[d.split(".")[0]] > LAYER[m.split(".")[0]]
    ]
    assert not upward, f"imports from a higher layer: {upward}"
    # no cycles between modules (a package's __init__ and its own modules count as one)
    top = {m: {d.split(".")[0] for d in deps} - {m.split(".")[0]} for m, deps in graph.items()}
    edges: dict[str, set[str]] = {}
    for m, deps in top.items():
        edges.setdefault(m.split(".")[0], set()).update(deps)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


def test_stages_import_nothing_of_fireworks_or_the_store():
    """The stage modules (layer 3) take plain data; FireWorks is the orchestration's, and the
    store is built at the edge and passed in."""
    for path in PACKAGE.rglob("*.py"):
        if LAYER[_module(path).split(".")[0]] != 3:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any(n.split(".")[0] == "fireworks" for n in names), path
            assert not any(n in ("nequix_fw.store", "pymongo", "gridfs") for n in names), path


def test_secantus_is_imported_by_its_own_file_alone():
    """SecantusDB is GPL-2.0-only: only `secantus_atomic` (under its licence, run as its own
    process) imports it, and no module of the package imports that file."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if path.stem != "secantus_atomic":
            assert not {n for n in names if n.split(".")[0] == "secantus"}, path
        assert "secantus_atomic" not in _imports(path), path
    assert "SPDX-License-Identifier: GPL-2.0-only" in (PACKAGE / "secantus_atomic.py").read_text()
