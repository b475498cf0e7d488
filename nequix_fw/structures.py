"""Structure I/O: read any ASE-readable input, content-hash ids, atomic file writes."""

from __future__ import annotations

import glob
import hashlib
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.geometry import complete_cell
from matscipy.neighbours import neighbour_list

from nequix_fw.errors import OutputError, StructureError

#: File names and suffixes picked up when a directory is given.
STRUCTURE_SUFFIXES = {".xyz", ".extxyz", ".traj", ".vasp", ".poscar", ".cif"}
STRUCTURE_PREFIXES = ("POSCAR", "CONTCAR")
#: A dataset in the MongoDB store is named ``db:NAME`` wherever a dataset path is accepted.
STORE_PREFIX = "db:"
#: Suffix of the temp files of atomic writes.
TMP_SUFFIX = ".tmp"
#: A selection's index of its structure files and their ids (``{"structures": [{"file", "id"}]}``,
#: in file-name order), beside its manifest.json (which has every candidate): what labelling reads.
SELECTED_INDEX = "selected.json"


@dataclass(frozen=True)
class Frame:
    """One structure with where it came from."""

    atoms: Atoms
    source: str
    frame: int

    @property
    def id(self) -> str:
        return structure_id(self.atoms)


def structure_id(atoms: Atoms) -> str:
    """Stable content hash of a structure: species, positions (wrapped into the cell for periodic
    directions, so a POSCAR round trip keeps the id; 1e-5 Å), cell (1e-5 Å) and pbc."""
    positions = atoms.get_positions(wrap=bool(atoms.pbc.any()))
    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.round(positions.astype(np.float64), 5).tobytes())
    h.update(np.round(np.asarray(atoms.cell[:], dtype=np.float64), 5).tobytes())
    h.update(np.asarray(atoms.pbc, dtype=np.int8).tobytes())
    return h.hexdigest()[:20]


def is_store_spec(spec: str | Path) -> bool:
    """Whether a dataset argument names a store dataset (``db:NAME``)."""
    return str(spec).startswith(STORE_PREFIX)


def _is_structure_file(path: Path) -> bool:
    return path.suffix.lower() in STRUCTURE_SUFFIXES or path.name.startswith(STRUCTURE_PREFIXES)


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named directly, plus the structure files found (recursively) in directories."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not p.name.startswith(".") and _is_structure_file(p)
            )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise StructureError(f"{path}: no such file or directory")
    if not files:
        raise StructureError(
            f"no structure files in {', '.join(str(i) for i in inputs) or 'the input'}"
        )
    return files


def _read_file(path: Path) -> Iterator[Atoms]:
    n = 0  # frames read
    try:
        for atoms in ase.io.iread(str(path), index=":"):
            yield atoms
            n += 1
    except Exception as exc:  # ASE raises many kinds for malformed files
        cause = str(exc).strip() or type(exc).__name__
        if "StopIteration" in cause or isinstance(exc, StopIteration):  # a reader ran out
            raise StructureError(
                f"{path}: the file ends in the middle of frame {n} (frames 0-{n - 1} are whole); "
                "it was cut short: write it again, or remove the partial frame"
                if n
                else f"{path}: the file ends in the middle of its first frame (cut short?)"
            ) from None
        where = f"frame {n}: " if n else ""
        raise StructureError(f"{path}: cannot read structures ({where}{cause})") from None


def iter_frames(inputs: Iterable[str | Path]) -> Iterator[Frame]:
    """Every frame of every input file, in order. Raises `StructureError` naming the file."""
    for path in expand_inputs(inputs):
        n = 0
        for i, atoms in enumerate(_read_file(path)):
            if len(atoms) == 0:
                raise StructureError(f"{path}: frame {i} has no atoms")
            yield Frame(atoms=atoms, source=str(path), frame=i)
            n += 1
        if n == 0:
            raise StructureError(f"{path}: file holds no structures")


def min_distance(atoms: Atoms, cutoff: float = 8.0) -> float:
    """Smallest interatomic distance in Å (periodic images included); inf for one atom, or
    when no pair is closer than `cutoff` (Å): a check against a threshold needs a neighbour
    list only that far."""
    if len(atoms) < 2 and not atoms.pbc.any():
        return float("inf")
    d = neighbour_list(
        "d", positions=atoms.positions, cell=complete_cell(atoms.cell), pbc=atoms.pbc, cutoff=cutoff
    )
    return float(d.min()) if len(d) else float("inf")


def check_output(path: str | Path, kind: str = "file") -> Path:
    """Fail early, creating nothing, when `path` cannot become an output `kind` ("file" or
    "directory"): an existing entry of the other kind, or no writable parent."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name for the output")
    if kind == "directory" and path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory")
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"{parent}: cannot write there (not a writable directory; needed for {path})"
        )
    return path


def check_writable_dir(path: Path) -> None:
    """Fail early if files cannot be created in directory `path`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there ({exc.strerror or exc})") from None


def umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode(path: Path, mode: int | None = None) -> int:
    """The permission bits a rewritten `path` gets: `mode` if given, else those `path` already
    has, else what the umask allows a new file (colleagues keep their read access)."""
    if mode is not None:
        return mode
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~umask()


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None):
    """Yield a temp path beside `path`; on success it is renamed onto `path` (with the mode of
    `new_file_mode`), else removed. Temp files that a killed process left for `path` are
    removed first (their names carry the host and process id of their writer)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name for the output")
    check_writable_dir(path.parent if str(path.parent) else Path("."))
    remove_stale_temps(path)
    prefix = f".{path.name}.{socket.gethostname()}-{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, new_file_mode(path, mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(path: str | Path) -> int:
    """Remove the temp files of `atomic_path` for `path` whose writer (a process on this host)
    is gone, e.g. killed with -9; how many were removed."""
    path = Path(path)
    host = socket.gethostname()
    n = 0
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        writer = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        owner, _, pid = writer.rpartition("-")
        if owner == host and pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, exited but not yet reaped, does
    not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def write_structure(atoms: Atoms, path: str | Path, fmt: str) -> None:
    """Write one structure atomically (`fmt` is an ASE format name: 'vasp', 'extxyz', ...)."""
    with atomic_path(path) as tmp:
        if fmt == "vasp":
            ase.io.write(tmp, atoms, format="vasp", direct=True)
        else:
            ase.io.write(tmp, atoms, format=fmt)


#: Volume strains of the E-V curves (isotropic scaling, fractions of the volume).
EV_STRAINS = np.linspace(-0.06, 0.06, 7)


def scaled_cells(atoms: Atoms, strains: Sequence[float] = EV_STRAINS) -> list[Atoms]:
    """`atoms` scaled isotropically to each volume strain (the E-V set)."""
    cells = []
    for s in strains:
        a = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        a.set_cell(atoms.cell[:] * (1 + s) ** (1 / 3), scale_atoms=True)
        cells.append(a)
    return cells
