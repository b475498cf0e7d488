"""The ensemble-results file: versioned schema, streamed writer and reader.

Schema ``nequix-fw/ensemble-results`` version 2 (the default, ``ensemble.results_format:
columnar``): a JSON document ``<name>.json`` with one small record per structure, and beside it
``<name>.arrays.npz`` (a NumPy zip) with the per-atom arrays, so that a file of 10^5
structures of 100 atoms stays under 1 GB::

    {"schema": "nequix-fw/ensemble-results", "schema_version": 2,
     "created": ISO time, "nequix_fw_version": str,
     "units": {...}, "models": [ModelInfo...], "settings": {...},
     "uncertainty_method": "ensemble" | "llpr" | "ensemble+llpr",
     "arrays": {"file": "<name>.arrays.npz", "token": str, "records_per_chunk": int,
                "per_model": bool},
     "structures": [record, ...],
     "summary": {"n_structures": int, "n_failed": int, "n_atoms": int}}

Each record::

    {"id": content hash, "source": file, "frame": index in file, "n_atoms": int,
     "formula": str, "status": "ok"|"failed", "error": str|null,
     "energies": [M] (eV), "stresses": [M][6] (GPa) or null,   (M rows: members, LLPR heads)
     "mean": {"energy", "stress"},
     "metrics": {"max_force_dev", "mean_force_dev", "energy_std_per_atom", "stress_std"},
     "geometry_<range>_<bins>": [float] (the hand-made descriptor's element-free part,
     `descriptors.geometry`, when the models' cutoff covers its range; optional)}

The arrays file holds ``token`` (the header's) and, for records ``k*R .. k*R+R-1`` (R =
``records_per_chunk``), members ``c<k>.n_atoms`` (R), ``c<k>.numbers`` (atoms), ``c<k>.positions``
(atoms x 3, Å, float64), ``c<k>.cells`` (R x 3 x 3, Å), ``c<k>.pbc`` (R x 3) and
``c<k>.forces`` (M x atoms x 3, eV/Å, float32, as the models compute them) or, without
per-model arrays, ``c<k>.mean_forces`` (atoms x 3).

Version 1 (``results_format: json``) keeps everything in the JSON: each record also has
``"structure": {"numbers", "positions", "cell", "pbc"}``, ``"forces": [M][N][3]`` and
``"mean": {"forces"}``. Both versions are read; `read_results` gives their records in
version 1's form (arrays as NumPy arrays).

Stresses are Voigt (xx, yy, zz, yz, xz, xy) in GPa with ASE's sign (positive = tensile).
Per-model arrays are omitted when ``store_per_model`` is off. The writer puts the header on the
first line and one record per line, so the file can be read back record by record with bounded
memory; any other valid JSON with the same content is read too.
"""

from __future__ import annotations

import json
import secrets
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from ase import Atoms
from ase.units import GPa

from nequix_fw.descriptors import GEOMETRY_KEY
from nequix_fw.errors import NequixFWError
from nequix_fw.schemas import DocumentError, EnsembleResultsHeader
from nequix_fw.structures import atomic_path

SCHEMA, SCHEMA_VERSION = EnsembleResultsHeader.SCHEMA, EnsembleResultsHeader.VERSION
UNITS = {
    "energy": "eV",
    "forces": "eV/Å",
    "stress": "GPa, Voigt xx yy zz yz xz xy, positive = tensile",
    "max_force_dev": "eV/Å",
    "mean_force_dev": "eV/Å",
    "energy_std_per_atom": "eV/atom",
    "stress_std": "GPa",
    "positions": "Å",
}
#: Records per chunk of the arrays file: what the writer and the reader hold at once.
RECORDS_PER_CHUNK = 1024
_FOOTER_PREFIX = '], "summary": '

if TYPE_CHECKING:
    from nequix_fw.ensemble import EnsembleRecord


