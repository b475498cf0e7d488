"""Label with the user's own command.

Per structure (the default): the command runs through the shell in the structure's directory,
which holds the structure as `POSCAR`; the environment variable ``NEQUIX_FW_STRUCTURE`` names
it. The command leaves its labels there as ``labelled.extxyz`` (or another ``*.extxyz``),
``vasprun.xml`` or ``OUTCAR``; the last frame is taken.

Batch (a command with ``{structures}``, e.g. the original design's ``bash launch_dft.sh
{structures}``): the command runs once, in the current directory, with ``{structures}``
replaced by a directory of ``<id>.vasp`` POSCARs and ``{output}`` by the label output
directory; each structure's labels are then ``<id>_vasprun.xml``, ``<id>_OUTCAR`` or
``<id>.extxyz`` in the output directory (where launch_dft.sh's ``data/dft_results`` is, when
``--output data/dft_results``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import ase.io
from ase import Atoms

from nequix_fw.errors import SettingsError
from nequix_fw.labelling.base import LabellingBackend, LabelResult, singlepoint
from nequix_fw.labelling.outputs import vasp_result_labels, vasp_result_name
from nequix_fw.labels import labels_of
from nequix_fw.settings import LabellingSettings
from nequix_fw.structures import Frame

#: Result files looked for, in order of preference.
RESULT_PATTERNS = ("labelled.extxyz", "*.extxyz", "vasprun.xml*", "OUTCAR*")


def find_result(workdir: Path) -> Path | None:
    for pattern in RESULT_PATTERNS:
        found = sorted(workdir.glob(pattern))
        if found:
            return found[0]
    return None


def run_command(
    command: str, workdir: Path, env: dict, timeout_s: float | None, cwd: Path | None = None
) -> int | None:
    """Run `command` through the shell in `cwd` (default `workdir`), output to
    ``script.out``/``script.err`` in `workdir`; its exit code, or None when it ran past
    `timeout_s`. The command runs in a process group of its own, and the whole group is killed
    at the time-out (a shell's children too)."""
    with open(workdir / "script.out", "wb") as out, open(workdir / "script.err", "wb") as err:
        proc = subprocess.Popen(
            command,
            shell=True,
            cwd=cwd or workdir,
            env=env,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None
        except BaseException:  # interrupted: leave nothing running behind
            _kill_group(proc)
            raise


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the command's process group, SIGKILL whatever is left of it after 5 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is gone
        pass
    proc.wait()


class ScriptBackend(LabellingBackend):
    """Runs a shell command per structure (or once for all, with ``{structures}``) and reads
    the labels it leaves behind."""

    name = "script"
    settings_fields = ("command", "timeout_s")

    @classmethod
    def from_settings(cls, settings: LabellingSettings) -> ScriptBackend:
        return cls(settings.command, settings.timeout_s)

    def __init__(self, command: str | None, timeout_s: float | None = None):
        if not command:
            raise SettingsError("the script backend needs label.command (--command)")
        program = shlex.split(command)[0]
        if shutil.which(program) is None and not Path(program).is_file():
            raise SettingsError(
                f"label.command: executable {program!r} not found (command: {command!r})"
            )
        self.command = command
        self.timeout_s = timeout_s
        self.batch = "{structures}" in command
        self._batch_run: dict = {}

    def settings_doc(self) -> dict:
        return {"command": self.command}

    def prepare(self, pending: list[tuple[str, Atoms]], output: Path) -> None:
        """Batch mode: run the command once for every pending structure."""
        if not self.batch or not pending:
            return
        output = output.resolve()
        staging = output / ".batch_structures"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for sid, atoms in pending:
            ase.io.write(staging / f"{sid}.vasp", atoms, format="vasp", direct=True)
            for old in _batch_results(output, sid):  # a rerun must not pick up an old result
                old.unlink()
        command = self.command.replace("{structures}", shlex.quote(str(staging)))
        command = command.replace("{output}", shlex.quote(str(output)))
        t0 = time.perf_counter()
        try:
            rc = run_command(command, output, dict(os.environ), self.timeout_s, cwd=Path.cwd())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        err = (output / "script.err").read_text(errors="replace").strip().splitlines()[-1:]
        self._batch_run = {
            "command": command,
            "returncode": rc,
            "wall_time_s": time.perf_counter() - t0,
            "stderr_tail": err[0] if err else "",
        }

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult:
        if self.batch:
            return self._collect(atoms, workdir)
        workdir = workdir.resolve()
        for pattern in RESULT_PATTERNS:  # a rerun must not pick up an old result
            for old in workdir.glob(pattern):
                old.unlink()
        ase.io.write(workdir / "POSCAR", atoms, format="vasp", direct=True)
        env = {**os.environ, "NEQUIX_FW_STRUCTURE": str(workdir / "POSCAR")}
        doc: dict = {"command": self.command}
        returncode = run_command(self.command, workdir, env, self.timeout_s)
        if returncode is None:
            return LabelResult(None, "failed", f"timed out after {self.timeout_s} s", doc)
        doc["returncode"] = returncode
        if returncode != 0:
            err = (workdir / "script.err").read_text(errors="replace")
            tail = err.strip().splitlines()[-1:] or [""]
            return LabelResult(None, "failed", f"command exited {returncode}: {tail[0]}", doc)
        result = find_result(workdir)
        if result is None:
            return LabelResult(None, "failed", "the command left no result file", doc)
        return _read_result(result, atoms, doc)

    def _collect(self, atoms: Atoms, workdir: Path) -> LabelResult:
        """Batch mode: this structure's result among what the batch command left."""
        run = self._batch_run
        doc = {
            "command": run["command"],
            "batch_returncode": run["returncode"],
            "batch_wall_time_s": run["wall_time_s"],
        }
        found = _batch_results(workdir.parent.resolve(), workdir.name)
        if found:
            return _read_result(found[0], atoms, doc)
        if run["returncode"] is None:
            why = f"timed out after {self.timeout_s} s (the batch command)"
        elif run["returncode"] != 0:
            why = f"command exited {run['returncode']}: {run['stderr_tail']}"
        else:
            why = f"the batch command left no result for {workdir.name}"
        return LabelResult(None, "failed", why, doc)


def _batch_results(output: Path, sid: str) -> list[Path]:
    """A structure's result files in a batch's output directory, preferred first."""
    for pattern in (f"{sid}_vasprun.xml*", f"{sid}_OUTCAR*", f"{sid}.extxyz"):
        found = sorted(output.glob(pattern))
        if found:
            return found
    return []


def _read_result(result: Path, atoms: Atoms, doc: dict) -> LabelResult:
    """Labels from a result file, through the checked parsers."""
    doc["result_file"] = result.name
    try:
        if vasp_result_name(result) is not None:
            labelled = vasp_result_labels(result)
        else:
            labelled = labels_of(Frame(ase.io.read(result, index=-1), str(result), -1))
    except Exception as exc:  # truncated or unparsable output
        return LabelResult(None, "failed", f"{result.name}: unreadable ({exc})", doc)
    if len(labelled.frame.atoms) != len(atoms):
        return LabelResult(None, "failed", f"{result.name}: wrong number of atoms", doc)
    out = singlepoint(labelled.frame.atoms, labelled.energy, labelled.forces, labelled.stress)
    return LabelResult(out, "success", None, doc)
