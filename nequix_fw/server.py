"""The local MongoDB server: SecantusDB run as its own process, for machines without `mongod`.

SecantusDB (GPL-2.0-only, the optional extra ``nequix-fw[server]``) speaks MongoDB's wire
protocol on WiredTiger. It runs as its own process, through ``python -m
nequix_fw.secantus_atomic`` (its own file, under SecantusDB's licence), which makes its
findAndModify atomic before it serves (FireWorks' ids are handed out once with any number of
workers) and refuses another SecantusDB version than the one this is tested on. Nothing here
imports it. A server directory holds::

    <dir>/data/         WiredTiger files (reopened intact after a restart or a kill -9)
    <dir>/server.json   host, port, whether authentication is on, and the database name of
                        its LaunchPad file (kept after a stop)
    <dir>/server.pid    the running server's process id (removed by `stop`)
    <dir>/server.log    the server's output

The server fsyncs its log at every commit (``--sync-on-commit``): without it, writes
acknowledged just before a ``kill -9`` were lost here. A campaign writes a few documents per
Firework, so the cost does not show.

Production users point ``my_launchpad.yaml`` at their own ``mongod``; nothing else here cares
which server answers.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pymongo
import yaml

from nequix_fw.errors import ServerError
from nequix_fw.structures import atomic_path, process_alive

logger = logging.getLogger(__name__)

EXECUTABLE = "secantusd-py"
#: The module that runs SecantusDB's server with an atomic findAndModify (GPL-2.0-only, its own
#: process; never imported here).
ATOMIC_SERVER = "nequix_fw.secantus_atomic"
#: The file `start` locks in the server directory while it starts a server there.
START_LOCK = "start.lock"
DEFAULT_HOST = "127.0.0.1"
#: The TCP ports a server can listen on.
PORTS = range(1, 65536)


@dataclass
class ServerState:
    """Where a server directory's server listens, and whether it runs now."""

    directory: Path
    host: str
    port: int
    auth: bool
    pid: int | None  # None: not running
    database: str | None = None  # the database its LaunchPad file names (None: not yet one)

    @property
    def running(self) -> bool:
        return self.pid is not None


