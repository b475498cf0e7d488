"""Select uncertain structures: trust levels, caps, diversity; write them for labelling.

Every structure gets a class: ``accurate`` (max_force_dev < lo), ``candidate``
(lo <= max_force_dev < hi) or ``failed`` (max_force_dev >= hi, a non-finite prediction, or atoms
closer than ``min_distance_A``). With ``relative_force_level`` the levels apply to DP-GEN's relative
force deviation instead; with ``stress_lo``/``stress_hi`` the stress deviation is classified too,
and the worse class of the two counts. Candidates are selected, highest uncertainty first or, with
``diverse``, by farthest-point sampling on a structural descriptor, up to ``max_selected``.
``method: random`` is the control: ``max_selected`` drawn uniformly from every structure that is
not failed (accurate ones too) and not already labelled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers
from ase.formula import Formula
from scipy.spatial import cKDTree

from nequix_fw.descriptors import GEOMETRY_KEY, composition, geometry, structural
from nequix_fw.errors import ModelError, NequixFWError, OutputError, SettingsError
from nequix_fw.results import read_results, record_atoms
from nequix_fw.schemas import SelectionManifest
from nequix_fw.settings import SelectionSettings
from nequix_fw.structures import SELECTED_INDEX, min_distance, umask, write_structure
from nequix_fw.uncertainty import atomic_force_deviation, lower_trust_level, trust_class

if TYPE_CHECKING:
    from nequix_fw.models import NequixModel

logger = logging.getLogger(__name__)


#: Structures to select first, whatever their class: (the results' `source` they come from,
#: how many, the reason recorded), e.g. the candidates of a property check that missed.
Reserve = tuple[str, int, str]


@dataclass(slots=True)
class Entry:
    """Selection outcome of one structure (slotted: a selection holds 10^5 of them)."""

    id: str
    source: str
    frame: int
    formula: str
    n_atoms: int
    metrics: dict
    cls: str
    reason: str | None = None
    selected: bool = False
    file: str | None = None
    descriptor: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """The manifest's entry (shallow: `asdict`'s deep copies cost 0.1 ms an entry)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "descriptor"}
        d["metrics"] = dict(self.metrics)
        d["class"] = d.pop("cls")
        return d


