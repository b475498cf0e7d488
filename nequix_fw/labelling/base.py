"""The labelling interface and the driver that labels a directory of selected structures.

A backend labels one structure in its own directory and returns a `LabelResult`: the labelled
Atoms (energy, forces, stress when periodic) and a task document. The driver adds the failure
policy (pre-run distance filter, non-finite or absurd forces) and writes, per structure,
``<output>/<id>/labelled.extxyz`` and ``<output>/<id>/task.json``, plus ``<output>/summary.json``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from monty.json import jsanitize
from tqdm import tqdm

from nequix_fw.errors import NequixFWError, SettingsError
from nequix_fw.schemas import LabelTaskDoc
from nequix_fw.settings import LabellingSettings
from nequix_fw.structures import (
    SELECTED_INDEX,
    Frame,
    atomic_path,
    check_output,
    check_writable_dir,
    expand_inputs,
    iter_frames,
    min_distance,
    structure_id,
)

#: The `label` settings every backend shares (the driver's checks and failure policy).
COMMON_FIELDS = ("backend", "min_distance_A", "max_force", "max_failed_fraction")

logger = logging.getLogger(__name__)


@dataclass
class LabelResult:
    """Outcome of labelling one structure."""

    atoms: Atoms | None  # labelled (SinglePointCalculator) or None when failed
    status: str  # "success" | "failed"
    reason: str | None = None
    doc: dict = field(default_factory=dict)  # backend-specific task details


class LabellingBackend(ABC):
    """Labels one structure in its own working directory. A backend is registered by name in
    `settings.LABELLING_BACKENDS` (or named as 'module:Class') and built by `from_settings`."""

    #: Its name in `label.backend` (and in every label's provenance).
    name: ClassVar[str]
    #: The `label` settings it reads, besides those every backend shares (`COMMON_FIELDS`).
    settings_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_settings(cls, settings: LabellingSettings) -> LabellingBackend:
        """The backend of these (validated, placeholder-free) label settings."""
        return cls(settings)

    @classmethod
    def gives_stress(cls, settings: LabellingSettings) -> bool | None:
        """Whether its labels of periodic cells carry a stress under these settings (None:
        only its output can tell, as for a user's script)."""
        return None

    @abstractmethod
    def settings_doc(self) -> dict:
        """What defines the level of theory (hashed into provenance)."""

    def settings_hash(self) -> str:
        blob = json.dumps(self.settings_doc(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @abstractmethod
    def label(self, atoms: Atoms, workdir: Path) -> LabelResult:
        """Compute energy, forces (and stress for periodic cells) of `atoms` in `workdir`."""

    def prepare(self, pending: list[tuple[str, Atoms]], output: Path) -> None:  # noqa: B027
        """An optional hook, called once with every (structure id, structure) about to be
        labelled, before the `label` calls: a backend that computes them all at once (a batch
        script) runs here."""


def import_class(name: str, default_module: str, base: type, setting: str) -> type:
    """A class by name in `default_module`, or 'module:Class', that must subclass `base`."""

    module, _, cls = name.rpartition(":")
    try:
        obj = getattr(importlib.import_module(module or default_module), cls)
    except (ImportError, AttributeError):
        raise SettingsError(
            f"{setting}: no {base.__name__} {name!r} in {module or default_module}"
            " (or give module:Class)"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise SettingsError(f"{setting}: {name!r} is not a {base.__name__}")
    return obj


def check_labels(atoms: Atoms, max_force: float) -> str | None:
    """Why labels are unusable (non-finite or absurd), or None when they are fine."""
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    if not np.isfinite(e) or not np.isfinite(f).all():
        return "non-finite energy or forces"
    fmax = float(np.linalg.norm(f, axis=1).max()) if len(f) else 0.0
    if fmax > max_force:
        return f"max force {fmax:.3g} eV/Å exceeds {max_force} eV/Å"
    return None


def singlepoint(atoms: Atoms, energy: float, forces, stress=None) -> Atoms:
    """A copy of `atoms` carrying fixed labels (eV, eV/Å, Voigt eV/Å³)."""
    a = atoms.copy()
    a.calc = SinglePointCalculator(a, energy=energy, forces=np.asarray(forces), stress=stress)
    return a


def custodian_corrections(workdir: Path) -> list:
    """custodian's corrections (errors found, actions taken) from its custodian.json log."""
    log = workdir / "custodian.json"
    if not log.is_file():
        return []
    return [
        {"errors": cor.get("errors"), "actions": cor.get("actions")}
        for entry in json.loads(log.read_text())
        for cor in entry.get("corrections", [])
    ]


def _structure_ids(structures: Path) -> dict[tuple[str, int], str]:
    """Ids from a selection's index (or, from older selections, its manifest) beside the
    structures, keyed by (file name, frame)."""
    if not structures.is_dir():
        return {}
    for name in (SELECTED_INDEX, "manifest.json"):
        if (structures / name).is_file():
            doc = json.loads((structures / name).read_text())
            return {(e["file"], 0): e["id"] for e in doc.get("structures", []) if e.get("file")}
    return {}


def _frames(structures: Path, group: tuple[int, int] | None) -> list[Frame]:
    """The frames to label: all of them, or those of `group` (index, size) in reading order. A
    selection's directory (one structure per file, listed in its index) is read only for the
    group's files, so that each of many groups does not read every structure."""
    if group is None:
        return list(iter_frames([structures]))
    start, stop = group[0] * group[1], (group[0] + 1) * group[1]
    index = structures / SELECTED_INDEX if structures.is_dir() else None
    if index is not None and index.is_file():
        listed = [e["file"] for e in json.loads(index.read_text())["structures"]]
        files = expand_inputs([structures])
        if [f.name for f in files] == listed:  # one structure per file, none added by hand
            frames = list(iter_frames(files[start:stop]))
            if len(frames) == len(files[start:stop]):
                return frames
    return list(iter_frames([structures]))[start:stop]


def _finished(workdir: Path, settings_hash: str) -> dict | None:
    """The task document of an earlier successful labelling of this structure (`workdir` is
    named by its content hash) at the same level of theory, if there is one."""
    task = workdir / "task.json"
    if not (task.is_file() and (workdir / "labelled.extxyz").is_file()):
        return None
    doc = LabelTaskDoc.from_file(task)
    if doc.status == "success" and doc.settings_hash == settings_hash:
        return doc.to_dict()
    return None


def _label_one(
    fr: Frame,
    sid: str,
    workdir: Path,
    backend: LabellingBackend,
    settings: LabellingSettings,
    settings_hash: str,
    too_close: float | None,
    iteration: int | None,
) -> dict:
    """Label one structure in `workdir` (`too_close`: its minimum distance in Å when below
    `settings.min_distance_A`, so it is not sent to the backend); its task document, written
    to task.json beside labelled.extxyz."""
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if too_close is not None:
        why = (
            f"min interatomic distance {too_close:.3f} Å < {settings.min_distance_A} Å: "
            f"not sent to {backend.name}"
        )
        res = LabelResult(None, "failed", why)
    else:
        try:
            res = backend.label(fr.atoms, workdir)
        except NequixFWError:
            raise  # configuration problems stop the batch (they would fail every structure)
        except Exception as exc:  # a calculation that crashed: record, go on
            res = LabelResult(None, "failed", f"{type(exc).__name__}: {exc}")
        if res.atoms is not None and res.status == "success":
            why = check_labels(res.atoms, settings.max_force)
            if why is not None:
                res = LabelResult(None, "failed", why, res.doc)
    doc = {
        "structure_id": sid,
        "source": str(fr.source),
        "frame": fr.frame,
        "formula": fr.atoms.get_chemical_formula(),
        "backend": backend.name,
        "settings": jsanitize(backend.settings_doc(), strict=False),
        "settings_hash": settings_hash,
        "iteration": iteration,
        "status": res.status,
        "reason": res.reason,
        "wall_time_s": time.perf_counter() - t0,
        **jsanitize(res.doc, strict=False),
    }
    if res.atoms is not None and res.status == "success":
        labelled = res.atoms.copy()
        labelled.calc = res.atoms.calc
        labelled.info.update(structure_id=sid)
        with atomic_path(workdir / "labelled.extxyz") as tmp:
            ase.io.write(tmp, labelled, format="extxyz")
        doc["labelled_file"] = "labelled.extxyz"
    task = LabelTaskDoc(**doc)
    task.to_file(workdir / "task.json")
    return task.to_dict()


def label_structures(
    structures: str | Path,
    output: str | Path,
    backend: LabellingBackend,
    settings: LabellingSettings,
    iteration: int | None = None,
    progress: bool = True,
    group: tuple[int, int] | None = None,
) -> dict:
    """Label every structure under `structures`; failures are recorded and the batch goes on.

    A rerun into the same `output` (after a crash or a walltime kill) reuses the structures
    already labelled successfully at the same level of theory; failed ones are tried again.
    `group` = (index, size) labels only that group of the structures (in reading order), as
    one of several parallel jobs. Returns the summary (also written to
    ``<output>/summary.json``, or ``summary_<index>.json`` for a group).
    """

    structures, output = Path(structures), check_output(output, "directory")
    frames = _frames(structures, group)
    check_writable_dir(output)  # the input is readable: now make the output
    ids = _structure_ids(structures)
    settings_hash = backend.settings_hash()
    todo, seen = [], set()  # (frame, id, earlier task document or None)
    for fr in frames:
        sid = ids.get((Path(fr.source).name, fr.frame)) or structure_id(fr.atoms)
        if sid not in seen:  # the same structure twice in the input: labelled once
            seen.add(sid)
            todo.append((fr, sid, _finished(output / sid, settings_hash)))
    too_close: dict[str, float] = {}  # never sent to the backend
    if settings.min_distance_A is not None:
        for fr, sid, done in todo:
            if (
                done is None
                and (d := min_distance(fr.atoms, settings.min_distance_A)) < settings.min_distance_A
            ):
                too_close[sid] = d
    backend.prepare(
        [(sid, fr.atoms) for fr, sid, done in todo if done is None and sid not in too_close], output
    )
    results, n_reused = [], 0
    for fr, sid, done in tqdm(
        todo, desc=f"label ({backend.name})", unit="struct", disable=not progress
    ):
        workdir = output / sid
        if done is not None:
            results.append(done)
            n_reused += 1
            continue
        results.append(
            _label_one(
                fr, sid, workdir, backend, settings, settings_hash, too_close.get(sid), iteration
            )
        )
    summary = {
        "backend": backend.name,
        "settings_hash": settings_hash,
        "n_structures": len(results),
        "structure_ids": [r["structure_id"] for r in results],
        "n_success": sum(r["status"] == "success" for r in results),
        "n_reused": n_reused,
        "n_duplicates": len(frames) - len(results),
        "n_failed": sum(r["status"] != "success" for r in results),
        "failed": [
            {"structure_id": r["structure_id"], "reason": r["reason"]}
            for r in results
            if r["status"] != "success"
        ],
    }
    name = "summary.json" if group is None else f"summary_{group[0]:03d}.json"
    with atomic_path(output / name) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    for f in summary["failed"]:
        logger.warning("labelling of %s failed: %s", f["structure_id"], f["reason"])
    logger.info(
        "labelled %d structures into %s: %d succeeded (%d reused), %d failed",
        summary["n_structures"],
        output,
        summary["n_success"],
        n_reused,
        summary["n_failed"],
    )
    return summary


def label_frozen(
    output: str | Path,
    make_frames: Callable[[], list[Atoms]],
    backend: LabellingBackend,
    settings: LabellingSettings,
    progress: bool = True,
) -> dict:
    """Label the structures `make_frames()` gives, frozen by the first run in
    `output`/structures.extxyz and labelled in `output`/labels, so that a rerun (after a crash)
    labels only what is left, and never a different set: a work directory frozen for other
    structures (another dataset, another E-V structure) is refused. Returns
    `label_structures`' summary."""
    output = check_output(output, "directory")
    frames = make_frames()
    wanted = {structure_id(a) for a in frames}
    structures, request = output / "structures.extxyz", output / "request.json"
    if structures.is_file():
        # the ids as asked for: those of the frozen file's round trip may differ in the last
        # rounded digit (a work directory of an older version has no request.json)
        if request.is_file():
            frozen = set(json.loads(request.read_text())["structure_ids"])
        else:
            frozen = {f.id for f in iter_frames([structures])}
        if frozen != wanted:
            raise SettingsError(
                f"{output}: a work directory of other structures ({len(frozen)} frozen there, "
                f"{len(frozen & wanted)} of the {len(wanted)} asked for now); give a new "
                f"--output, or remove {output} to start again"
            )
    else:
        check_writable_dir(output)
        with atomic_path(request) as tmp:
            tmp.write_text(json.dumps({"structure_ids": sorted(wanted)}))
        with atomic_path(structures) as tmp:
            ase.io.write(tmp, frames, format="extxyz")
    return label_structures(structures, output / "labels", backend, settings, progress=progress)
