"""The MongoDB store: labelled structures of a named dataset, with provenance.

The dataset lives in the FireWorks LaunchPad's database (collection ``nequix_fw_dataset``), so a
campaign and its training data share one database: a real MongoDB (``my_launchpad.yaml``) or
FireWorks' embedded mongomock backend (``MONGOMOCK_SERVERSTORE_FILE``; that store is loaded at
start and written back at exit, so one process at a time owns it). Datasets are named on the
command line as ``db:NAME``. Every document's ``_id`` is ``NAME/<structure content hash>``, so
adding the same structure twice never duplicates it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from nequix_fw.errors import SettingsError, StructureError

PREFIX = "db:"
COLLECTION = "nequix_fw_dataset"
_DATABASES: dict[str, object] = {}


def is_store_spec(spec: str | Path) -> bool:
    """Whether a dataset argument names a store dataset (``db:NAME``)."""
    return str(spec).startswith(PREFIX)


def launchpad_db(launchpad: str | Path | None = None):
    """The LaunchPad's pymongo database, one client per process (the embedded store must not be
    opened twice: each client would write its own copy back at exit)."""
    from fireworks import fw_config

    path = launchpad or fw_config.LAUNCHPAD_LOC
    if path is None and Path("my_launchpad.yaml").is_file():
        path = "my_launchpad.yaml"
    if path is None:
        raise SettingsError("store datasets (db:NAME) need a LaunchPad file: pass --launchpad "
                            "my_launchpad.yaml or set FireWorks' LAUNCHPAD_LOC")  # fmt: skip
    key = str(Path(path).resolve())
    if key not in _DATABASES:
        from fireworks import LaunchPad

        if not Path(path).is_file():
            raise SettingsError(f"{path}: LaunchPad file not found")
        mock = ensure_embedded_store()
        shared = _open_embedded_store(mock) if mock else None
        if shared is not None:  # e.g. inside rlaunch: use its store, never a second copy
            import mongomock
            import yaml

            name = (yaml.safe_load(Path(path).read_text()) or {}).get("name", "fireworks")
            _DATABASES[key] = mongomock.MongoClient(_store=shared)[name]
        else:
            _DATABASES[key] = LaunchPad.from_file(str(path)).db
    return _DATABASES[key]


def ensure_embedded_store() -> str | None:
    """Create FireWorks' embedded store file (empty) if it is in use and missing; its path."""
    mock = os.environ.get("MONGOMOCK_SERVERSTORE_FILE")
    if mock and not Path(mock).is_file():
        Path(mock).write_text("{}")
    return mock


def _open_embedded_store(filename: str):
    """The embedded (mongomock) store this process already opened for `filename`, if any.

    Each mongomock client loads the file into its own store and writes it back at exit, so a
    second client in a process that already has one (rlaunch's LaunchPad, while our FireTasks
    run) would overwrite the other's writes. FireWorks does not hand its client to tasks; the
    store is found among the live objects instead.
    """
    import gc

    from mongomock.store import ServerStore

    target = Path(filename).resolve()
    for obj in gc.get_objects():
        if isinstance(obj, ServerStore) and getattr(obj, "_filename", None):
            if Path(obj._filename).resolve() == target:
                return obj
    return None


class StoreDataset:
    """A named dataset in the store: read it as labelled frames, add structures idempotently."""

    def __init__(self, spec: str, launchpad: str | Path | None = None):
        self.name = str(spec)[len(PREFIX) :] if is_store_spec(spec) else str(spec)
        if not self.name or "/" in self.name:
            raise SettingsError(f"{spec!r}: a store dataset is named db:NAME (no '/')")
        self.collection = launchpad_db(launchpad)[COLLECTION]

    def __str__(self) -> str:
        return PREFIX + self.name

    def __len__(self) -> int:
        return self.collection.count_documents({"dataset": self.name})

    def ids(self, before_iteration: int | None = None) -> set[str]:
        """The structure ids (content hashes) in the dataset; with `before_iteration`, those
        added before that campaign iteration (or without one)."""
        query: dict = {"dataset": self.name}
        if before_iteration is not None:
            query["$or"] = [{"info.iteration": {"$lt": before_iteration}},
                            {"info.iteration": None}]  # fmt: skip
        return set(self.collection.distinct("structure_id", query))

    def settings_hashes(self) -> set:
        """The levels of theory (labelling settings hashes) in the dataset; None stands for
        structures ingested from plain files (no labelling settings)."""
        out = set(self.collection.distinct("info.settings_hash", {"dataset": self.name}))
        query = {"dataset": self.name, "info.settings_hash": None}  # missing or null
        if self.collection.count_documents(query):
            out.add(None)
        return out

    def frames(self, ids: set[str] | None = None):
        """The dataset's structures (those with the given ids, if any) as `Frame`s with their
        labels and provenance, in the order they were added."""
        from nequix_fw.structures import Frame

        query: dict = {"dataset": self.name}
        if ids is not None:
            query["structure_id"] = {"$in": sorted(ids)}
        docs = self.collection.find(query).sort("added", 1)
        for k, doc in enumerate(docs):
            atoms = Atoms(numbers=doc["numbers"], positions=doc["positions"], cell=doc["cell"],
                          pbc=doc["pbc"], info=dict(doc.get("info") or {}))  # fmt: skip
            stress = None if doc.get("stress") is None else np.array(doc["stress"])
            forces = np.array(doc["forces"])
            atoms.calc = SinglePointCalculator(atoms, energy=doc["energy"], forces=forces,
                                               stress=stress)  # fmt: skip
            yield Frame(atoms, str(self), k)

    def add(self, structures: list[Atoms]) -> int:
        """Insert labelled structures (``info['structure_id']`` required); those already present
        are left alone. Returns how many were new."""
        start = len(self)
        n_new = 0
        for k, a in enumerate(structures):
            sid = a.info.get("structure_id")
            if not sid:
                raise StructureError("structures added to the store need info['structure_id']")
            stress = a.calc.results.get("stress") if a.calc is not None else None
            doc = {
                "dataset": self.name, "structure_id": sid, "added": start + k,
                "formula": a.get_chemical_formula(), "n_atoms": len(a),
                "numbers": a.numbers.tolist(), "positions": a.positions.tolist(),
                "cell": a.cell[:].tolist(), "pbc": a.pbc.tolist(),
                "energy": float(a.get_potential_energy()), "forces": a.get_forces().tolist(),
                "stress": None if stress is None else np.asarray(stress).tolist(),
                "info": {k2: _plain(v) for k2, v in a.info.items()},
            }  # fmt: skip
            # one upsert per structure (mongomock's bulk_write does not follow pymongo 4.x)
            result = self.collection.update_one(
                {"_id": f"{self.name}/{sid}"}, {"$setOnInsert": doc}, upsert=True
            )
            n_new += result.upserted_id is not None
        return n_new


def _plain(value):
    """A JSON/BSON-friendly copy of an info value."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
