"""The MongoDB store on the local MongoDB server, with real processes (each step its own
command, as a user runs them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest

NFW = str(Path(sys.executable).parent / "nequix-fw")


@pytest.fixture
def store(tmp_path, launchpad_file):
    env = dict(os.environ)

    def run(*args, check=True):
        p = subprocess.run([NFW, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert not check or p.returncode == 0, p.stderr
        return p

    return {"dir": tmp_path, "env": env, "run": run}


def test_dataset_in_store_is_idempotent_and_trains(store, emt_data, tmp_path):
    run = store["run"]
    lp = ["--launchpad", "my_launchpad.yaml"]
    out = run(
        "update-dataset",
        "--new",
        str(emt_data["train"]),
        "--dataset",
        "db:cuau",
        *lp,
        "--iteration",
        "0",
    ).stdout
    assert "added 48 structures" in out and "48 in db:cuau" in out
    # a second process: nothing added, nothing duplicated
    out = run("update-dataset", "--new", str(emt_data["train"]), "--dataset", "db:cuau", *lp).stdout
    assert "added 0 structures (48 already present, 0 conflicts" in out
    # the same structure with other labels is a conflict; the stored labels are kept
    frames = ase.io.read(emt_data["train"], ":")
    changed = frames[5].copy()
    changed.calc = type(frames[5].calc)(
        changed, energy=frames[5].get_potential_energy() + 0.3, forces=frames[5].get_forces()
    )
    ase.io.write(tmp_path / "changed.extxyz", changed)
    out = run(
        "update-dataset", "--new", str(tmp_path / "changed.extxyz"), "--dataset", "db:cuau", *lp
    ).stdout
    assert "added 0 structures (0 already present, 1 conflicts" in out
    # read back through pymongo (the FireWorks LaunchPad's database) and nequix-fw's reader
    check = """
import json
from nequix_fw.dataset import dataset_ids, read_labelled
from nequix_fw.store import COLLECTION, Store, launchpad_db
db = launchpad_db("my_launchpad.yaml")
store = Store("my_launchpad.yaml")
data = read_labelled(["db:cuau"], store)
before = [len(dataset_ids("db:cuau", store, k)) for k in (None, 0, 1)]
print(json.dumps({"n": db[COLLECTION].count_documents({"dataset": "cuau"}), "before": before,
                  "energies": [d.energy for d in data], "ids": [d.id for d in data],
                  "iterations": [d.frame.atoms.info.get("iteration") for d in data],
                  "forces0": data[0].forces.tolist()}))
