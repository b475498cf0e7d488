"""What every document shares: its name and version, and how it is written and read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nequix_fw import __version__
from nequix_fw.errors import NequixFWError
from nequix_fw.structures import atomic_path

D = TypeVar("D", bound="Document")


def json_text(doc: dict) -> str:
    """`doc` as JSON text: each top-level value indented, a list of objects one per line."""
    items = []
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines = ",\n  ".join(json.dumps(v, ensure_ascii=False) for v in value)
            text = f"[\n  {lines}\n ]"
        else:
            text = json.dumps(value, indent=1, ensure_ascii=False).replace("\n", "\n ")
        items.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(items) + "\n}\n"


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

    def to_file(self, path: str | Path) -> Path:
        """Write the document atomically (temp file + rename): indented, but one line per
        item of a top-level list (a selection's 10^5 structures are written by the C encoder,
        about 10 times as fast as the indenting one)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json_text(self.to_dict()), encoding="utf-8")
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
