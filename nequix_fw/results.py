"""The ensemble-results JSON file: versioned schema, streamed writer and reader.

Schema ``nequix-fw/ensemble-results`` version 1 (one JSON document)::

    {"schema": "nequix-fw/ensemble-results", "schema_version": 1,
     "created": ISO time, "nequix_fw_version": str,
     "units": {...}, "models": [ModelInfo...], "settings": {...},
     "structures": [record, ...],
     "summary": {"n_structures": int, "n_failed": int, "n_atoms": int}}

Each record::

    {"id": content hash, "source": file, "frame": index in file, "n_atoms": int,
     "formula": str, "status": "ok"|"failed", "error": str|null,
     "structure": {"numbers", "positions" (Å), "cell" (Å), "pbc"},
     "energies": [M] (eV), "forces": [M][N][3] (eV/Å), "stresses": [M][6] (GPa) or null,
     "mean": {"energy", "forces", "stress"},
     "metrics": {"max_force_dev", "mean_force_dev", "energy_std_per_atom", "stress_std"}}

Stresses are Voigt (xx, yy, zz, yz, xz, xy) in GPa with ASE's sign (positive = tensile).
Per-model arrays are omitted when ``store_per_model`` is off. The writer puts the header on the
first line and one record per line, so the file can be read back record by record with bounded
memory; any other valid JSON with the same content is read too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from ase import Atoms
from ase.units import GPa

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
_FOOTER_PREFIX = '], "summary": '

if TYPE_CHECKING:
    from nequix_fw.ensemble import EnsembleRecord


def _arr(x, decimals: int = 7):
    """Rounded JSON lists; non-finite values (failed predictions) become null."""
    if x is None:
        return None
    a = np.round(np.asarray(x, dtype=np.float64), decimals)
    return a.tolist() if np.isfinite(a).all() else np.where(np.isfinite(a), a, None).tolist()


def record_to_dict(rec: EnsembleRecord, per_model: bool = True) -> dict:
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
        "structure": {
            "numbers": atoms.numbers.tolist(),
            "positions": _arr(atoms.positions, 8),
            "cell": _arr(atoms.cell[:], 8),
            "pbc": atoms.pbc.tolist(),
        },
    }
    if per_model:
        d["energies"] = _arr(p.energies)
        d["forces"] = _arr(p.forces)
        d["stresses"] = _arr(stresses_gpa)
    d["mean"] = {
        "energy": _arr(p.energies.mean()),
        "forces": _arr(p.forces.mean(axis=0)),
        "stress": None if stresses_gpa is None else _arr(stresses_gpa.mean(axis=0)),
    }
    d["metrics"] = rec.metrics
    return d


def record_atoms(record: dict) -> Atoms:
    """The structure of a results record as ASE Atoms."""
    s = record["structure"]
    return Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])


class ResultsWriter:
    """Stream records into the results JSON; the file appears (atomically) only on success."""

    def __init__(self, path: str | Path, models: list[dict], settings: dict):
        self.path = Path(path)
        self.header = EnsembleResultsHeader(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            units=UNITS,
            models=models,
            settings=settings,
        ).to_dict()
        self.per_model = bool(settings.get("store_per_model", True))
        self.summary = {"n_structures": 0, "n_failed": 0, "n_atoms": 0}
        self._ctx = None
        self._f: IO[str] | None = None

    def __enter__(self) -> ResultsWriter:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._f = open(tmp, "w", encoding="utf-8")
        self._f.write(json.dumps(self.header, ensure_ascii=False)[:-1] + ', "structures": [')
        return self

    def write(self, rec: EnsembleRecord) -> None:
        sep = "\n" if self.summary["n_structures"] == 0 else "\n,"
        self._f.write(sep + json.dumps(record_to_dict(rec, self.per_model), allow_nan=False))
        self.summary["n_structures"] += 1
        self.summary["n_failed"] += rec.status != "ok"
        self.summary["n_atoms"] += len(rec.frame.atoms)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._f.write("\n" + _FOOTER_PREFIX + json.dumps(self.summary) + "}\n")
        self._f.close()
        return self._ctx.__exit__(exc_type, exc, tb)


def _bad(path: Path, why: str) -> NequixFWError:
    return NequixFWError(f"{path}: not an ensemble-results file ({why})")


def _check_header(path: Path, header: dict) -> dict:
    if not isinstance(header, dict) or header.get("schema") != SCHEMA:
        raise _bad(path, f"schema is not {SCHEMA}")
    if header.get("schema_version") != SCHEMA_VERSION:
        raise _bad(path, f"schema_version {header.get('schema_version')} is not {SCHEMA_VERSION}")
    fields = {k: v for k, v in header.items() if k not in ("structures", "summary")}
    try:
        EnsembleResultsHeader.check(fields, path)
    except DocumentError as exc:
        raise _bad(path, str(exc).split("(", 1)[-1].rstrip(")")) from None
    return header


def read_results(path: str | Path) -> tuple[dict, Iterator[dict]]:
    """(header, iterator over records) of a results file; streams files this package wrote."""
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

        return header, stream()
    f.close()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _bad(path, str(exc)) from None
    header = _check_header(path, doc)
    return header, iter(doc.get("structures", []))
