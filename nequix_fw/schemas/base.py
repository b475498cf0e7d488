"""What every document shares: its name and version, and how it is written and read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nequix_fw import __version__
from nequix_fw.errors import NequixFWError
from nequix_fw.structures import atomic_path

D = TypeVar("D", bound="Document")


def json_chunks(doc: dict) -> Iterator[str]:
    """`doc` as JSON text, in pieces: each top-level value indented, a list of objects one per
    line (written as it goes: a list of 10^5 items is never one string)."""
    yield "{\n"
    for k, (key, value) in enumerate(doc.items()):
        yield (",\n" if k else "") + f" {json.dumps(key)}: "
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield "[\n  "
            for i, item in enumerate(value):
                yield (",\n  " if i else "") + json.dumps(item, ensure_ascii=False)
            yield "\n ]"
        else:
            yield json.dumps(value, indent=1, ensure_ascii=False).replace("\n", "\n ")
    yield "\n}\n"


class DocumentError(NequixFWError):
    """A file that is not the document it should be."""


class Document(BaseModel):
    """A versioned JSON document; subclasses set `SCHEMA` and declare their fields."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    SCHEMA: ClassVar[str]
    VERSION: ClassVar[int] = 1
    #: Older versions a reader still accepts (written only when asked for).
    OLDER: ClassVar[tuple[int, ...]] = ()
    #: Leave fields that are None out of the file (optional sections).
    OMIT_NONE: ClassVar[bool] = False

    schema_name: str = Field("", alias="schema", description="The document's name.")
    schema_version: int = Field(0, description="Its version (a reader refuses others).")
    nequix_fw_version: str = Field(__version__, description="nequix-fw that wrote it.")

    @model_validator(mode="before")
    @classmethod
    def _this_schema(cls, data):
        """Name and version filled in when missing; another document's refused first."""
        if isinstance(data, dict):
            data = dict(data)
            name = data.setdefault("schema", cls.SCHEMA)
            version = data.setdefault("schema_version", cls.VERSION)
            if name != cls.SCHEMA or version not in (cls.VERSION, *cls.OLDER):
                versions = " or ".join(str(v) for v in (cls.VERSION, *cls.OLDER))
                raise ValueError(
                    f"schema {name!r} version {version} is not {cls.SCHEMA!r} version {versions}"
                )
        return data

    def to_dict(self) -> dict:
        """The document as JSON-ready data (``schema`` first)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=self.OMIT_NONE)

    def to_file(self, path: str | Path, data: dict | None = None) -> Path:
        """Write the document atomically (temp file + rename): indented, but one line per
        item of a top-level list (a selection's 10^5 structures are written by the C encoder,
        about 10 times as fast as the indenting one). `data` is its `to_dict()` where the
        caller has made it already (a large document is then not dumped twice)."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json_chunks(self.to_dict() if data is None else data))
        return path

    @classmethod
    def check(cls: type[D], data, where: str | Path) -> D:
        """`data` as this document; an error naming `where` and the first problem if not."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise DocumentError(
                f"{where}: not a {cls.SCHEMA} document ({loc + ': ' if loc else ''}{msg})"
            ) from None

    @classmethod
    def from_file(cls: type[D], path: str | Path) -> D:
        """Read a document written by `to_file`, checked."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DocumentError(f"{path}: cannot read a {cls.SCHEMA} document ({exc})") from None
        return cls.check(data, path)
