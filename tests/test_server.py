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
