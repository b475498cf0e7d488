"""Label with the user's own command (compatible with the seed's `launch_dft.sh`).

The command runs through the shell in the structure's directory, which holds the structure as
`POSCAR`; the environment variable ``NEQUIX_FW_STRUCTURE`` names it. The command leaves its
labels there as ``labelled.extxyz`` (or another ``*.extxyz``), ``vasprun.xml`` or ``OUTCAR``;
the last frame is taken.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import ase.io
from ase import Atoms

from nequix_fw.dataset import labels_of, vasp_result_labels
from nequix_fw.errors import SettingsError
from nequix_fw.labelling.base import LabellingBackend, LabelResult, singlepoint
from nequix_fw.structures import Frame

#: Result files looked for, in order of preference.
RESULT_PATTERNS = ("labelled.extxyz", "*.extxyz", "vasprun.xml*", "OUTCAR*")


def find_result(workdir: Path) -> Path | None:
    for pattern in RESULT_PATTERNS:
        found = sorted(workdir.glob(pattern))
        if found:
            return found[0]
    return None


def run_command(command: str, workdir: Path, env: dict, timeout_s: float | None) -> int | None:
    """Run `command` through the shell in `workdir`, output to ``script.out``/``script.err``
    there; its exit code, or None when it ran past `timeout_s`. The command runs in a process
    group of its own, and the whole group is killed at the time-out (a shell's children too)."""
    with open(workdir / "script.out", "wb") as out, open(workdir / "script.err", "wb") as err:
        proc = subprocess.Popen(command, shell=True, cwd=workdir, env=env, stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
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
    """Runs a shell command per structure and reads the labels it leaves behind."""

    name = "script"

    def __init__(self, command: str | None, timeout_s: float | None = None):
        if not command:
            raise SettingsError("the script backend needs labelling.command (--command)")
        program = shlex.split(command)[0]
        if shutil.which(program) is None and not Path(program).is_file():
            raise SettingsError(
                f"labelling.command: executable {program!r} not found (command: {command!r})"
            )
        self.command = command
        self.timeout_s = timeout_s

    def settings_doc(self) -> dict:
        return {"command": self.command}

    def label(self, atoms: Atoms, workdir: Path) -> LabelResult:
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
        doc["result_file"] = result.name
        try:
            if result.name.startswith(("vasprun", "OUTCAR")):
                labelled = vasp_result_labels(result)
            else:
                labelled = labels_of(Frame(ase.io.read(result, index=-1), str(result), -1))
        except Exception as exc:  # truncated or unparsable output
            return LabelResult(None, "failed", f"{result.name}: unreadable ({exc})", doc)
        if len(labelled.frame.atoms) != len(atoms):
            return LabelResult(None, "failed", f"{result.name}: wrong number of atoms", doc)
        out = singlepoint(labelled.frame.atoms, labelled.energy, labelled.forces, labelled.stress)
        return LabelResult(out, "success", None, doc)