"""
    p = subprocess.run(
        [sys.executable, "-c", check],
        cwd=store["dir"],
        env=store["env"],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["n"] == 48 and set(got["iterations"]) == {0}
    assert got["before"] == [48, 0, 48]  # all; added before iteration 0; before iteration 1
    np.testing.assert_allclose(got["energies"], [f.get_potential_energy() for f in frames])
    np.testing.assert_allclose(got["forces0"], frames[0].get_forces())
    # train straight from the store: the same training set as the file
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "train_ensemble:\n  n_models: 1\n  epochs: 1\n  batch_size: 8\n  architecture:\n"
        "    {hidden_irreps: '8x0e + 4x1o', n_layers: 1, lmax: 1, "
        "radial_mlp_size: 8}\n"
    )
    run(
        "train-ensemble",
        "--dataset",
        "db:cuau",
        *lp,
        "--outdir",
        "models",
        "--config",
        str(cfg),
        "--no-progress",
    )
    meta = json.loads((store["dir"] / "models" / "member_0.json").read_text())
    from nequix_fw.dataset import ids_hash

    assert meta["n_structures"] == 48 and meta["training_set_hash"] == ids_hash(got["ids"])
    # labels from a labelling backend (a settings hash) do not mix with the plain-file ones
    ase.io.write(tmp_path / "new.extxyz", ase.io.read(emt_data["test"], ":2"))
    run(
        "label",
        "--calculator",
        "emt",
        "--structures",
        str(tmp_path / "new.extxyz"),
        "--output",
        "labels",
        "--no-progress",
    )
    p = run("update-dataset", "--new", "labels", "--dataset", "db:cuau", *lp, check=False)
    assert p.returncode == 2 and "different levels of theory" in p.stderr
    out = run(
        "update-dataset", "--new", "labels", "--dataset", "db:cuau", *lp, "--allow-mixed"
    ).stdout
    assert "added 2 structures" in out and "50 in db:cuau" in out


def test_store_errors(store, tmp_path):
    (store["dir"] / "my_launchpad.yaml").unlink()
    p = store["run"]("update-dataset", "--new", str(tmp_path), "--dataset", "db:x", check=False)
    assert p.returncode == 2 and "need a LaunchPad file" in p.stderr
    p = store["run"](
        "update-dataset",
        "--new",
        str(tmp_path),
        "--dataset",
        "db:x",
        "--launchpad",
        "nowhere.yaml",
        check=False,
    )
    assert p.returncode == 2 and "nowhere.yaml: LaunchPad file not found" in p.stderr
    p = store["run"](
        "update-dataset",
        "--new",
        str(tmp_path),
        "--dataset",
        "db:a/b",
        "--launchpad",
        "nowhere.yaml",
        check=False,
    )
    assert p.returncode == 2 and "a store dataset is named db:NAME (no '/')" in p.stderr


def test_relabel_is_resumed_after_a_kill(store, tmp_path):
    """`relabel --dataset db:OLD --to db:NEW`: every structure labelled at the new level of
    theory once, with its provenance, also when the first run was killed (`kill -9`) midway."""
    import signal
    import time

    from ase.calculators.lj import LennardJones
    from helpers import emt_labelled

    from nequix_fw.dataset import read_labelled
    from nequix_fw.store import Store

    run, lp = store["run"], ["--launchpad", "my_launchpad.yaml"]
    ase.io.write(tmp_path / "emt.extxyz", emt_labelled(6, seed=4))
    run("update-dataset", "--new", "emt.extxyz", "--dataset", "db:old", *lp)
    env = {**store["env"], "PYTHONPATH": str(Path(__file__).parent / "standins")}
    slow = [
        "relabel",
        "--dataset",
        "db:old",
        "--to",
        "db:new",
        "--output",
        "relabel",
        *lp,
        "--calculator",
        "slow_emt:SlowEMT",
        "--calculator-params",
        '{"delay_s": 1.0}',
        "--no-progress",
    ]
    p = subprocess.Popen(
        [NFW, *slow],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 120
    while len(list((tmp_path / "relabel" / "labels").glob("*/task.json"))) < 2:
        assert time.monotonic() < end and p.poll() is None
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    out = subprocess.run([NFW, *slow], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "relabelled 6 of 6 structures" in out.stdout and "from an earlier run" in out.stdout
    assert "added 6 (0 already there); 6 in db:new" in out.stdout
    in_store = Store(tmp_path / "my_launchpad.yaml")
    old = {d.frame.atoms.info["structure_id"]: d for d in read_labelled(["db:old"], in_store)}
    new = read_labelled(["db:new"], in_store)
    assert sorted(d.frame.atoms.info["structure_id"] for d in new) == sorted(old)
    assert {d.frame.atoms.info["relabelled_from"] for d in new} == {"db:old"}
    # relabelled at another level of theory: LJ, computed here for the same structures
    lj = [
        "relabel",
        "--dataset",
        "db:old",
        "--to",
        "db:lj",
        "--output",
        "relabel_lj",
        *lp,
        "--calculator",
        "lj",
        "--calculator-params",
        '{"sigma": 2.3, "epsilon": 0.4}',
    ]
    run(*lj)
    for d in read_labelled(["db:lj"], in_store):
        a = old[d.frame.atoms.info["structure_id"]].frame.atoms.copy()
        a.calc = LennardJones(sigma=2.3, epsilon=0.4)
        assert d.energy == pytest.approx(a.get_potential_energy(), rel=1e-9)
    # the same dataset as the target is refused
    bad = run("relabel", "--dataset", "db:old", "--to", "db:old", "--output", "x", *lp, check=False)
    assert bad.returncode == 2
    assert "--to db:old is the dataset db:old being relabelled" in bad.stderr


def test_no_stored_document_grows_with_the_candidates(launchpad_file):
    """A selection of many candidates is one small document plus one per candidate (MongoDB
    refuses documents over 16 MiB: one manifest document did at about 55,000 candidates);
    label tasks and dataset structures go in bulk, and every write is idempotent. The
    store's queries use its indexes (explain)."""
    import bson

    from nequix_fw.store import (
        COLLECTION,
        SELECTED,
        SELECTIONS,
        CampaignStore,
        StoreDataset,
        collection,
        launchpad_db,
    )

    db = launchpad_db(launchpad_file)
    entry = {
        "source": "x.extxyz",
        "formula": "Cu32",
        "n_atoms": 32,
        "class": "candidate",
        "reason": None,
        "selected": False,
        "file": None,
        "metrics": {"max_force_dev": 0.1, "mean_force_dev": 0.05},
    }
    manifest = {
        "counts": {"candidate": 6000, "selected": 3},
        "settings": {"lo": 0.05},
        "structures": [{**entry, "id": f"{i:020x}", "frame": i} for i in range(6000)],
    }
    store = CampaignStore(launchpad_file, "big")
    for _ in range(2):  # a rerun writes the same documents again, nothing more
        store.save_selection(3, {None: manifest})
        store.save_selection(4, {"al": {**manifest, "structures": []}})
    head = db[SELECTIONS].find_one({"_id": "big/3"})
    assert len(bson.encode(head)) < 4000 and head["n_structures"] == 6000
    assert db[SELECTIONS].find_one({"_id": "big/4"})["systems"]["al"]["n_structures"] == 0
    docs = db[SELECTED].find({"campaign": "big", "iteration": 3}).sort("position", 1)
    assert [d["frame"] for d in docs] == list(range(6000))
    assert db[SELECTED].count_documents({}) == 6000
    # dataset reads sort by an index; no query of a dataset scans every document
    ds = StoreDataset("db:idx", launchpad_file)
    assert ds.add([_labelled(i) for i in range(20)]) == 20
    # plain unordered inserts: those there already are left alone, the others go in
    assert ds.add([_labelled(i) for i in range(15, 30)]) == 10
    assert ds.add([_labelled(i) for i in range(30)]) == 0
    coll = collection(db, COLLECTION)
    plans = [
        coll.find({"dataset": "idx"}).sort("added", 1).explain(),
        coll.find({"dataset": "idx", "structure_id": {"$in": ["a", "b"]}}).explain(),
    ]
    for plan in plans:
        text = json.dumps(plan, default=str)
        assert "IXSCAN" in text and "COLLSCAN" not in text, text[:2000]
    assert [f.atoms.info["n"] for f in ds.frames()] == list(range(30))


