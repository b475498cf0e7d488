"""The MongoDB store: datasets and everything a campaign produces, in the LaunchPad's database.

A campaign and its data share one MongoDB database (your own ``mongod`` or the local server of
`nequix_fw.server`, as ``my_launchpad.yaml`` says). Collections, every write an idempotent
upsert keyed by content (rerunning a stage never duplicates anything):

- ``nequix_fw_dataset``: labelled structures; ``_id`` ``NAME/<structure id>`` (datasets are
  ``db:NAME`` on the command line);
- ``nequix_fw_iterations``: one record per campaign iteration (counts, selection, decisions,
  validation metrics, stop reason); ``_id`` ``CAMPAIGN/<k>``;
- ``nequix_fw_label_tasks``: one labelling task document per structure and iteration (settings
  hash, custodian corrections in full, wall time, status, reason);
- ``nequix_fw_models``: one document per trained member (metadata, sha256) with the checkpoint
  in the GridFS bucket ``nequix_fw_checkpoints``;
- ``nequix_fw_validation`` and ``nequix_fw_selections``: the iteration's validation report and
  selection manifest (its counts and settings; every candidate's entry is a document of
  ``nequix_fw_selection_entries``, so no document grows with the number of candidates).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import ase.db
import ase.io
import gridfs
import numpy as np
import pymongo
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from fireworks import LaunchPad, fw_config
from monty.json import jsanitize
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from nequix_fw.descriptors import GEOMETRY_KEY, geometry
from nequix_fw.errors import Interrupted, SettingsError, StructureError
from nequix_fw.structures import STORE_PREFIX, Frame, atomic_path, check_output, is_store_spec
from nequix_fw.uncertainty import heads_path

PREFIX = STORE_PREFIX
COLLECTION = "nequix_fw_dataset"
ITERATIONS = "nequix_fw_iterations"
LABEL_TASKS = "nequix_fw_label_tasks"
MODELS = "nequix_fw_models"
CHECKPOINTS = "nequix_fw_checkpoints"  # GridFS bucket
VALIDATION = "nequix_fw_validation"
SELECTIONS = "nequix_fw_selections"
SELECTED = "nequix_fw_selection_entries"
DATASETS = "nequix_fw_datasets"
#: What each collection holds, {name: (one document per, its _id)}: the docs' reference.
COLLECTIONS = {
    COLLECTION: (
        "labelled structure of dataset NAME: structure, labels (eV, eV/Å, eV/Å³, ASE sign), "
        "provenance in `info` (backend, settings hash, iteration, corrections, source) and the "
        "structure's descriptor once a diverse selection computed it",
        "NAME/<structure id>",
    ),
    ITERATIONS: (
        "campaign iteration: counts, selection, trajectory stops, validation metrics, property "
        "errors, stop reason",
        "CAMPAIGN/<k>",
    ),
    LABEL_TASKS: (
        "labelling task: settings and their hash, custodian corrections in full, wall time, "
        "status, reason",
        "CAMPAIGN/<k>/<structure id>",
    ),
    MODELS: (
        "trained member: metadata, sha256, the GridFS id of its checkpoint (bucket "
        f"`{CHECKPOINTS}`)",
        "CAMPAIGN/<k>/member_<i>",
    ),
    VALIDATION: (
        "iteration's validation report (per model, ensemble mean, per element, uncertainty "
        "quality, property checks)",
        "CAMPAIGN/<k>",
    ),
    SELECTIONS: ("iteration's selection: its counts and settings", "CAMPAIGN/<k>"),
    SELECTED: (
        "candidate of an iteration's selection: metrics, class, reason, system, position",
        "CAMPAIGN/<k>/<system or ->/<position>",
    ),
    DATASETS: (
        "dataset's summary: how many structures it holds and the labelling settings hashes "
        "they carry (kept by every add, so no query reads the whole dataset for them)",
        "NAME",
    ),
}
#: The fields people filter by, per collection.
INDEXES = {
    COLLECTION: [
        ("dataset", "structure_id"),
        ("dataset", "added"),
        ("dataset", "info.iteration"),
        ("dataset", "info.settings_hash"),
        ("info.settings_hash",),
        ("info.backend",),
        ("formula",),
    ],
    ITERATIONS: [("campaign", "iteration"), ("stop_reason",)],
    LABEL_TASKS: [("campaign", "iteration"), ("structure_id",), ("status",), ("settings_hash",)],
    MODELS: [("campaign", "iteration"), ("sha256",)],
    VALIDATION: [("campaign", "iteration")],
    SELECTIONS: [("campaign", "iteration")],
    SELECTED: [("campaign", "iteration", "position"), ("structure_id",), ("selected",)],
}
_INDEXED: set[tuple[int, str]] = set()
#: Structures per round trip when a dataset grows.
BULK = 1000
#: Seconds after which a writer noted in a dataset's summary, from another host, counts as gone.
STALE_S = 86400
#: MongoDB's error code of an insert whose ``_id`` (or unique key) exists.
DUPLICATE_KEY = 11000
#: A LaunchPad file, or the database of a LaunchPad already open (a FireTask's).
DatabaseRef = str | Path | Database
_DATABASES: dict[str, Database] = {}


def launchpad_db(launchpad: DatabaseRef | None = None) -> Database:
    """The pymongo database of a LaunchPad file (one client per file and process), or
    `launchpad` itself when it already is one."""
    if isinstance(launchpad, Database):
        return launchpad

    path = launchpad or fw_config.LAUNCHPAD_LOC
    if path is None and Path("my_launchpad.yaml").is_file():
        path = "my_launchpad.yaml"
    if path is None:
        raise SettingsError(
            "store datasets (db:NAME) need a LaunchPad file: the launchpad "
            "argument (command line: --launchpad my_launchpad.yaml) or "
            "FireWorks' LAUNCHPAD_LOC"
        )
    key = str(Path(path).resolve())
    if key not in _DATABASES:
        if not Path(path).is_file():
            raise SettingsError(f"{path}: LaunchPad file not found")
        try:
            lp = LaunchPad.from_file(str(path))
        except Exception as exc:  # a malformed file: name it, not the YAML internals
            raise SettingsError(
                f"{path}: not a usable LaunchPad file ({type(exc).__name__})"
            ) from None
        if _refused(lp.host, lp.port):  # nothing listens there: say so now, not in 30 s
            raise SettingsError(
                f"{path}: cannot reach MongoDB at {lp.host}:{lp.port}: connection refused (start "
                "the local one with: nequix-fw db start)"
            )
        try:
            lp.db.list_collection_names()  # reachable, and the credentials are accepted
        except pymongo.errors.OperationFailure as exc:
            raise SettingsError(
                f"{path}: the database {lp.host}:{lp.port} refused access "
                f"({exc.details.get('errmsg', 'authentication failed')})"
            ) from None
        except pymongo.errors.PyMongoError:
            raise SettingsError(
                f"{path}: cannot reach MongoDB at {lp.host}:{lp.port} (start "
                "the local one with: nequix-fw db start)"
            ) from None
        _DATABASES[key] = lp.db
    return _DATABASES[key]


def _refused(host: str, port: int | None) -> bool:
    """Whether a plain host:port (not a URI) refuses connections: no server listens there."""
    if "://" in str(host) or "," in str(host) or not port:
        return False
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:  # unknown host, unreachable network, slow: leave it to pymongo
        return False
    return False


def collection(db: Database, name: str):
    """A store collection, its indexes made on first use in this process."""
    if (id(db), name) not in _INDEXED:
        for fields in INDEXES.get(name, []):
            db[name].create_index([(f, 1) for f in fields])
        _INDEXED.add((id(db), name))
    return db[name]


class Store:
    """The store in a LaunchPad's database, as the stages get it: built at the edge (the CLI
    from ``--launchpad``, a FireTask from the LaunchPad that runs it) and passed in. It
    connects on first use, so a command that reads no ``db:NAME`` dataset never needs one.
    Without a LaunchPad it uses FireWorks' LAUNCHPAD_LOC or ./my_launchpad.yaml."""

    def __init__(self, launchpad: DatabaseRef | None = None):
        self.launchpad = launchpad

    def dataset(self, spec: str) -> StoreDataset:
        """The dataset ``db:NAME`` of this store."""
        return StoreDataset(spec, self.launchpad)


