"""`nequix-fw db start|status|stop`: the local MongoDB server (SecantusDB) as real processes."""

import os
import signal
import stat
import subprocess
import time

import pymongo
import pytest
import yaml
from helpers import NFW

from nequix_fw import server


def _db(*args, env=None):
    return subprocess.run([NFW, "db", *map(str, args)], capture_output=True, text=True, env=env)


def test_start_status_stop_and_restart_after_kill(tmp_path):
    d, lp = tmp_path / "srv", tmp_path / "my_launchpad.yaml"
    p = _db("start", "--dir", d, "--launchpad", lp, "--name", "camp")
    assert p.returncode == 0, p.stderr
    config = yaml.safe_load(lp.read_text())
    assert (config["host"], config["name"], config["username"]) == ("127.0.0.1", "camp", None)
    port = config["port"]
    assert f"running (pid {(d / 'server.pid').read_text()}) on 127.0.0.1:{port}" in p.stdout
    # a second start on the same directory is refused, naming the running server
    p = _db("start", "--dir", d, "--launchpad", lp)
    assert p.returncode == 2 and "a server already runs here" in p.stderr
    assert f"127.0.0.1:{port}" in p.stderr and "nequix-fw db stop --dir" in p.stderr
    p = _db("status", "--dir", d)
    assert p.returncode == 0 and "running (pid" in p.stdout
    # data written through the LaunchPad file survives a kill -9 and a restart
    from fireworks import LaunchPad

    LaunchPad.from_file(str(lp)).db.probe.insert_one({"_id": "x", "v": 1})
    os.kill(int((d / "server.pid").read_text()), signal.SIGKILL)
    time.sleep(1)
    p = _db("status", "--dir", d)
    assert p.returncode == 3 and f"not running on 127.0.0.1:{port}" in p.stdout
    p = _db("start", "--dir", d, "--launchpad", lp, "--name", "camp")  # stale pid file
    assert p.returncode == 0, p.stderr
    assert yaml.safe_load(lp.read_text())["port"] == port  # the same address as before
    client = pymongo.MongoClient("127.0.0.1", port, directConnection=True)
    assert client.camp.probe.find_one({"_id": "x"}) == {"_id": "x", "v": 1}
    client.close()
    p = _db("stop", "--dir", d)
    assert p.returncode == 0 and "stopped" in p.stdout
    assert not server.ping("127.0.0.1", port, 0.5)
    assert _db("status", "--dir", d).returncode == 3


def test_authentication_and_errors(tmp_path, monkeypatch):
    d, lp = tmp_path / "srv", tmp_path / "lp.yaml"
    secret = "n0t-in-any-log-Zq7"
    env = {**os.environ, "NEQUIX_FW_DB_PASSWORD": secret}
    p = _db("start", "--dir", d, "--launchpad", lp, "--username", "alice", env=env)
    assert p.returncode == 0, p.stderr
    assert "authentication on" in p.stdout and secret not in p.stdout + p.stderr
    assert stat.S_IMODE(lp.stat().st_mode) == 0o600  # the file holds the password
    config = yaml.safe_load(lp.read_text())
    assert (config["username"], config["password"], config["authsource"]) == (
        "alice",
        secret,
        "admin",
    )
    anonymous = pymongo.MongoClient("127.0.0.1", config["port"], directConnection=True)
    with pytest.raises(pymongo.errors.OperationFailure, match="requires authentication"):
        anonymous.x.y.count_documents({})
    from fireworks import LaunchPad

    launchpad = LaunchPad.from_file(str(lp))
    launchpad.reset("", require_password=False)
    assert launchpad.db.fireworks.count_documents({}) == 0
    # a restart keeps authentication on; the password is in no server file
    assert _db("stop", "--dir", d).returncode == 0
    assert _db("start", "--dir", d, "--launchpad", lp, env=env).returncode == 0
    p = _db("status", "--dir", d)
    assert "authentication on" in p.stdout
    for f in d.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    _db("stop", "--dir", d)
    # a user name without a password, a missing server executable: one-line errors
    p = _db(
        "start", "--dir", tmp_path / "s2", "--launchpad", tmp_path / "l2.yaml", "--username", "bob"
    )
    assert p.returncode == 2 and "--username needs a password" in p.stderr
    p = _db(
        "start",
        "--dir",
        tmp_path / "s2",
        "--username",
        "bob",
        "--password-file",
        tmp_path / "nope.txt",
    )
    assert p.returncode == 2 and "nope.txt: cannot read the password file" in p.stderr
    assert not (tmp_path / "s2").exists()
    monkeypatch.setattr(server, "EXECUTABLE", "no-such-secantusd")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(server.ServerError, match=r"nequix-fw\[server\]"):
        server.start(tmp_path / "s3")