def _labelled(i: int):
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    a = bulk("Cu", "fcc", a=3.6 + 0.01 * i)
    a.calc = SinglePointCalculator(a, energy=-3.0, forces=np.zeros((1, 3)))
    a.info.update(structure_id=f"s{i:019d}", n=i)
    return a


class _Counting:
    """A store collection that records the calls of the methods named (the queries that read
    a whole dataset)."""

    def __init__(self, coll, *counted: str):
        self.coll, self.calls = coll, {name: [] for name in counted}

    def __getattr__(self, name):
        attr = getattr(self.coll, name)
        if name not in self.calls:
            return attr

        def counted(*args, **kw):
            self.calls[name].append(args)
            return attr(*args, **kw)

        return counted


def test_levels_of_theory_come_from_the_dataset_summary(launchpad_file):
    """A store dataset's settings hashes (the levels of theory an ingest checks) come from its
    summary document, which every add keeps, not from a query of every structure; a dataset
    without one (an older version's) is read once and its summary completed. Reads by id give
    the structures in the order they were added."""
    from nequix_fw.store import DATASETS, StoreDataset, launchpad_db

    def labelled(i, level):
        a = _labelled(i)
        if level is not None:
            a.info["settings_hash"] = level
        return a

    ds = StoreDataset("db:levels", launchpad_file)
    ds.collection = counting = _Counting(ds.collection, "distinct")
    assert ds.settings_hashes() == set() and not ds.exists()  # a new dataset: read, empty
    assert ds.add([labelled(i, "A") for i in range(5)]) == 5 and ds.exists()
    assert ds.settings_hashes() == {"A"} and len(counting.calls["distinct"]) == 1
    assert ds.add([labelled(i, "B") for i in range(5, 8)] + [labelled(8, None)]) == 4
    assert ds.settings_hashes() == {"A", "B", None} and len(counting.calls["distinct"]) == 1
    # an older version's dataset has no summary: read once, then kept
    launchpad_db(launchpad_file)[DATASETS].delete_one({"_id": "levels"})
    assert ds.settings_hashes() == {"A", "B", None} and len(counting.calls["distinct"]) == 2
    assert ds.add([labelled(9, "C")]) == 1
    assert ds.settings_hashes() == {"A", "B", "C", None} and len(counting.calls["distinct"]) == 2
    # the descriptors: the search for structures without one runs once
    from nequix_fw.descriptors import GEOMETRY_KEY, geometry

    finds = []
    find = counting.coll.find
    counting.find = lambda query, *a, **kw: finds.append(query) or find(query, *a, **kw)
    for _ in range(2):
        numbers, rows = ds.described(GEOMETRY_KEY, lambda s: np.stack([geometry(a) for a in s]))
        assert len(numbers) == 10 and rows.shape[0] == 10
    assert sum("$exists" in str(q) for q in finds) == 1 and len(finds) == 3
    # by id: in the order of addition, whatever the order of the ids
    ids = {f"s{i:019d}" for i in (9, 2, 6)}
    assert [f.atoms.info["n"] for f in ds.frames(ids)] == [2, 6, 9]