def arrays_path(path: str | Path) -> Path:
    """The arrays file beside results file `path` (``x.json`` -> ``x.arrays.npz``)."""
    path = Path(path)
    stem = path.stem if path.suffix == ".json" else path.name
    return path.with_name(f"{stem}.arrays.npz")


def _arr(x, decimals: int = 7):
    """Rounded JSON lists; non-finite values (failed predictions) become null."""
    if x is None:
        return None
    a = np.round(np.asarray(x, dtype=np.float64), decimals)
    return a.tolist() if np.isfinite(a).all() else np.where(np.isfinite(a), a, None).tolist()


def record_to_dict(rec: EnsembleRecord, per_model: bool = True, arrays: bool = False) -> dict:
    """A record as written; with `arrays` (version 2) without its per-atom arrays."""
    atoms = rec.frame.atoms
    p = rec.prediction
    stresses_gpa = None if p.stresses is None else p.stresses / GPa
    d = {
        "id": rec.id,
        "source": rec.frame.source,
        "frame": rec.frame.frame,
        "n_atoms": len(atoms),
        "formula": atoms.get_chemical_formula(),
        "status": rec.status,
        "error": rec.error,
    }
    if not arrays:
        d["structure"] = {
            "numbers": atoms.numbers.tolist(),
            "positions": _arr(atoms.positions, 8),
            "cell": _arr(atoms.cell[:], 8),
            "pbc": atoms.pbc.tolist(),
        }
    if per_model:
        d["energies"] = _arr(p.energies)
        if not arrays:
            d["forces"] = _arr(p.forces)
        d["stresses"] = _arr(stresses_gpa)
    d["mean"] = {"energy": _arr(p.energies.mean())}
    if not arrays:
        d["mean"]["forces"] = _arr(p.forces.mean(axis=0))
    d["mean"]["stress"] = None if stresses_gpa is None else _arr(stresses_gpa.mean(axis=0))
    d["metrics"] = rec.metrics
    if rec.geometry is not None:
        d[GEOMETRY_KEY] = _arr(rec.geometry)
    return d


def record_atoms(record: dict) -> Atoms:
    """The structure of a results record as ASE Atoms."""
    s = record["structure"]
    return Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])


class _ArraysWriter:
    """Per-atom arrays of the records, a chunk at a time, into a zip of .npy members (read by
    `np.load`)."""

    def __init__(self, path: Path, token: str, per_model: bool, records_per_chunk: int):
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.per_model, self.records_per_chunk = per_model, records_per_chunk
        self.chunk = 0
        self.rows: list[EnsembleRecord] = []
        self._put("token", np.array(token))

    def _put(self, name: str, array: np.ndarray) -> None:
        with self.zip.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, array, allow_pickle=False)

    def add(self, rec: EnsembleRecord) -> None:
        self.rows.append(rec)
        if len(self.rows) == self.records_per_chunk:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        atoms = [r.frame.atoms for r in self.rows]
        c = f"c{self.chunk:06d}"
        self._put(f"{c}.n_atoms", np.array([len(a) for a in atoms], dtype=np.int32))
        self._put(f"{c}.numbers", np.concatenate([a.numbers for a in atoms]).astype(np.uint8))
        self._put(f"{c}.positions", np.concatenate([a.positions for a in atoms]))
        self._put(f"{c}.cells", np.array([a.cell[:] for a in atoms], dtype=np.float64))
        self._put(f"{c}.pbc", np.array([a.pbc for a in atoms], dtype=bool))
        forces = [r.prediction.forces for r in self.rows]
        if self.per_model:
            self._put(f"{c}.forces", np.concatenate(forces, axis=1).astype(np.float32))
        else:
            mean = np.concatenate([f.mean(axis=0) for f in forces])
            self._put(f"{c}.mean_forces", mean.astype(np.float32))
        self.chunk += 1
        self.rows = []

    def close(self) -> None:
        self.zip.close()


