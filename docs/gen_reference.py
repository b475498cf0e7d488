"""The reference pages, generated from the code so that they cannot drift: every settings
section and field (pydantic classes), every command and flag (the argparse parser), every
document schema (`nequix_fw.schemas`) and every MongoDB collection (`nequix_fw.store`).

`hooks.py` puts them into the pages at build time, where a page holds ``<!-- reference:
NAME -->``; `tests/test_docs.py` checks the built site against the same code.
"""

from __future__ import annotations

import argparse
import inspect
import typing
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from nequix_fw import schemas, settings, store
from nequix_fw.cli import build_parser


def _cell(text: object) -> str:
    """Text for one table cell: no newlines, no unescaped pipes."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    for prefix in ("typing.", "pathlib.", "nequix_fw.settings."):
        text = text.replace(prefix, "")
    return text.replace("NoneType", "None")


def _default(info) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    return f"`{str(value) if isinstance(value, Path) else repr(value)}`"


def _model_classes(annotation) -> list[type[BaseModel]]:
    """Settings classes nested in a field's type (lists, dicts, optionals)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [c for a in typing.get_args(annotation) for c in _model_classes(a)]


def model_table(cls: type[BaseModel]) -> str:
    """A field | type | default | description table of a pydantic class."""
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for name, info in cls.model_fields.items():
        shown = info.alias or name
        rows.append(
            f"| `{shown}` | {_cell(_type(info.annotation))} | {_cell(_default(info))} | "
            f"{_cell(info.description or '')} |"
        )
    return "\n".join(rows)


def settings_reference() -> str:
    """Every section of a settings file, and the classes nested in them."""
    out, seen = [], set()
    for section, cls in settings.SECTIONS.items():
        out += [f"## `{section}`", "", inspect.getdoc(cls) or "", "", model_table(cls), ""]
        seen.add(cls)
    pending = [
        c
        for cls in settings.SECTIONS.values()
        for f in cls.model_fields.values()
        for c in _model_classes(f.annotation)
    ]
    while pending:
        cls = pending.pop(0)
        if cls in seen:
            continue
        seen.add(cls)
        out += [f"## `{cls.__name__}`", "", inspect.getdoc(cls) or "", "", model_table(cls), ""]
        pending += [c for f in cls.model_fields.values() for c in _model_classes(f.annotation)]
    return "\n".join(out)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """{name: (help, parser)} of a parser's subcommands, nested ones as 'db start'."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                nested = _subcommands(sub)
                if nested:
                    out.update({f"{name} {k}": v for k, v in nested.items()})
                else:
                    out[name] = (helps.get(name, ""), sub)
    return out


def _flag_row(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
    default = action.default
    shown = "" if default in (None, argparse.SUPPRESS, False) or action.required else repr(default)
    if action.required:
        shown = "required"
    choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
    return f"| {names} | {_cell(shown)} | {_cell((action.help or '') + choices)} |"


def cli_reference() -> str:
    """Every command of `nequix-fw` with its flags (help and default)."""
    parser = build_parser()
    out = ["Options before the command: `nequix-fw [--version] [--log-level LEVEL] COMMAND`.", ""]
    for name, (text, sub) in _subcommands(parser).items():
        actions = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        out += [f"## `nequix-fw {name}`", "", _cell(text) + ".", ""]
        out += ["| flag | default | description |", "| --- | --- | --- |"]
        out += [_flag_row(a) for a in actions]
        out.append("")
    return "\n".join(out)


def schemas_reference() -> str:
    """The documents the stages write (files), field by field."""
    out = [inspect.getdoc(schemas).split("\n\n", 1)[1], ""]
    for name in schemas.__all__:
        cls = getattr(schemas, name)
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            schema = getattr(cls, "SCHEMA", None)
            title = f"## `{name}`" + (f" (`{schema}`, version {cls.VERSION})" if schema else "")
            out += [title, "", inspect.getdoc(cls) or "", "", model_table(cls), ""]
    return "\n".join(out)


def collections_reference() -> str:
    """The MongoDB collections of the store, their documents, keys and indexes."""
    rows = ["| collection | one document per | `_id` | indexes |", "| --- | --- | --- | --- |"]
    for name, (what, key) in store.COLLECTIONS.items():
        indexes = "; ".join("+".join(k) for k in store.INDEXES.get(name, []))
        rows.append(f"| `{name}` | {_cell(what)} | `{key}` | {_cell(indexes)} |")
    return "\n".join(rows)


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": settings_reference,
    "cli": cli_reference,
    "schemas": schemas_reference,
    "collections": collections_reference,
}