def test_dataset_count_comes_from_its_summary_and_survives_a_kill(launchpad_file):
    """A dataset's size comes from its summary, which every add keeps; it is counted again
    (exactly) when an add was stopped or killed between its insert and its summary update,
    while another host's writer is in flight, and for a dataset without a count. A count is
    kept only when no writer can change it."""
    import time

    from nequix_fw.errors import StructureError
    from nequix_fw.store import COLLECTION, DATASETS, STALE_S, StoreDataset, launchpad_db

    db = launchpad_db(launchpad_file)
    ds = StoreDataset("db:counted", launchpad_file)
    ds.collection = _Counting(ds.collection, "count_documents")
    counts = ds.collection.calls["count_documents"]

    def truth():
        return db[COLLECTION].count_documents({"dataset": "counted"})

    assert len(ds) == 0 and len(counts) == 1  # new: counted, then kept
    assert ds.add([_labelled(i) for i in range(4)]) == 4
    assert ds.add([_labelled(i) for i in range(2, 6)]) == 2  # two were there already
    assert len(ds) == truth() == 6 and len(counts) == 1
    # killed between its insert and its summary update (the process is gone)
    script = (
        "import os, sys\n"
        "sys.path.insert(0, os.getcwd())\n"
        "from tests.test_store import _labelled\n"
        "from nequix_fw.store import StoreDataset, _insert_new\n"
        f"ds = StoreDataset('db:counted', {str(launchpad_file)!r})\n"
        "ds._begin_write()\n"
        "_insert_new(ds.collection, [ds._document(_labelled(i), i) for i in range(6, 9)])\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])
    assert len(ds) == truth() == 9 and len(counts) == 2  # counted again, and kept
    assert len(ds) == 9 and len(counts) == 2 and ds.add([_labelled(9)]) == 1 and len(ds) == 10
    # another host's writer in flight: counted each time, never kept
    writer = {"host": "elsewhere", "pid": 1, "since": time.time()}
    db[DATASETS].update_one({"_id": "counted"}, {"$set": {"writers.w": writer}})
    assert ds.add([_labelled(10)]) == 1
    assert [len(ds), len(ds)] == [11, 11] and len(counts) == 4
    # ... until it is a day old: gone
    writer["since"] -= STALE_S + 1
    db[DATASETS].update_one({"_id": "counted"}, {"$set": {"writers.w": writer}})
    assert [len(ds), len(ds)] == [11, 11] and len(counts) == 5
    # an add that fails part-way leaves the count unknown: counted again
    bad = _labelled(11)
    bad.calc = None
    with pytest.raises(StructureError, match="no labels"):
        ds.add([_labelled(12), bad])
    assert len(ds) == truth() == 11 and len(counts) == 6
    # an older version's dataset (no summary): counted once, then kept
    db[DATASETS].delete_one({"_id": "counted"})
    assert [len(ds), len(ds)] == [11, 11] and len(counts) == 7
