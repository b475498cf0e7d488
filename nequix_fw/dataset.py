"""Training-set I/O: labelled structures (energy, forces, optional stress) with checked labels."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import ase.io
import numpy as np
from ase import Atoms
from ase.units import Hartree, Rydberg

from nequix_fw.errors import Interrupted, StructureError
from nequix_fw.labelling.outputs import vasp_result_labels, vasp_result_name
from nequix_fw.labels import Labelled, labels_of
from nequix_fw.schemas import LabelTaskDoc
from nequix_fw.settings import LabellingSettings
from nequix_fw.structures import (
    Frame,
    atomic_path,
    check_output,
    is_store_spec,
    iter_frames,
    min_distance,
    structure_id,
)

logger = logging.getLogger(__name__)


class StoredDataset(Protocol):
    """A dataset ``db:NAME`` of the store (`nequix_fw.store.StoreDataset`)."""

    def __len__(self) -> int: ...
    def exists(self) -> bool: ...
    def frames(self, ids: set[str] | None = None) -> Iterable[Frame]: ...
    def structures(self) -> Iterable[Atoms]: ...
    def described(
        self, key: str, describe: Callable[[list[Atoms]], np.ndarray]
    ) -> tuple[list[np.ndarray], np.ndarray]: ...
    def ids(self, before_iteration: int | None = None) -> set[str]: ...
    def settings_hashes(self) -> set: ...
    def add(self, items: list) -> None: ...


class DatasetStore(Protocol):
    """Where the ``db:NAME`` datasets are: `nequix_fw.store.Store`, built at the edge (the CLI,
    a FireTask) and passed in; this module never opens a database itself."""

    def dataset(self, spec: str) -> StoredDataset: ...


def _stored(spec: str | Path, store: DatasetStore | None) -> StoredDataset:
    if store is None:
        raise StructureError(
            f"{spec}: a store dataset needs the store (command line: "
            "--launchpad FILE; Python: store=Store(launchpad))"
        )
    return store.dataset(str(spec))


def read_labelled(
    inputs: Iterable[str | Path],
    store: DatasetStore | None = None,
    allow_mixed: bool = False,
) -> list[Labelled]:
    """All labelled structures of the inputs: files or directories (any ASE format) and store
    datasets (``db:NAME``, in `store`), under the rules of `update_dataset`:
    one level of theory unless `allow_mixed`, each structure once (the same labels twice are
    read once; different labels for one structure are an error)."""

    inputs = list(inputs)
    paths = [p for p in inputs if not is_store_spec(p)]
    data = [labels_of(f) for f in iter_frames(paths)] if paths else []
    for spec in (p for p in inputs if is_store_spec(p)):
        data += [labels_of(f) for f in _stored(spec, store).frames()]
    data = _one_level_each_once(data, allow_mixed)
    for msg in unit_warnings(data):
        warnings.warn(msg, stacklevel=2)
    return data


def level_of_theory(d: Labelled, tasks: dict[Path, str | None] | None = None) -> str | None:
    """The labelling settings hash of a labelled structure: from its provenance, else from the
    ``task.json`` beside its file (a `label` output); None for plain files."""
    h = d.frame.atoms.info.get("settings_hash")
    if h is not None:
        return str(h)
    task = Path(d.frame.source).parent / "task.json"
    tasks = {} if tasks is None else tasks
    if task not in tasks:
        tasks[task] = json.loads(task.read_text()).get("settings_hash") if task.is_file() else None
    return tasks[task]


def _one_level_each_once(data: list[Labelled], allow_mixed: bool) -> list[Labelled]:
    tasks: dict[Path, str | None] = {}
    levels: dict[str | None, str] = {}
    for d in data:
        levels.setdefault(level_of_theory(d, tasks), d.where)
    if len(levels) > 1 and not allow_mixed:
        where = "; ".join(f"{h} ({w})" for h, w in levels.items())
        raise StructureError(
            f"labels from different levels of theory (settings hashes {where}) would be "
            "mixed; allow_mixed (command line: --allow-mixed) uses them together anyway"
        )
    seen: dict[str, Labelled] = {}
    out = []
    for d in data:
        sid = d.frame.atoms.info.get("structure_id") or d.id
        old = seen.get(sid)
        if old is None:
            seen[sid] = d
            out.append(d)
        elif not _same_labels(old, d):
            raise StructureError(
                f"{d.where}: structure {sid} is also in {old.where} with other labels "
                f"(energy {old.energy:.6f} vs {d.energy:.6f} eV); keep one of them"
            )
    return out


def _same_labels(a: Labelled, b: Labelled) -> bool:
    return abs(a.energy - b.energy) <= SAME_ENERGY_EV and np.allclose(
        a.forces, b.forces, atol=SAME_FORCE_EV_A, rtol=0
    )


def dataset_ids(
    dataset: str | Path, store: DatasetStore | None = None, before_iteration: int | None = None
) -> set[str]:
    """Structure ids in a training set (directory or store dataset db:NAME); empty if none.
    With `before_iteration`, only those added before that campaign iteration (or without one)."""

    if is_store_spec(dataset):
        stored = _stored(dataset, store)
        if not stored.exists():
            raise StructureError(
                f"{dataset}: no such dataset in the store (it holds none of its structures)"
            )
        return stored.ids(before_iteration)
    path = _existing_training_set(dataset)
    return {
        f.atoms.info.get("structure_id") or structure_id(f.atoms)
        for f in iter_frames([path])
        if before_iteration is None or f.atoms.info.get("iteration", -1) < before_iteration
    }


def labelled_by_id(
    dataset: str | Path, ids: set[str], store: DatasetStore | None = None
) -> list[Labelled]:
    """The labelled structures of a training set (directory, file or db:NAME) with these
    structure ids."""
    if not ids:
        return []
    if is_store_spec(dataset):
        return [labels_of(f) for f in _stored(dataset, store).frames(set(ids))]
    frames = iter_frames([_existing_training_set(dataset)])
    return [
        labels_of(f)
        for f in frames
        if (f.atoms.info.get("structure_id") or structure_id(f.atoms)) in ids
    ]


def training_structures(
    dataset: str | Path, store: DatasetStore | None = None
) -> list[Atoms] | StoredDataset:
    """The structures of a training set without their labels, what diverse selection keeps
    away from: those of a directory or file, or the store dataset db:NAME itself (which keeps
    its structures' descriptors, `StoredDataset.described`)."""
    if is_store_spec(dataset):
        return _stored(dataset, store)
    path = _existing_training_set(dataset)
    return [f.atoms for f in iter_frames([path])]


def _existing_training_set(dataset: str | Path) -> Path:
    """The file of an on-disk training set that must exist already."""
    path = training_set_file(dataset)
    if not path.is_file():
        raise StructureError(
            f"{dataset}: no training set there (no such file, or a directory "
            f"without {TRAINING_SET_FILE})"
        )
    return path


def training_set_file(dataset: str | Path) -> Path:
    """The file of an on-disk training set: `dataset` itself when it names an extxyz file,
    else ``<dataset>/training_set.extxyz``."""
    path = Path(dataset)
    if path.suffix in (".extxyz", ".xyz"):
        return path
    if path.is_file():
        raise StructureError(f"{path}: a training set is a directory, an .extxyz file or db:NAME")
    return path / TRAINING_SET_FILE


def same_dataset(a: str | Path, b: str | Path) -> bool:
    """Whether writing the training set `b` touches the dataset `a`: one store dataset
    (``db:NAME``), paths that resolve to one training-set file, or `b` inside the directory `a`
    (in any spelling: ``d``, ``./d/``, ``d/training_set.extxyz``, an absolute path)."""
    if is_store_spec(a) or is_store_spec(b):
        return str(a).strip() == str(b).strip()
    pa, pb = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()

    def file_of(path: Path) -> Path:
        try:
            return training_set_file(path)
        except StructureError:  # a structure file of another format: itself
            return path

    fa, fb = file_of(pa), file_of(pb)
    return pa == pb or fa == fb or (pa.is_dir() and fb.is_relative_to(pa))


def unit_warnings(data: Sequence[Labelled]) -> list[str]:
    """Warn when files' energies per atom differ by a Hartree or Rydberg factor (mixed units)."""
    by_file: dict[str, list[float]] = {}
    for d in data:
        by_file.setdefault(d.frame.source, []).append(d.energy / len(d.frame.atoms))
    medians = {src: float(np.median(v)) for src, v in by_file.items()}
    out = []
    files = sorted(medians)
    for i, a in enumerate(files):
        for b in files[i + 1 :]:
            ea, eb = medians[a], medians[b]
            if max(abs(ea), abs(eb)) < 1.0 or ea * eb <= 0:
                continue
            ratio = max(abs(ea), abs(eb)) / min(abs(ea), abs(eb))
            for name, factor in (("Hartree", Hartree), ("Rydberg", Rydberg)):
                if abs(ratio / factor - 1) < 0.05:
                    small = a if abs(ea) < abs(eb) else b
                    out.append(
                        f"{small}: energies per atom are 1/{factor:.2f} of those in "
                        f"{b if small == a else a}: labels look like {name}, not eV"
                    )
    return out


def ids_hash(ids: Iterable[str]) -> str:
    """Order-independent hash of a set of structure ids (names a data subset)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]


# -- ingestion into the on-disk training set -------------------------------------------------------

TRAINING_SET_FILE = "training_set.extxyz"
#: Labels equal within these tolerances are the same labels (eV, eV/Å).
SAME_ENERGY_EV, SAME_FORCE_EV_A = 1e-5, 1e-4


@dataclass
class Incoming:
    """A labelled structure on its way into the training set, with its provenance."""

    labelled: Labelled
    structure_id: str
    provenance: dict


def _incoming(new: Path) -> tuple[list[Incoming], int]:
    """Labelled structures under `new`: label task directories (task.json) and plain files."""
    items: list[Incoming] = []
    n_failed = 0
    task_dirs, task_ids = set(), set()
    tasks = sorted(new.rglob("task.json")) if new.is_dir() else []
    for task in tasks:
        task_dirs.add(task.parent)
        doc = LabelTaskDoc.from_file(task).to_dict()
        task_ids.add(doc["structure_id"])
        if doc.get("status") != "success" or not doc.get("labelled_file"):
            n_failed += 1
            continue
        (d,) = [labels_of(f) for f in iter_frames([task.parent / doc["labelled_file"]])]
        prov = {k: doc.get(k) for k in ("backend", "settings_hash", "iteration", "source")}
        prov["corrections"] = len(doc.get("corrections") or [])
        items.append(Incoming(d, doc["structure_id"], prov))
    candidates = sorted(new.rglob("*")) if new.is_dir() else [new]
    plain = [
        p
        for p in candidates
        if p.is_file()
        and p.parent not in task_dirs
        and (p.suffix in (".extxyz", ".xyz", ".traj") or vasp_result_name(p) is not None)
        and (vasp_result_name(p) or p.stem) not in task_ids  # a batch's raw result, labelled
    ]
    vasp = [p for p in plain if vasp_result_name(p) is not None]
    others = [p for p in plain if p not in vasp]
    labelled = [labels_of(f) for f in iter_frames(others)] if others else []
    names = [""] * len(labelled)
    for p in vasp:
        labelled.append(vasp_result_labels(p))
        names.append(vasp_result_name(p))
    for d, name in zip(labelled, names, strict=True):
        h = d.frame.atoms.info.get("settings_hash")
        prov = {"backend": "file", "settings_hash": h, "iteration": None, "source": d.where}
        # <NAME>_OUTCAR of the design's launch_dft.sh: the labels of selected structure NAME
        sid = name if STRUCTURE_ID.fullmatch(name) else d.frame.atoms.info.get("structure_id")
        items.append(Incoming(d, sid or d.id, prov))
    return items, n_failed


#: A structure id (content hash), as selected structures are named.
STRUCTURE_ID = re.compile(r"[0-9a-f]{20}")


def _check_limits(d: Labelled, limits: LabellingSettings) -> None:
    """Refuse labels beyond what labelling itself accepts (`max_force`, `min_distance_A`)."""
    fmax = float(np.linalg.norm(d.forces, axis=1).max()) if len(d.forces) else 0.0
    if fmax > limits.max_force:
        raise StructureError(
            f"{d.where}: max force {fmax:.3g} eV/Å exceeds label.max_force ({limits.max_force} "
            "eV/Å), which labelling refuses too; fix or drop the structure (or raise max_force)"
        )
    cutoff = limits.min_distance_A
    if cutoff is not None and len(d.frame.atoms) > 1:
        closest = min_distance(d.frame.atoms, cutoff)
        if closest < cutoff:
            raise StructureError(
                f"{d.where}: atoms {closest:.3g} Å apart, closer than label.min_distance_A "
                f"({cutoff} Å), which labelling refuses too; fix or drop the structure"
            )


def update_dataset(
    new: str | Path,
    dataset: str | Path,
    iteration: int | None = None,
    allow_mixed: bool = False,
    store: DatasetStore | None = None,
    provenance: dict | None = None,
    limits: LabellingSettings | None = None,
) -> dict:
    """Add the labelled structures under `new` to the training set in directory `dataset`, or
    to the store dataset ``db:NAME`` (in `store`);
    `provenance` is added to every new structure's record. The number limits that labelling
    applies (`limits`: `max_force`, `min_distance_A`; by default LabellingSettings') hold for
    imported files (not label tasks) too: a structure beyond them is refused, naming it, and
    nothing is added.

    Idempotent: a structure already present with the same labels is skipped; with different
    labels it is reported as a conflict and the stored labels are kept. Refuses to mix levels of
    theory (backend settings hashes) unless `allow_mixed`. The training set
    (``<dataset>/training_set.extxyz``) is rewritten atomically; store documents are keyed by
    content hash, so a rerun (or a rerun after a crash) adds each structure once. Stopped by
    Ctrl-C, it raises `Interrupted`, saying how many were stored.
    """
    try:
        return _update_dataset(
            new, dataset, iteration, allow_mixed, store, provenance, limits or LabellingSettings()
        )
    except KeyboardInterrupt:  # before anything was stored (`_update_dataset` says after)
        raise Interrupted(
            f"interrupted: nothing of {new} was stored in {dataset} yet; the same command "
            "again adds it"
        ) from None


def _update_dataset(
    new: str | Path,
    dataset: str | Path,
    iteration: int | None,
    allow_mixed: bool,
    store: DatasetStore | None,
    provenance: dict | None,
    limits: LabellingSettings,
) -> dict:
    new = Path(new)
    if not new.exists():
        raise StructureError(f"{new}: no such file or directory")
    if iteration is not None and iteration < 0:
        raise StructureError(f"iteration {iteration}: iterations count from 0")
    ds = _stored(dataset, store) if is_store_spec(dataset) else None
    target = None if ds else training_set_file(dataset)
    if target is not None:
        check_output(target, "file")
    items, n_failed = _incoming(new)
    if not items and not n_failed:
        raise StructureError(f"{new}: no labelled structures or label tasks found")
    for item in items:  # label tasks were checked by labelling, under their own settings
        if item.provenance["backend"] == "file":
            _check_limits(item.labelled, limits)
    existing = []
    if ds is not None:  # only the documents these items could collide with
        existing = [labels_of(f) for f in ds.frames({i.structure_id for i in items})]
        levels = ds.settings_hashes()
    else:
        if target.is_file():
            existing = [labels_of(f) for f in iter_frames([target])]
        levels = {d.frame.atoms.info.get("settings_hash") for d in existing}
    levels |= {i.provenance["settings_hash"] for i in items}
    if len(levels) > 1 and not allow_mixed:
        raise StructureError(
            f"{new}: labels from different levels of theory (settings hashes "
            f"{', '.join(sorted(str(x) for x in levels))}) would be mixed; "
            "allow_mixed (command line: --allow-mixed) merges them anyway"
        )
    stored = {d.frame.atoms.info.get("structure_id", d.id): d for d in existing}
    added, duplicates, conflicts = [], 0, []
    for item in items:
        old = stored.get(item.structure_id)
        if old is not None:
            if _same_labels(old, item.labelled):
                duplicates += 1
            else:
                conflicts.append(
                    {
                        "structure_id": item.structure_id,
                        "source": item.labelled.where,
                        "energy_stored": old.energy,
                        "energy_new": item.labelled.energy,
                    }
                )
            continue
        atoms = item.labelled.frame.atoms.copy()
        atoms.calc = item.labelled.frame.atoms.calc
        prov = {**item.provenance, **(provenance or {}), "structure_id": item.structure_id}
        if iteration is not None:  # the caller's iteration wins over the task's
            prov["iteration"] = iteration
        atoms.info.update({k: v for k, v in prov.items() if v is not None})
        added.append(atoms)
        stored[item.structure_id] = item.labelled
    if added and ds is not None:
        try:
            ds.add(added)
        except Interrupted as exc:  # a store dataset says what it had written
            more = f" (and up to {exc.in_flight} more sent)" if exc.in_flight else ""
            raise Interrupted(
                f"interrupted: {exc.stored} of the {len(added)} new structures of {new} were "
                f"stored in {ds}{more}; the same command again adds the rest (none twice)"
            ) from None
    elif added:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(target) as tmp:
                ase.io.write(tmp, [d.frame.atoms for d in existing] + added, format="extxyz")
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted: nothing of {new} was written ({target} is as it was); the same "
                "command again adds it"
            ) from None
    logger.info(
        "dataset %s: %d added, %d duplicates, %d conflicts",
        ds if ds is not None else target,
        len(added),
        duplicates,
        len(conflicts),
    )
    return {
        "dataset": str(ds if ds is not None else target),
        "n_added": len(added),
        "n_duplicates": duplicates,
        "n_conflicts": len(conflicts),
        "conflicts": conflicts,
        "n_failed_tasks_skipped": n_failed,
        "n_total": len(ds) if ds is not None else len(existing) + len(added),
    }