class ResultsWriter:
    """Stream records into the results file (and its arrays file, version 2); they appear
    (atomically) only on success."""

    def __init__(
        self,
        path: str | Path,
        models: list[dict],
        settings: dict,
        records_per_chunk: int = RECORDS_PER_CHUNK,
        uncertainty_method: str = "ensemble",
    ):
        self.path = Path(path)
        self.per_model = bool(settings.get("store_per_model", True))
        self.columnar = settings.get("results_format", "columnar") == "columnar"
        arrays = None
        if self.columnar:
            arrays = {
                "file": arrays_path(self.path).name,
                "token": secrets.token_hex(8),
                "records_per_chunk": records_per_chunk,
                "per_model": self.per_model,
            }
        self.header = EnsembleResultsHeader(
            schema_version=SCHEMA_VERSION if self.columnar else 1,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            units=UNITS,
            models=models,
            settings=settings,
            arrays=arrays,
            uncertainty_method=uncertainty_method,
        ).to_dict()
        self.summary = {"n_structures": 0, "n_failed": 0, "n_atoms": 0}
        self._stack = ExitStack()
        self._f: IO[str] | None = None
        self._arrays: _ArraysWriter | None = None

    def __enter__(self) -> ResultsWriter:
        with ExitStack() as stack:  # on exit, the arrays file is in place before the JSON
            tmp = stack.enter_context(atomic_path(self.path))
            if self.columnar:
                tmp_arrays = stack.enter_context(atomic_path(arrays_path(self.path)))
                info = self.header["arrays"]
                self._arrays = _ArraysWriter(
                    tmp_arrays, info["token"], self.per_model, info["records_per_chunk"]
                )
                stack.callback(self._arrays.close)
            self._f = stack.enter_context(open(tmp, "w", encoding="utf-8"))
            self._stack = stack.pop_all()
        self._f.write(json.dumps(self.header, ensure_ascii=False)[:-1] + ', "structures": [')
        return self

    def write(self, rec: EnsembleRecord) -> None:
        sep = "\n" if self.summary["n_structures"] == 0 else "\n,"
        d = record_to_dict(rec, self.per_model, arrays=self.columnar)
        self._f.write(sep + json.dumps(d, allow_nan=False))
        if self._arrays is not None:
            self._arrays.add(rec)
        self.summary["n_structures"] += 1
        self.summary["n_failed"] += rec.status != "ok"
        self.summary["n_atoms"] += len(rec.frame.atoms)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._f.write("\n" + _FOOTER_PREFIX + json.dumps(self.summary) + "}\n")
            if self._arrays is not None:
                self._arrays.flush()
        done = self._stack.__exit__(exc_type, exc, tb)
        if exc_type is None and not self.columnar:
            arrays_path(self.path).unlink(missing_ok=True)  # an older run's, now unrelated
        return done


def _bad(path: Path, why: str) -> NequixFWError:
    return NequixFWError(f"{path}: not an ensemble-results file ({why})")


def _check_header(path: Path, header: dict) -> dict:
    if not isinstance(header, dict) or header.get("schema") != SCHEMA:
        raise _bad(path, f"schema is not {SCHEMA}")
    fields = {k: v for k, v in header.items() if k not in ("structures", "summary")}
    try:
        EnsembleResultsHeader.check(fields, path)
    except DocumentError as exc:
        raise _bad(path, str(exc).split("(", 1)[-1].rstrip(")")) from None
    return header