def nearest_distances(x: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Distance from each row of `x` to its nearest row of `known` (Euclidean): a k-d tree
    over `known`, so memory and time grow with C + N, never a C x N matrix."""
    return cKDTree(known).query(x, k=1)[0]


def farthest_points(
    x: np.ndarray,
    first: int | None,
    known: np.ndarray | None = None,
    alive: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> Iterator[int]:
    """Rows of `x` in farthest-point order, each once, starting at row `first`; with `known`
    (rows already in the training set), distances count from those too, and without `first`
    the first pick is the row farthest from them. `alive` (a boolean mask the caller may clear
    between picks) leaves out the rows it clears. `weights` (> 0 per row): each pick is the row
    of largest weight x distance (uncertainty-weighted sampling). Lazy: each pick costs
    O(len(x))."""
    dist = np.full(len(x), np.inf)  # squared distances: the same order, one pass fewer
    if known is not None and len(known):
        dist = nearest_distances(x, known) ** 2
    w2 = None if weights is None else np.asarray(weights, dtype=np.float64) ** 2

    def best() -> int:
        score = dist if w2 is None or np.isposinf(dist).any() else dist * w2
        return int(np.argmax(score))

    if alive is not None:
        dist[~alive] = -np.inf
    pick = best() if first is None else first
    while dist[pick] > -np.inf:
        yield pick
        d = x - x[pick]
        np.minimum(dist, np.einsum("ij,ij->i", d, d), out=dist)
        dist[pick] = -np.inf  # never picked twice, even among equal rows
        if alive is not None:
            dist[~alive] = -np.inf
        pick = best()


def farthest_point_order(
    x: np.ndarray, first: int | None, k: int, known: np.ndarray | None = None
) -> list[int]:
    """The first `k` rows of `farthest_points`."""
    return list(islice(farthest_points(x, first, known), k))


def resolve_lo(settings: SelectionSettings, calibration: dict | None, where: str) -> float:
    """The lower trust level (eV/Å) of `lo: auto`: from `calibration` (see
    `nequix_fw.uncertainty.calibrate`), so that structures predicted to have a max force error
    under `target_force_error` are accurate."""
    if not calibration:
        raise SettingsError(
            f"select.lo: auto needs a calibration of the uncertainty, and "
            f"{where} has none (it needs a labelled test set)"
        )
    return lower_trust_level(calibration, settings.target_force_error)


def _pickable(settings: SelectionSettings) -> tuple[str, ...]:
    """The classes a method selects from: random draws accurate structures too."""
    return ("candidate", "accurate") if settings.method == "random" else ("candidate",)


def _metric(settings: SelectionSettings) -> str:
    """The force-deviation metric the trust levels apply to."""
    return "max_force_dev" if settings.relative_force_level is None else "max_relative_force_dev"


def relative_force_deviation(rec: dict, level: float) -> float:
    """DP-GEN's relative force deviation of a results record: max over atoms of the per-atom
    deviation over (|mean force| + `level`), from the record's per-model forces."""
    if rec.get("forces") is None:
        raise SettingsError(
            f"{rec['source']} frame {rec['frame']}: relative_force_level needs per-model forces "
            "in the ensemble results; run run-ensemble with ensemble.store_per_model: true"
        )
    forces = np.asarray(rec["forces"], dtype=np.float64)
    norm = np.linalg.norm(forces.mean(axis=0), axis=1)
    return float((atomic_force_deviation(forces) / (norm + level)).max())


#: Descriptors of structures, one row each (the hand-made one also takes each structure's
#: kept geometry, or None, as a second argument).
Describe = Callable[..., np.ndarray]
#: Candidates described at once: only their descriptors are kept, not their structures.
DESCRIBE_CHUNK = 1024


class KnownStructures(Protocol):
    """A training set that keeps its structures' descriptors (a store dataset,
    `nequix_fw.dataset.StoredDataset`)."""

    def structures(self) -> Iterable[Atoms]: ...
    def described(
        self, key: str, describe: Callable[[list[Atoms]], np.ndarray]
    ) -> tuple[list[np.ndarray], np.ndarray]: ...


def known_descriptors(
    settings: SelectionSettings,
    models: list[dict],
    describe: Describe,
    training_set: Sequence[Atoms] | KnownStructures,
) -> np.ndarray | None:
    """The descriptors of the training set (None when it is empty). A set that keeps them
    computes the hand-made descriptor's costly part once per structure, ever."""
    if settings.descriptor == "structure" and hasattr(training_set, "described"):
        numbers, geo = training_set.described(
            GEOMETRY_KEY, lambda structures: np.stack([geometry(a) for a in structures])
        )
        if not numbers:
            return None
        elements = _elements(models)
        return np.hstack([np.stack([composition(n, elements) for n in numbers]), geo])
    if hasattr(training_set, "structures"):
        structures = list(training_set.structures())
    else:
        structures = list(training_set)
    return describe(structures) if structures else None


def describer(settings: SelectionSettings, models: list[dict]) -> Describe:
    """The descriptor of `settings.descriptor` for the ensemble of `models` (results header
    entries): hand-made, or the learned features of the first model."""
    if settings.descriptor == "learned":
        from nequix_fw.features import LearnedFeatures  # noqa: PLC0415 (JAX: only for these)

        return LearnedFeatures(recorded_model(models[0]))
    elements = _elements(models)

    def describe(structures: Sequence[Atoms], kept: Sequence | None = None) -> np.ndarray:
        kept = kept or [None] * len(structures)
        return np.stack(
            [
                structural(a, elements)
                if g is None
                else np.concatenate([composition(a.numbers, elements), g])
                for a, g in zip(structures, kept, strict=True)
            ]
        )

    return describe


def _elements(models: list[dict]) -> list[int]:
    """The atomic numbers the models (results header entries) cover."""
    return sorted({int(z) for m in models for z in _numbers(m["elements"])})


def recorded_model(entry: dict) -> NequixModel:
    """The model a results header's `entry` names, loaded from its recorded path: refused
    unless it is the very checkpoint that was evaluated (its sha256)."""
    path = Path(entry["path"])
    if not path.is_file():
        raise ModelError(
            f"{path}: the model of these results ({entry.get('name')}) is no longer "
            "there; its learned features need that checkpoint"
        )
    from nequix_fw.models import load_model  # noqa: PLC0415 (JAX: only for learned features)

    model = load_model(path)
    if entry.get("sha256") and model.info.sha256 != entry["sha256"]:
        raise ModelError(
            f"{path}: not the model these results were evaluated with (sha256 "
            f"{model.info.sha256[:12]}..., recorded {entry['sha256'][:12]}...); its learned "
            "features would describe another model: run run-ensemble again, or use "
            "descriptor: structure"
        )
    return model


def classify(
    records: Iterable[dict], settings: SelectionSettings, describe: Describe | None = None
) -> list[Entry]:
    """Class of every record (one pass; with `diverse`, the candidates' descriptors by
    `describe`, from the geometry run-ensemble kept in a record where there is one)."""
    entries = []
    described: list[tuple[Entry, Atoms, np.ndarray | None]] = []
    keeps = settings.descriptor == "structure"
    for rec in records:
        m = rec.get("metrics") or {}
        dev = m.get("max_force_dev")
        entry = Entry(
            id=rec["id"],
            source=rec["source"],
            frame=rec["frame"],
            formula=rec["formula"],
            n_atoms=rec["n_atoms"],
            metrics=m,
            cls="candidate",
        )
        if rec.get("status") != "ok" or dev is None:
            entry.cls, entry.reason = "failed", rec.get("error") or "no prediction"
        else:
            if settings.relative_force_level is not None:
                dev = relative_force_deviation(rec, settings.relative_force_level)
                m["max_relative_force_dev"] = dev
            entry.cls = trust_class(dev, settings.lo, settings.hi)
            if entry.cls == "failed":
                entry.reason = f"{_metric(settings)} {dev:.4g} >= hi {settings.hi}"
            stress = m.get("stress_std")
            if settings.stress_lo is not None and stress is not None and entry.cls != "failed":
                sc = trust_class(stress, settings.stress_lo, settings.stress_hi)
                if sc == "failed":
                    entry.cls = "failed"
                    entry.reason = (
                        f"stress_std {stress:.4g} GPa >= stress_hi {settings.stress_hi} GPa"
                    )
                elif sc == "candidate":
                    entry.cls = "candidate"
        pickable = _pickable(settings)
        needs_atoms = entry.cls in pickable and (settings.min_distance_A or settings.diverse)
        if needs_atoms:
            atoms = record_atoms(rec)
            if settings.min_distance_A is not None:
                dmin = min_distance(atoms, cutoff=settings.min_distance_A)
                if dmin < settings.min_distance_A:
                    entry.cls = "failed"
                    entry.reason = (
                        f"min interatomic distance {dmin:.3f} Å < {settings.min_distance_A} Å"
                    )
            if entry.cls == "candidate" and settings.diverse:
                kept = rec.get(GEOMETRY_KEY) if keeps else None
                described.append((entry, atoms, None if kept is None else np.asarray(kept)))
        entries.append(entry)
        if len(described) == DESCRIBE_CHUNK:
            _describe(described, describe)
    _describe(described, describe)
    return entries


def _describe(described: list[tuple[Entry, Atoms, np.ndarray | None]], describe: Describe) -> None:
    """Give the entries their descriptors and let go of their structures."""
    if described:
        structures = [a for _, a, _ in described]
        kept = [g for _, _, g in described]
        keeps = any(g is not None for g in kept)  # the learned features keep none
        rows = describe(structures, kept) if keeps else describe(structures)
        for (entry, _, _), x in zip(described, rows, strict=True):
            entry.descriptor = x
        described.clear()


def _reserved(
    entries: list[Entry],
    reserve: Sequence[Reserve],
    settings: SelectionSettings,
    seen: set[str],
    quotas: _Quotas,
    taken_before: int = 0,
) -> list[Entry]:
    """The `Reserve` picks, at most `max_selected` with the `taken_before`: from each source,
    its most uncertain structures that did not fail, are not in `seen` (already labelled, or
    picked) and keep within the quotas, whatever their class."""
    out: list[Entry] = []
    limit = np.inf if settings.max_selected is None else settings.max_selected - taken_before
    for source, n, reason in reserve:
        pool = [e for e in entries if e.source == source and e.cls != "failed" and e.id not in seen]
        pool.sort(key=lambda e: -e.metrics[_metric(settings)])
        taken = quotas.take(pool, int(min(n, limit - len(out))))
        for e in taken:
            e.reason = reason
            seen.add(e.id)
        out += taken
    return out


def choose(
    entries: list[Entry],
    settings: SelectionSettings,
    exclude: set[str] | None = None,
    known: np.ndarray | None = None,
    reserve: Sequence[Reserve] = (),
) -> list[Entry]:
    """Mark and return the selected candidates, in selection order; candidates whose id is in
    `exclude` (already labelled) are not selected again. With `diverse`, farthest-point
    sampling starts from the most uncertain candidate, or, given `known` (descriptors of the
    training set), from the candidate least like the training set, and keeps away from it.
    The `reserve` picks come first, within `max_selected`; what uncertainty leaves of
    `max_selected` goes to the reserve's sources too (their next most uncertain, the first
    source first)."""
    exclude = exclude or set()
    pickable = _pickable(settings)
    for e in entries:
        if e.cls in pickable and e.id in exclude:
            e.reason = "already labelled"
    seen: set[str] = set(exclude)
    quotas = _Quotas(settings)  # shared: the reserve picks count towards them too
    reserved = _reserved(entries, reserve, settings, seen, quotas)
    cands = []
    for e in entries:  # the same structure twice in the input is selected once
        if e.cls in pickable and e.id not in seen:
            seen.add(e.id)
            cands.append(e)
    budget = None if settings.max_selected is None else settings.max_selected - len(reserved)
    k = len(cands) if budget is None else max(0, min(budget, len(cands)))
    if settings.method == "random":
        order = np.random.default_rng(settings.seed).permutation(len(cands))
        chosen = quotas.take((cands[i] for i in order), k)
        position = {id(e): i for i, e in enumerate(cands)}
        chosen.sort(key=lambda e: position[id(e)])  # in input order
    else:
        cands.sort(key=lambda e: -e.metrics[_metric(settings)])
        if settings.diverse and 0 < k < len(cands):
            chosen = _farthest_within(
                cands,
                k,
                known,
                quotas,
                settings.diverse_weighting == "uncertainty",
                _metric(settings),
            )
        else:
            chosen = quotas.take(cands, k)
    if reserve and budget is not None and len(chosen) < budget:
        # what uncertainty left of max_selected goes to the reserve's sources too
        more = [(source, budget - len(chosen), reason) for source, _, reason in reserve]
        reserved += _reserved(entries, more, settings, seen, quotas, len(reserved) + len(chosen))
    chosen = reserved + chosen
    for e in chosen:
        e.selected = True
    return chosen


def _farthest_within(
    cands: list[Entry],
    k: int,
    known: np.ndarray | None,
    quotas: _Quotas,
    weighted: bool = False,
    metric: str = "max_force_dev",
) -> list[Entry]:
    """The first `k` candidates (most uncertain first) in farthest-point order that keep
    within the quotas (`weighted`: the distances weighted by each candidate's `metric`). A
    candidate leaves the pool as soon as a quota it falls under is full (with that reason), so
    every pick is taken: at most `k` picks of O(len(cands)) each."""
    x = np.stack([e.descriptor for e in cands])
    alive = np.ones(len(cands), dtype=bool)
    members: dict[tuple[str, str], list[int]] = {}
    if quotas.active:
        for i, e in enumerate(cands):
            for key in quotas.keys(e):
                members.setdefault(key, []).append(i)

    def close(keys: Iterable[tuple[str, str]]) -> None:
        for key in keys:
            out = [i for i in members.pop(key, ()) if alive[i]]
            alive[out] = False
            for i in out:
                cands[i].reason = quotas.reason(key)

    close([key for key in members if quotas.full(key)])  # filled by the reserve
    if not alive.any():
        return []
    first = None if known is not None else int(np.argmax(alive))
    weights = None
    if weighted:  # the most uncertain of the distinct, not only the most distinct
        weights = np.array([max(e.metrics[metric], 1e-12) for e in cands])
    chosen = []
    for i in islice(farthest_points(x, first, known, alive, weights), k):
        alive[i] = False
        chosen.append(cands[i])
        close(quotas.count(cands[i]))
    return chosen


class _Quotas:
    """The per-element and per-composition quotas of one selection, and what it has taken.
    A quota's key is ``("element", symbol)`` or ``("composition", reduced formula)``."""

    def __init__(self, settings: SelectionSettings):
        self.limits = {("element", el): n for el, n in (settings.max_per_element or {}).items()}
        self.max_per_composition = settings.max_per_composition or np.inf
        self.taken: dict[tuple[str, str], int] = {}
        self._keys: dict[str, list[tuple[str, str]]] = {}  # per formula

    @property
    def active(self) -> bool:
        return bool(self.limits) or self.max_per_composition < np.inf

    def keys(self, e: Entry) -> list[tuple[str, str]]:
        """The quotas `e` falls under: its elements', then its composition's."""
        keys = self._keys.get(e.formula)
        if keys is None:
            formula = Formula(e.formula)
            elements = [("element", el) for el in formula.count()]
            keys = self._keys[e.formula] = [*elements, ("composition", str(formula.reduce()[0]))]
        return keys

    def limit(self, key: tuple[str, str]) -> float:
        return self.max_per_composition if key[0] == "composition" else self.limits.get(key, np.inf)

    def full(self, key: tuple[str, str]) -> bool:
        return self.taken.get(key, 0) >= self.limit(key)

    @staticmethod
    def reason(key: tuple[str, str]) -> str:
        return f"quota: max_per_{key[0]} {key[1]}"

    def count(self, e: Entry) -> list[tuple[str, str]]:
        """Count `e` as taken; the quotas it fills."""
        filled = []
        for key in self.keys(e):
            self.taken[key] = self.taken.get(key, 0) + 1
            if self.full(key):
                filled.append(key)
        return filled

    def take(self, ordered: Iterable[Entry], k: int) -> list[Entry]:
        """The first `k` of `ordered` that keep within the quotas, counted as taken (those
        passed over get the reason)."""
        if not self.active:
            return list(islice(ordered, k))
        chosen = []
        for e in ordered:
            if len(chosen) == k:
                break
            full = [key for key in self.keys(e) if self.full(key)]
            if full:
                e.reason = self.reason(full[0])
                continue
            chosen.append(e)
            self.count(e)
        return chosen


def check_quotas(settings: SelectionSettings, elements: list[str], where: str) -> None:
    """Refuse quotas for elements that none of the structures holds."""
    missing = sorted(set(settings.max_per_element) - set(elements))
    if missing:
        raise SettingsError(
            f"select.max_per_element: {', '.join(missing)} in none of the "
            f"structures of {where} (they hold {', '.join(elements)})"
        )


def _prepare_output(output: Path) -> Path:
    """A fresh temp dir beside `output`; refuse to replace a non-empty dir that is not ours."""
    if output.exists():
        if not output.is_dir():
            raise OutputError(f"{output}: exists and is not a directory")
        if any(output.iterdir()) and not (output / "manifest.json").is_file():
            raise OutputError(
                f"{output}: directory is not empty and holds no selection manifest; "
                "choose another output directory"
            )
    parent = output.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{output.name}.tmp-"))
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; the selection is not
        return tmp
    except OSError as exc:
        raise OutputError(f"{output}: cannot write there ({exc.strerror or exc})") from None


def _swap_into_place(tmp: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{output.name}.old-"))
        os.replace(output, old / "x")
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old)


def select_from_results(
    results_path: str | Path,
    output: str | Path,
    settings: SelectionSettings,
    exclude: set[str] | None = None,
    training_set: Sequence[Atoms] | KnownStructures | None = None,
    reserve: Sequence[Reserve] = (),
    calibration: dict | None = None,
    calibration_of: str = "the validation given",
) -> dict:
    """Classify and select from an ensemble-results file; write files + manifest atomically.

    With `diverse` and a `training_set` (structures, or a store dataset, which keeps its
    structures' descriptors), the picks keep away from its structures as well as from each
    other. Structures whose id is in `exclude` (e.g. those already in the training
    set) are never selected; the `reserve` picks come first. ``lo: auto`` is resolved from
    `calibration` (that of the validation of the ensemble that predicted, named
    `calibration_of` in errors; see `resolve_lo`), and the manifest records the number.
    Returns the manifest. The output directory appears complete or not at all.
    """
    results_path, output = Path(results_path), Path(output)
    if settings.lo == "auto":
        lo = resolve_lo(settings, calibration, calibration_of)
        settings = settings.model_copy(update={"lo": lo})
    header, records = read_results(results_path)
    n_models = len(header.get("models", []))
    if n_models < 2 and header.get("uncertainty_method") != "llpr":
        raise NequixFWError(
            f"{results_path}: uncertainty needs at least 2 models or one with LLPR heads, "
            f"these results have {n_models} model(s) and no heads"
        )
    describe = describer(settings, header["models"]) if settings.diverse else None
    entries = classify(records, settings, describe)
    if not entries:
        raise NequixFWError(f"{results_path}: holds no structures")
    present = sorted({el for f in {e.formula for e in entries} for el in Formula(f).count()})
    check_quotas(settings, present, str(results_path))
    known = None
    if settings.diverse and training_set is not None:
        known = known_descriptors(settings, header["models"], describe, training_set)
    chosen = {e.id: e for e in choose(entries, settings, exclude, known, reserve)}
    reasons = {reason for _, _, reason in reserve}
    tmp = _prepare_output(output)
    try:
        suffix = "vasp" if settings.format == "vasp" else "extxyz"
        _, records = read_results(results_path, set(chosen))  # the chosen structures
        files = []
        for rec in records:
            entry = chosen.pop(rec["id"], None)
            if entry is not None:
                entry.file = f"{rec['id']}.{suffix}"
                atoms = record_atoms(rec)
                atoms.info.update(id=rec["id"], source=rec["source"], frame=rec["frame"])
                write_structure(atoms, tmp / entry.file, settings.format)
                files.append({"file": entry.file, "id": rec["id"]})
        files.sort(key=lambda f: f["file"])  # the order in which the directory is read
        (tmp / SELECTED_INDEX).write_text(json.dumps({"structures": files}, indent=0))
        counts = {c: sum(e.cls == c for e in entries) for c in ("accurate", "candidate", "failed")}
        counts["selected"] = sum(e.selected for e in entries)
        counts["already_labelled"] = sum(e.reason == "already labelled" for e in entries)
        counts["reserved"] = sum(e.selected and e.reason in reasons for e in entries)
        doc = SelectionManifest(  # checked without its entries: pydantic would copy 10^5
            ensemble_results=str(results_path.resolve()),
            models=header["models"],
            settings=settings.model_dump(mode="json"),
            counts=counts,
            structures=[],
        )
        manifest = {**doc.to_dict(), "structures": [e.to_dict() for e in entries]}
        doc.to_file(tmp / "manifest.json", manifest)
        _swap_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    classes = ", ".join(f"{n} {c}" for c, n in counts.items())
    logger.info("selection from %s: %s -> %s", results_path, classes, output)
    return manifest


def _numbers(symbols: list[str]) -> list[int]:
    return [atomic_numbers[s] for s in symbols]