class StoreDataset:
    """A named dataset in the store: read it as labelled frames, add structures idempotently."""

    def __init__(self, spec: str, launchpad: str | Path | None = None):
        self.name = str(spec)[len(PREFIX) :] if is_store_spec(spec) else str(spec)
        if not self.name or "/" in self.name:
            raise SettingsError(f"{spec!r}: a store dataset is named db:NAME (no '/')")
        db = launchpad_db(launchpad)
        self.collection = collection(db, COLLECTION)
        self.summaries = db[DATASETS]

    def __str__(self) -> str:
        return PREFIX + self.name

    def __len__(self) -> int:
        """How many structures the dataset holds: its summary's count, kept by every add.
        The count is exact (a query of every structure) when the summary has none, or has a
        writer in flight; a count that no writer can change meanwhile is then kept."""
        summary = self.summaries.find_one({"_id": self.name}) or {}
        writers = summary.get("writers") or {}
        if "n_structures" in summary and not writers:
            return summary["n_structures"]
        n = self.collection.count_documents({"dataset": self.name})
        if all(_gone(w) for w in writers.values()):  # nothing in flight can add to n
            try:
                self.summaries.update_one(
                    {"_id": self.name, "epoch": summary.get("epoch", {"$exists": False})},
                    {"$set": {"n_structures": n, "writers": {}}},
                    upsert=not summary,
                )
            except pymongo.errors.DuplicateKeyError:  # a writer made the summary meanwhile
                pass
        return n

    def exists(self) -> bool:
        """Whether anything was ever added to the dataset (its summary; an older version's
        dataset, without one, is looked up)."""
        summary = self.summaries.find_one({"_id": self.name})
        if summary is not None and summary.get("settings_hashes"):  # `add` notes one, at least
            return True
        return self.collection.find_one({"dataset": self.name}, {"_id": 1}) is not None

    def __bool__(self) -> bool:  # a dataset object, empty or not (never a count for it)
        return True

    def ids(self, before_iteration: int | None = None) -> set[str]:
        """The structure ids (content hashes) in the dataset; with `before_iteration`, those
        added before that campaign iteration (or without one)."""
        query: dict = {"dataset": self.name}
        if before_iteration is not None:
            query["$or"] = [{"info.iteration": {"$lt": before_iteration}}, {"info.iteration": None}]
        return set(self.collection.distinct("structure_id", query))

    def settings_hashes(self) -> set:
        """The levels of theory (labelling settings hashes) in the dataset; None stands for
        structures ingested from plain files (no labelling settings). From the dataset's
        summary, which `add` keeps; a dataset without a complete one (made by an older
        version) is read once and its summary completed."""
        summary = self.summaries.find_one({"_id": self.name})
        if summary is not None and summary.get("complete"):
            return set(summary["settings_hashes"])
        out = set(self.collection.distinct("info.settings_hash", {"dataset": self.name}))
        query = {"dataset": self.name, "info.settings_hash": None}  # missing or null
        if self.collection.find_one(query, {"_id": 1}) is not None:
            out.add(None)
        # what was added since the read above is in the summary already (see `add`)
        self._note_hashes(out, complete=True)
        return out

    def _note_hashes(self, hashes: set, complete: bool = False) -> None:
        update: dict = {"$addToSet": {"settings_hashes": {"$each": sorted(hashes, key=str)}}}
        if complete:
            update["$set"] = {"complete": True}
        self.summaries.update_one({"_id": self.name}, update, upsert=True)

    def frames(self, ids: set[str] | None = None, where: dict | None = None):
        """The dataset's structures (those with the given ids, and matching the MongoDB filter
        `where`, if any) as `Frame`s with their labels and provenance, in the order they were
        added."""
        query: dict = {**(where or {}), "dataset": self.name}
        if ids is None:
            docs = self.collection.find(query).sort("added", 1)
        else:  # sorted here: a server sort could pick the `added` index and read every document
            query["structure_id"] = {"$in": sorted(ids)}
            docs = sorted(self.collection.find(query), key=lambda d: d["added"])
        for k, doc in enumerate(docs):
            atoms = Atoms(
                numbers=doc["numbers"],
                positions=doc["positions"],
                cell=doc["cell"],
                pbc=doc["pbc"],
                info=dict(doc.get("info") or {}),
            )
            stress = None if doc.get("stress") is None else np.array(doc["stress"])
            forces = np.array(doc["forces"])
            atoms.calc = SinglePointCalculator(
                atoms, energy=doc["energy"], forces=forces, stress=stress
            )
            yield Frame(atoms, str(self), k)

    def structures(self) -> Iterator[Atoms]:
        """The dataset's structures without their labels (a lighter read than `frames`), in
        the order they were added."""
        fields = {"numbers": 1, "positions": 1, "cell": 1, "pbc": 1, "_id": 0}
        docs = self.collection.find({"dataset": self.name}, fields).sort("added", 1)
        for doc in docs:
            yield _atoms(doc)

    def described(
        self, key: str, describe: Callable[[list[Atoms]], np.ndarray]
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Each structure's atomic numbers and descriptor `key` (in no particular order). A
        descriptor is kept in its structure's document (``descriptors.<key>``): `describe`
        computes it once, for the structures that have none yet, and it is written back. The
        summary records a key every structure has, so the search for those without it runs
        once (`add` writes `GEOMETRY_KEY` with every structure)."""
        field = f"descriptors.{key}"
        summary = self.summaries.find_one({"_id": self.name}) or {}
        numbers, rows = [], []
        if key != GEOMETRY_KEY or key not in summary.get("described", []):
            query = {"dataset": self.name, field: {"$exists": False}}
            missing = [d["_id"] for d in self.collection.find(query, {"_id": 1})]
            self._describe(missing, key, describe)
        docs = self.collection.find({"dataset": self.name}, {"numbers": 1, field: 1})
        late = []  # stored without one since (by an older version): described now
        for doc in docs:  # the server sorts nothing: the order does not matter here
            row = (doc.get("descriptors") or {}).get(key)
            if row is None:
                late.append(doc["_id"])
                continue
            numbers.append(np.asarray(doc["numbers"]))
            rows.append(row)
        for doc, row in self._describe(late, key, describe):
            numbers.append(np.asarray(doc["numbers"]))
            rows.append(row)
        if key == GEOMETRY_KEY:
            self.summaries.update_one(
                {"_id": self.name}, {"$addToSet": {"described": key}}, upsert=True
            )
        return numbers, np.array(rows, dtype=np.float64)

    def _describe(
        self, ids: list, key: str, describe: Callable[[list[Atoms]], np.ndarray]
    ) -> list[tuple[dict, list]]:
        """Describe the documents `ids` and write their descriptor `key` back; returns
        (document, descriptor) pairs."""
        fields = {"numbers": 1, "positions": 1, "cell": 1, "pbc": 1}
        out = []
        for chunk_ids in _batches(ids, BULK):
            chunk = list(self.collection.find({"_id": {"$in": chunk_ids}}, fields))
            rows = [row.tolist() for row in describe([_atoms(d) for d in chunk])]
            _bulk_write(
                self.collection,
                (
                    pymongo.UpdateOne({"_id": d["_id"]}, {"$set": {f"descriptors.{key}": row}})
                    for d, row in zip(chunk, rows, strict=True)
                ),
            )
            out += zip(chunk, rows, strict=True)
        return out

    def add(self, structures: list[Atoms]) -> int:
        """Insert labelled structures (``info['structure_id']`` required), `BULK` per round
        trip (unordered inserts keyed by dataset and structure id); those already present are
        left alone (their duplicate-key errors are expected). Each keeps its hand-made
        descriptor's geometry (``descriptors.<GEOMETRY_KEY>``), computed here once, for
        diverse selection against the dataset. One batch is described while the server
        writes the one before. Returns how many were new."""
        start = time.time_ns()  # `added`, the order of addition, without a query for it
        n_new, stored, sent = 0, 0, 0
        pending: Future | None = None
        token = self._begin_write()
        with ThreadPoolExecutor(max_workers=1) as writer:
            try:
                for begin in range(0, len(structures), BULK):
                    chunk = structures[begin : begin + BULK]
                    docs = [self._document(a, start + begin + k) for k, a in enumerate(chunk)]
                    # the summary first: it may name a level a failed insert left out, never
                    # miss one that is stored
                    self._note_hashes({d["info"].get("settings_hash") for d in docs})
                    if pending is not None:
                        n_new += pending.result()
                        stored, sent = begin, 0
                    pending, sent = writer.submit(_insert_new, self.collection, docs), len(docs)
                if pending is not None:
                    n_new += pending.result()
            except KeyboardInterrupt:  # the batch in flight is written before this is raised
                self._end_write(token, None)
                raise Interrupted(
                    f"interrupted: {stored} of {len(structures)} structures stored in {self} "
                    f"(and up to {sent} more sent)",
                    stored=stored,
                    in_flight=sent,
                ) from None
            except BaseException:
                self._end_write(token, None)
                raise
        self._end_write(token, n_new)
        return n_new

    def _begin_write(self) -> str:
        """Note a writer in the summary (who, since when) and start a new epoch, so that a
        count taken meanwhile is not kept (`__len__`); returns the writer's token."""
        token = uuid.uuid4().hex
        writer = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        self.summaries.update_one(
            {"_id": self.name},
            {"$set": {f"writers.{token}": writer}, "$inc": {"epoch": 1}},
            upsert=True,
        )
        return token

    def _end_write(self, token: str, n_new: int | None) -> None:
        """The writer `token` is done: `n_new` structures more in the count, or (None: a
        write that failed or was stopped part-way) the count is no longer known."""
        done = {"$unset": {f"writers.{token}": ""}}
        if n_new is None:
            done["$unset"]["n_structures"] = ""
        elif self.summaries.update_one(
            {"_id": self.name, "n_structures": {"$exists": True}},
            {**done, "$inc": {"n_structures": n_new}},
        ).matched_count:
            return
        self.summaries.update_one({"_id": self.name}, done)

    def _document(self, a: Atoms, added: int) -> dict:
        sid = a.info.get("structure_id")
        if not sid:
            raise StructureError("structures added to the store need info['structure_id']")
        if a.calc is None:
            raise StructureError(f"structure {sid}: no labels to store")
        labels = a.calc.results  # set from the checked labels (`labels.labels_of`)
        stress = labels.get("stress")
        return {
            "_id": f"{self.name}/{sid}",
            "dataset": self.name,
            "structure_id": sid,
            "added": added,
            "formula": a.get_chemical_formula(),
            "n_atoms": len(a),
            "numbers": a.numbers.tolist(),
            "positions": a.positions.tolist(),
            "cell": a.cell[:].tolist(),
            "pbc": a.pbc.tolist(),
            "energy": float(labels["energy"]),
            "forces": np.asarray(labels["forces"]).tolist(),
            "stress": None if stress is None else np.asarray(stress).tolist(),
            "info": {k: _plain(v) for k, v in a.info.items()},
            "descriptors": {GEOMETRY_KEY: geometry(a).tolist()},
        }


def _gone(writer: dict) -> bool:
    """Whether a writer noted in a dataset's summary can write no more: a process of this
    host that is no longer running, or one that began `STALE_S` ago."""
    if time.time() - writer.get("since", 0) > STALE_S:
        return True
    if writer.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(writer["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process
        return False
    return False


def _insert_new(coll, docs: list[dict]) -> int:
    """Insert `docs` unordered; those whose ``_id`` is there already are left alone. Returns
    how many were inserted. (A plain insert: an upsert per document costs a query each.)"""
    try:
        return len(coll.insert_many(docs, ordered=False).inserted_ids)
    except BulkWriteError as e:
        other = [w for w in e.details["writeErrors"] if w.get("code") != DUPLICATE_KEY]
        if other:
            raise
        return int(e.details["nInserted"])


def _batches(items: Iterable, n: int) -> Iterator[list]:
    items = iter(items)
    while batch := list(islice(items, n)):
        yield batch


def _bulk_write(coll, ops: Iterable) -> None:
    """Write `ops` (pymongo write operations) unordered, `BULK` per round trip."""
    for batch in _batches(ops, BULK):
        coll.bulk_write(batch, ordered=False)


def _atoms(doc: dict) -> Atoms:
    """The structure of a dataset document (no labels)."""
    return Atoms(
        numbers=doc["numbers"], positions=doc["positions"], cell=doc["cell"], pbc=doc["pbc"]
    )


def _plain(value):
    """A JSON/BSON-friendly copy of an info value."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class CampaignStore:
    """What a campaign produces, per iteration, in the store's collections."""

    def __init__(self, launchpad: DatabaseRef, campaign: str):
        self.db = launchpad_db(launchpad)
        self.campaign = campaign

    def _key(self, k: int, *rest) -> str:
        return "/".join([self.campaign, str(k), *map(str, rest)])

    def _put(self, name: str, key: str, k: int, doc: dict) -> None:
        self._put_many(name, k, [(key, doc)])

    def _put_many(self, name: str, k: int, docs: Iterable[tuple[str, dict]]) -> None:
        """Upsert iteration k's documents (key, document) into collection `name`, `BULK` per
        round trip."""
        ops = (
            pymongo.ReplaceOne(
                {"_id": key},
                jsanitize(
                    {**doc, "campaign": self.campaign, "iteration": k},
                    strict=False,
                    allow_bson=True,
                ),
                upsert=True,
            )
            for key, doc in docs
        )
        _bulk_write(collection(self.db, name), ops)

    def save_iteration(self, k: int, record: dict) -> None:
        self._put(ITERATIONS, self._key(k), k, record)

    def iterations(self) -> list[dict]:
        docs = collection(self.db, ITERATIONS).find({"campaign": self.campaign}, {"_id": 0})
        return list(docs.sort("iteration", 1))

    def save_label_tasks(self, k: int, tasks: list[dict]) -> None:
        self._put_many(LABEL_TASKS, k, ((self._key(k, t["structure_id"]), t) for t in tasks))

    def save_selection(self, k: int, manifests: dict[str | None, dict]) -> None:
        """Iteration k's selection manifests, by system (None: a campaign of one system): one
        document of their counts and settings in `SELECTIONS`, and one per candidate in
        `SELECTED` (every document stays small, however many candidates there are)."""
        heads = {
            name: {
                **{key: v for key, v in m.items() if key != "structures"},
                "n_structures": len(m["structures"]),
            }
            for name, m in manifests.items()
        }
        self._put(SELECTIONS, self._key(k), k, heads[None] if None in heads else {"systems": heads})
        for name, m in manifests.items():
            system = "-" if name is None else name
            entries = (
                (self._key(k, system, i), {**e, "system": name, "position": i})
                for i, e in enumerate(m["structures"])
            )
            self._put_many(SELECTED, k, entries)

    def save_validation(self, k: int, report: dict) -> None:
        self._put(VALIDATION, self._key(k), k, report)

    def save_members(self, k: int, model_dir: Path, metas: list[dict]) -> None:
        """Each member's metadata, and its checkpoint (and LLPR heads, where it has them) in
        GridFS (each file stored once per sha256)."""
        fs = gridfs.GridFS(self.db, CHECKPOINTS)
        for meta in metas:
            path = Path(model_dir) / f"member_{meta['member']}.nqx"
            doc = {"member": meta["member"], "metadata": meta}
            doc.update(self._put_file(fs, path, k))
            heads = heads_path(path)
            if heads.is_file():
                doc["llpr"] = self._put_file(fs, heads, k)
            self._put(MODELS, self._key(k, path.stem), k, doc)

    def _put_file(self, fs, path: Path, k: int) -> dict:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        old = fs.find_one({"metadata.sha256": sha})
        file_id = (
            old._id
            if old is not None
            else fs.put(
                data,
                filename=path.name,
                metadata={"sha256": sha, "campaign": self.campaign, "iteration": k},
            )
        )
        return {"file": path.name, "sha256": sha, "gridfs_id": file_id}

    def fetch_members(self, k: int, outdir: Path) -> list[Path]:
        """Write iteration k's member checkpoints (and their LLPR heads) from GridFS into
        `outdir` (checked against their sha256), for a worker without the campaign's
        filesystem; the checkpoints' paths."""
        outdir = check_output(outdir, "directory")
        fs = gridfs.GridFS(self.db, CHECKPOINTS)
        query = {"campaign": self.campaign, "iteration": k}
        docs = list(collection(self.db, MODELS).find(query).sort("member", 1))
        if not docs:
            raise SettingsError(f"campaign {self.campaign}: no models of iteration {k} stored")
        outdir.mkdir(parents=True, exist_ok=True)
        paths = []
        for doc in docs:
            for part in (doc, doc.get("llpr")):
                if part is None:
                    continue
                data = fs.get(part["gridfs_id"]).read()
                if hashlib.sha256(data).hexdigest() != part["sha256"]:
                    raise SettingsError(
                        f"{part['file']} of iteration {k}: stored file does not match its sha256"
                    )
                with atomic_path(outdir / part["file"]) as tmp:
                    tmp.write_bytes(data)
            paths.append(outdir / doc["file"])
        return paths


def export_dataset(
    spec: str,
    output: str | Path,
    fmt: str = "extxyz",
    launchpad: DatabaseRef | None = None,
    iterations: list[int] | None = None,
    backend: str | None = None,
    settings_hash: str | None = None,
) -> int:
    """Write a store dataset (or the part of it from these iterations, labelling backend and
    settings hash) to an extxyz file or an ASE database, atomically; how many structures."""

    if fmt not in ("extxyz", "ase-db"):
        raise SettingsError(f"export format {fmt!r}: extxyz or ase-db")
    output = check_output(output, "file")
    where: dict = {}
    if iterations:
        where["info.iteration"] = {"$in": list(iterations)}
    if backend:
        where["info.backend"] = backend
    if settings_hash:
        where["info.settings_hash"] = settings_hash
    store = StoreDataset(spec, launchpad)
    frames = [f.atoms for f in store.frames(where=where)]
    if not frames:
        raise SettingsError(f"{store}: no structures match ({where or 'the whole dataset'})")
    with atomic_path(output) as tmp:
        if fmt == "extxyz":
            ase.io.write(tmp, frames, format="extxyz")
        else:
            tmp.unlink()  # ASE makes the database file itself
            with ase.db.connect(tmp, type="db", append=False) as db:
                for a in frames:  # ASE keeps plain values under identifier keys
                    plain = (int, float, str)
                    pairs = {
                        k: v for k, v in a.info.items() if k.isidentifier() and isinstance(v, plain)
                    }
                    db.write(a, key_value_pairs=pairs)
    return len(frames)