class _ArraysReader:
    """The per-atom arrays of a version-2 results file, a chunk at a time."""

    def __init__(self, path: Path, header: dict):
        info = header["arrays"]
        self.results = path
        self.path = path.with_name(info["file"])
        self.per_model, self.rpc = info["per_model"], info["records_per_chunk"]
        try:
            self.npz = np.load(self.path, allow_pickle=False)
            token = str(self.npz["token"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise _bad(path, f"its arrays file {self.path.name} cannot be read: {why}") from None
        if token != info["token"]:
            raise _bad(
                path,
                f"its arrays file {self.path.name} was written by another run (token "
                f"{token} is not {info['token']}); rerun run-ensemble",
            )
        self.chunk, self.arrays, self.offsets = -1, {}, np.zeros(1, dtype=np.int64)

    def _load(self, chunk: int) -> None:
        names = ["n_atoms", "numbers", "positions", "cells", "pbc"]
        names.append("forces" if self.per_model else "mean_forces")
        try:
            self.arrays = {n: self.npz[f"c{chunk:06d}.{n}"] for n in names}
        except KeyError:
            first = chunk * self.rpc
            why = f"its arrays file {self.path.name} holds no records from {first} on"
            raise _bad(self.results, why) from None
        except (ValueError, zipfile.BadZipFile) as exc:
            raise _bad(self.results, f"its arrays file {self.path.name}: {exc}") from None
        self.offsets = np.concatenate([[0], np.cumsum(self.arrays["n_atoms"])])
        self.chunk = chunk

    def fill(self, index: int, rec: dict) -> dict:
        """Record `index` with its structure and forces, as version 1 has them."""
        chunk, row = divmod(index, self.rpc)
        if chunk != self.chunk:
            self._load(chunk)
        a = self.arrays
        if row >= len(a["n_atoms"]) or a["n_atoms"][row] != rec.get("n_atoms"):
            raise _bad(self.results, f"record {index} does not match its arrays file")
        atoms = slice(self.offsets[row], self.offsets[row + 1])
        rec["structure"] = {
            "numbers": a["numbers"][atoms].astype(int),
            "positions": a["positions"][atoms],
            "cell": a["cells"][row],
            "pbc": a["pbc"][row],
        }
        mean = rec.setdefault("mean", {})
        if self.per_model:
            rec["forces"] = a["forces"][:, atoms]
            mean["forces"] = rec["forces"].mean(axis=0)
        else:
            mean["forces"] = a["mean_forces"][atoms]
        return rec

    def close(self) -> None:
        self.npz.close()


def _with_arrays(
    path: Path, header: dict, records: Iterator[dict], ids: set[str] | None
) -> Iterator[dict]:
    wanted = ((i, rec) for i, rec in enumerate(records) if ids is None or rec.get("id") in ids)
    if header.get("schema_version") != 2:
        yield from (rec for _, rec in wanted)
        return
    arrays = _ArraysReader(path, header)
    try:
        for i, rec in wanted:
            yield arrays.fill(i, rec)
    finally:
        arrays.close()


def read_results(path: str | Path, ids: set[str] | None = None) -> tuple[dict, Iterator[dict]]:
    """(header, iterator over records) of a results file of either version; streams files this
    package wrote (a version-2 file's arrays a chunk at a time). With `ids`, only the records
    of those structure ids (and only their arrays are read)."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise NequixFWError(f"{path}: cannot read ensemble results ({exc.strerror})") from None
    first = f.readline()
    if first.endswith('"structures": [\n'):
        try:
            header = json.loads(first[: -len(', "structures": [\n')] + "}")
        except json.JSONDecodeError as exc:
            f.close()
            raise _bad(path, f"bad header: {exc}") from None
        _check_header(path, header)

        def stream() -> Iterator[dict]:
            with f:
                for lineno, line in enumerate(f, start=2):
                    if line.startswith(_FOOTER_PREFIX):
                        return
                    try:
                        yield json.loads(line[1:] if line.startswith(",") else line)
                    except json.JSONDecodeError as exc:
                        raise _bad(path, f"line {lineno}: {exc}") from None
                raise _bad(path, "truncated: no summary at the end")

        if header["schema_version"] == 2:
            _ArraysReader(path, header).close()  # a missing or unrelated arrays file: now
        return header, _with_arrays(path, header, stream(), ids)
    f.close()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _bad(path, str(exc)) from None
    header = _check_header(path, doc)
    if header["schema_version"] == 2:
        _ArraysReader(path, header).close()
    return header, _with_arrays(path, header, iter(doc.get("structures", [])), ids)