def test_two_starts_on_one_directory_at_once_leave_one_server_that_stop_stops(tmp_path):
    """Issue 39: the loser of two simultaneous starts used to overwrite server.json and delete
    server.pid, leaving the winner orphaned; now it is refused and the winner is the one
    `db status` and `db stop` see."""
    d = tmp_path / "srv"
    procs = [
        subprocess.Popen(
            [NFW, "db", "start", "--dir", str(d), "--launchpad", str(tmp_path / f"lp{i}.yaml")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "another `nequix-fw db start` is starting a server here" in err or (
        "a server already runs here" in err
    )
    pid = int((d / "server.pid").read_text())
    port = yaml.safe_load((d / "server.json").read_text())["port"]
    assert server.status(d).pid == pid and server.ping("127.0.0.1", port, 1.0)
    p = _db("stop", "--dir", d)
    assert p.returncode == 0 and f"stopped (pid {pid})" in p.stdout
    assert not server.ping("127.0.0.1", port, 0.5)


def _take_ids(launchpad: str) -> list[int]:
    """300 ids from one counter, as FireWorks takes launch ids: the document before the
    update."""
    from nequix_fw.store import launchpad_db

    counter = launchpad_db(launchpad)["ids"]
    return [
        counter.find_one_and_update(
            {}, {"$inc": {"next": 1}}, return_document=pymongo.ReturnDocument.BEFORE
        )["next"]
        for _ in range(300)
    ]


def test_eight_processes_get_every_id_once(launchpad_file):
    """Issue 39: SecantusDB 0.7.0b3 returned a findAndModify's pre-image read before the
    collection's lock, so concurrent clients got one id twice (1,623-1,964 distinct of 2,400);
    the server `db start` runs makes it atomic."""
    from multiprocessing import get_context

    from nequix_fw.store import launchpad_db

    launchpad_db(str(launchpad_file))["ids"].insert_one({"next": 0})
    with get_context("spawn").Pool(8) as pool:
        ids = [i for part in pool.map(_take_ids, [str(launchpad_file)] * 8) for i in part]
    assert sorted(ids) == list(range(2400))


def test_eight_rlaunch_workers_give_each_firework_one_launch(launchpad_file, tmp_path):
    """200 Fireworks, 8 `rlaunch rapidfire` workers at once: every Firework runs once, with a
    launch of its own (a shared launch id used to overwrite one launch record with another)."""
    from fireworks import Firework, LaunchPad, ScriptTask, Workflow

    lp = LaunchPad.from_file(str(launchpad_file))
    lp.reset("", require_password=False)
    lp.add_wf(Workflow([Firework(ScriptTask.from_str("true"), name=f"fw{i}") for i in range(200)]))
    workers = [
        subprocess.Popen(
            [os.path.join(os.path.dirname(NFW), "rlaunch"), "-l", str(launchpad_file)]
            + ["-s", "rapidfire"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    for w in workers:
        assert w.wait(timeout=600) == 0, w.stderr.read()[-2000:]
    fws = list(lp.fireworks.find({}, {"state": 1, "launches": 1}))
    assert len(fws) == 200 and {f["state"] for f in fws} == {"COMPLETED"}
    launch_ids = [i for f in fws for i in f["launches"]]
    assert sorted(launch_ids) == sorted(set(launch_ids)) and len(launch_ids) == 200
    assert lp.launches.count_documents({}) == 200


def test_the_atomic_server_refuses_another_secantus_version(tmp_path):
    """The fix is tested on one SecantusDB version; on another it refuses to start in one line
    instead of serving unprotected."""
    code = "import sys, nequix_fw.secantus_atomic as m; m.PINNED = '0.0'; sys.exit(m.main())"
    p = subprocess.run(
        [os.path.join(os.path.dirname(NFW), "python"), "-c", code, "--port", "1"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0
    assert "its atomic findAndModify is made for and tested on 0.0 only" in p.stderr


def test_find_and_modify_with_or_matches_what_find_matches(launchpad_file):
    """The server asks a findAndModify's or find's `$or` of one field's values as `$in` (its
    indexes answer that): the same documents as the query as it is (inside an `$and`)
    matches, a missing field and an array included, in the order of the sort; any other `$or`
    is answered as it is."""
    from nequix_fw.store import launchpad_db

    coll = launchpad_db(str(launchpad_file))["or_query"]
    coll.create_index("state")
    worker = [{}, {"w": None}, {"w": "a"}, {"w": "b"}, {"w": ["b", "a"]}, {"w": 1}]
    coll.insert_many(
        [
            {"n": i, "state": s, **w}
            for i, (s, w) in enumerate((s, w) for s in ("READY", "DONE") for w in worker)
        ]
    )
    for query in (
        # FireWorks' checkout
        {"$or": [{"w": {"$exists": False}}, {"w": None}, {"w": "a"}], "state": "READY"},
        {"$or": [{"w": None}, {"w": "a"}], "state": "READY"},
        {"$or": [{"w": {"$exists": False}}, {"w": "a"}]},  # no null beside it: as it is
        {"$or": [{"w": 1}, {"w": "b"}]},
        {"$or": [{"w": "a"}, {"state": "DONE"}]},  # two fields: as it is
    ):
        want = [d["n"] for d in coll.find({"$and": [query]}).sort([("n", -1)])]  # as it is
        assert [d["n"] for d in coll.find(query).sort([("n", -1)])] == want
        got = []
        while (
            d := coll.find_one_and_update(
                {**query, "taken": {"$exists": False}}, {"$set": {"taken": 1}}, sort=[("n", -1)]
            )
        ) is not None:
            got.append(d["n"])
        assert got == want and got, query
        coll.update_many({}, {"$unset": {"taken": ""}})


def test_an_upsert_by_id_and_a_query_is_not_cut_to_its_id(launchpad_file):
    """The write after a findAndModify's read goes by `_id` alone; an upsert, whose filter is
    the query itself, does not: `{_id: 1, $and: [{x: 5}]}` matches nothing here, so the upsert
    tries to insert `_id` 1 (a duplicate) instead of updating the document whose x is 3."""
    from nequix_fw.store import launchpad_db

    coll = launchpad_db(str(launchpad_file))["upsert"]
    coll.insert_one({"_id": 1, "x": 3})
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        coll.find_one_and_update({"_id": 1, "$and": [{"x": 5}]}, {"$set": {"y": 1}}, upsert=True)
    assert list(coll.find()) == [{"_id": 1, "x": 3}]
    # matched: by `_id`, as before
    assert coll.find_one_and_update({"_id": 1, "$and": [{"x": 3}]}, {"$set": {"y": 1}}) == {
        "_id": 1,
        "x": 3,
    }
    assert list(coll.find()) == [{"_id": 1, "x": 3, "y": 1}]