def _executable() -> str:
    beside = Path(sys.executable).parent / EXECUTABLE
    found = str(beside) if beside.is_file() else shutil.which(EXECUTABLE)
    if not found:
        raise ServerError(
            f"{EXECUTABLE} not found: the local MongoDB server is the optional extra "
            "'pip install nequix-fw[server]' (SecantusDB, GPL-2.0-only); or point "
            "my_launchpad.yaml at your own mongod"
        )
    return found


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ping(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a MongoDB server answers `ping` at host:port (no credentials needed)."""
    client = pymongo.MongoClient(
        host, port, directConnection=True, serverSelectionTimeoutMS=int(timeout_s * 1000)
    )
    try:
        client.admin.command("ping")
        return True
    except pymongo.errors.PyMongoError:
        return False
    finally:
        client.close()


def _server_dir(directory: str | Path) -> Path:
    directory = Path(directory).expanduser().resolve()
    if directory.exists() and not directory.is_dir():
        raise ServerError(
            f"{directory}: is a file, not a server directory (give --dir a directory: the one "
            "db start made, or a new one)"
        )
    return directory


def status(directory: str | Path) -> ServerState:
    """The server of `directory`: its address and pid (None when it is not running; a pid
    file left by a killed server is stale and ignored)."""
    directory = _server_dir(directory)
    conf = directory / "server.json"
    if not conf.is_file():
        raise ServerError(
            f"{directory}: no server here (start one with: nequix-fw db start --dir {directory})"
        )
    try:
        c = json.loads(conf.read_text())
        host, port, auth = c["host"], int(c["port"]), bool(c.get("auth"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ServerError(
            f"{conf}: a damaged server record ({type(exc).__name__}: {exc}); remove it and "
            "start again with --port and --name (the data in data/ is kept)"
        ) from None
    pid_file = directory / "server.pid"
    pid = int(pid_file.read_text()) if pid_file.is_file() else None
    if pid is not None and not process_alive(pid):
        pid = None
    return ServerState(directory, host, port, auth, pid, c.get("database"))


def _launch(directory: Path, host: str, port: int, auth: bool, wait_s: float) -> int:
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    _executable()  # installed: the extra is there
    cmd = [
        sys.executable,
        "-m",
        ATOMIC_SERVER,
        "--host",
        host,
        "--port",
        str(port),
        "--storage-path",
        str(data),
        "--log-level",
        "WARNING",
        "--sync-on-commit",
        *(["--auth"] if auth else []),
    ]
    with open(directory / "server.log", "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (directory / "server.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (directory / "server.log").read_text(errors="replace").strip().splitlines()
            (directory / "server.pid").unlink(missing_ok=True)
            raise ServerError(
                f"{directory}: the server exited at start (code {proc.returncode}"
                f"): {tail[-1] if tail else 'no output'}"
            )
        if ping(host, port, 0.5):
            return proc.pid
        time.sleep(0.2)
    _terminate(proc.pid, 5.0)
    (directory / "server.pid").unlink(missing_ok=True)
    raise ServerError(
        f"{directory}: the server did not answer on {host}:{port} in {wait_s:.0f} s "
        f"(see {directory / 'server.log'})"
    )


def _terminate(pid: int, timeout_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not process_alive(pid):
                return
            time.sleep(0.1)


def start(
    directory: str | Path,
    port: int | None = None,
    host: str = DEFAULT_HOST,
    username: str | None = None,
    password: str | None = None,
    wait_s: float = 60.0,
    database: str | None = None,
) -> ServerState:
    """Start the server of `directory` in the background and wait until it answers.

    The port is `port`, else the one this directory used before, else a free one; `database`
    (the name its LaunchPad file gives) is recorded likewise, so that a later start without
    one keeps it. With `username` and `password` the first start creates that user (role
    ``root``) and every start requires SCRAM authentication. Refuses a second start while the
    server runs; a pid file left by a killed server is stale and is replaced. A start that
    fails leaves no directory it made.
    """
    directory = _server_dir(directory)
    if port is not None and port not in PORTS:
        raise ServerError(f"port {port}: not a TCP port (1-65535)")
    if (username is None) != (password is None):
        raise ServerError("give both a user name and a password, or neither")
    _refuse_running(directory)
    made = _make_dir(directory)
    # one start at a time per directory: a second one at the same moment would overwrite
    # server.json and remove server.pid, leaving the first server orphaned
    lock = open(directory / START_LOCK, "a")  # noqa: SIM115 (held until the start is done)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ServerError(
            f"{directory}: another `nequix-fw db start` is starting a server here; wait for it "
            f"(nequix-fw db status --dir {directory})"
        ) from None
    started = False
    try:
        old = _refuse_running(directory)  # again, under the lock
        port = port or (old.port if old else None) or free_port(host)
        if ping(host, port, 0.3):
            raise ServerError(
                f"{host}:{port}: another server already listens there; choose another --port"
            )
        database = database or (old.database if old else None)
        state = _start(directory, host, port, username, password, wait_s, database, old)
        started = True
        return state
    finally:
        # nothing of a failed first start stays behind (unless another start got there first)
        if not started and made is not None and not _runs_here(directory):
            shutil.rmtree(made, ignore_errors=True)
        lock.close()


def _runs_here(directory: Path) -> bool:
    try:
        _refuse_running(directory)
    except ServerError:
        return True
    return False


def _refuse_running(directory: Path) -> ServerState | None:
    """The directory's last server state (None before its first start); an error when that
    server still runs."""
    old = status(directory) if (directory / "server.json").is_file() else None
    if old is not None and old.running:
        raise ServerError(
            f"{directory}: a server already runs here (pid {old.pid}, {old.host}:{old.port}); "
            f"stop it with: nequix-fw db stop --dir {directory}"
        )
    return old


def _make_dir(directory: Path) -> Path | None:
    """Create `directory` (and its missing parents); the topmost directory made, if any."""
    top = next((p for p in [*reversed(directory.parents), directory] if not p.exists()), None)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise ServerError(
            f"{directory}: cannot make the server directory there ({exc.strerror or exc})"
        ) from None
    return top


def _start(
    directory: Path,
    host: str,
    port: int,
    username: str | None,
    password: str | None,
    wait_s: float,
    database: str | None,
    old: ServerState | None,
) -> ServerState:
    conf = directory / "server.json"
    auth = bool(old and old.auth)
    if username is not None and not auth:  # provision the user, then restart with auth
        pid = _launch(directory, host, port, False, wait_s)
        try:
            client = pymongo.MongoClient(host, port, directConnection=True)
            client.admin.command("createUser", username, pwd=password, roles=["root"])
            client.close()
        finally:
            _terminate(pid, 10.0)
            (directory / "server.pid").unlink(missing_ok=True)
        auth = True
    record = {"host": host, "port": port, "auth": auth, "database": database}
    with atomic_path(conf) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    pid = _launch(directory, host, port, auth, wait_s)
    logger.info(
        "MongoDB server (SecantusDB) pid %d on %s:%d, data in %s",
        pid,
        host,
        port,
        directory / "data",
    )
    return ServerState(directory, host, port, auth, pid, database)


def stop(directory: str | Path, timeout_s: float = 20.0) -> ServerState:
    """Stop the server of `directory` (SIGTERM, then SIGKILL after `timeout_s`)."""
    state = status(directory)
    if state.running:
        _terminate(state.pid, timeout_s)
    (state.directory / "server.pid").unlink(missing_ok=True)
    return state


def launchpad_config(
    state: ServerState, name: str, username: str | None = None, password: str | None = None
) -> dict:
    """A FireWorks LaunchPad file's contents for database `name` on this server."""
    return {
        "host": state.host,
        "port": state.port,
        "name": name,
        "username": username,
        "password": password,
        "authsource": "admin" if username else None,
        "mongoclient_kwargs": {"directConnection": True},
        "logdir": None,
        "strm_lvl": "INFO",
    }


def write_launchpad(path: str | Path, config: dict) -> Path:
    """Write a LaunchPad file atomically; readable by its owner only when it holds a
    password."""
    path = Path(path)
    with atomic_path(path, mode=0o600 if config.get("password") else None) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
