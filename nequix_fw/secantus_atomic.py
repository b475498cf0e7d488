# SPDX-License-Identifier: GPL-2.0-only
# This file imports SecantusDB (GPL-2.0-only) and changes how its server runs one command, so
# it is under SecantusDB's licence, not nequix-fw's MIT. It runs only as its own process
# (`python -m nequix_fw.secantus_atomic`, started by `nequix-fw db start`); no other module of
# nequix-fw imports it, and it needs the optional extra `nequix-fw[server]`.
"""SecantusDB's server with an atomic findAndModify, as FireWorks needs it.

SecantusDB 0.7.0b3 answers findAndModify by reading the matching document, then writing it
under the collection's lock, and returning the document it read before that lock. Two
clients that increment one counter (FireWorks' `fw_id_assigner`, with `{}` as the query) can
both read the same value, and both get it back: FireWorks then gives one launch id to two
Fireworks. Here the whole command runs under the collection's lock (a re-entrant lock that
every write to the collection takes), so the document returned is the one the write changed.
Under that lock nothing else can change the document between the read and the write, so the
write goes by `_id` alone, without re-asserting the query, which keeps it on the `_id` index
instead of scanning the collection. A findAndModify's or find's `$or` of one field's values is
asked as the equivalent `$in` (`_or_to_in`), which the server answers from its indexes.

The change is tested on one SecantusDB version (`PINNED`); on any other this refuses to start,
in one line, rather than run unprotected.

    python -m nequix_fw.secantus_atomic [secantusd-py's options]
"""

import sys
import threading
from importlib.metadata import PackageNotFoundError, version

#: The SecantusDB version whose findAndModify this was written for and tested on.
PINNED = "0.7.0b3"

_held = threading.local()  # in findAndModify, holding the collection's lock


def _by_id(method):
    """`method` (a Storage write by filter) with findAndModify's write filter `{_id, $and:
    [query]}` cut to `{_id}` while the collection's lock is held since the read. An upsert
    (nothing matched: its filter is the query itself) is left as it is."""

    def write(self, db, coll, filter, *args, **kwargs):
        matched = getattr(_held, "locked", False) and not kwargs.get("upsert")
        if matched and isinstance(filter, dict) and set(filter) == {"_id", "$and"}:
            filter = {"_id": filter["_id"]}
        return method(self, db, coll, filter, *args, **kwargs)

    return write


_PLAIN = (type(None), str, int, float)


def _or_to_in(query: dict) -> dict:
    """`{$or: [{f: v1}, {f: v2}, ..], ..}` (one field, plain values) as `{f: {$in: [v1, v2,
    ..]}, ..}`: the same documents in MongoDB's semantics (a null matches a missing field in
    both, a value an array holding it), but SecantusDB 0.7.0b3 scans the whole collection for
    any `$or` and uses its indexes for the rest of an `$in` query. A clause `{f: {$exists:
    false}}` beside `{f: null}` adds nothing and is dropped. FireWorks checks a Firework out
    with `{$or: [{spec._fworker: {$exists: false}}, {spec._fworker: null}, {spec._fworker:
    NAME}], state: READY}`: 350 ms among 10^4 Fireworks. Any other query is left as it is."""
    clauses = query.get("$or")
    if not isinstance(clauses, list) or not clauses:
        return query
    if not all(isinstance(c, dict) and len(c) == 1 for c in clauses):
        return query
    fields = {next(iter(c)) for c in clauses}
    (field,) = fields if len(fields) == 1 else (None,)
    if field is None or field.startswith("$") or field in query:
        return query
    values = [c[field] for c in clauses]
    if None in values:  # {f: {$exists: false}} is within {f: null}: a missing field matches
        values = [v for v in values if v != {"$exists": False}]
    if not all(isinstance(v, _PLAIN) for v in values):
        return query
    return {**{k: v for k, v in query.items() if k != "$or"}, field: {"$in": values}}


def patch() -> None:
    """Make this process's SecantusDB findAndModify atomic (see the module's docstring)."""
    from secantus import commands, storage  # noqa: PLC0415 (after the version check)

    impl = commands._find_and_modify_impl

    def atomic(doc, ctx):
        coll = doc.get("findAndModify")
        if not isinstance(coll, str):
            return impl(doc, ctx)  # its own checks answer a malformed command
        if isinstance(doc.get("query"), dict):
            doc = {**doc, "query": _or_to_in(doc["query"])}
        with ctx.storage._coll_lock(ctx.db_name, coll):
            _held.locked = True
            try:
                return impl(doc, ctx)
            finally:
                _held.locked = False

    commands._find_and_modify_impl = atomic
    find = commands._HANDLERS["find"]

    def find_by_index(doc, ctx):  # FireWorks' look for a ready Firework, without checkout
        if isinstance(doc.get("filter"), dict):
            doc = {**doc, "filter": _or_to_in(doc["filter"])}
        return find(doc, ctx)

    commands._HANDLERS["find"] = find_by_index
    storage.Storage.update_matching = _by_id(storage.Storage.update_matching)
    storage.Storage.delete_matching = _by_id(storage.Storage.delete_matching)


def main() -> int:
    try:
        found = version("secantusdb")
    except PackageNotFoundError:
        found = None
    if found != PINNED:
        print(
            f"nequix_fw.secantus_atomic: SecantusDB {found or 'not installed'}: its atomic "
            f"findAndModify is made for and tested on {PINNED} only "
            f"(pip install 'secantusdb=={PINNED}'), so the server does not start",
            file=sys.stderr,
        )
        return 2
    patch()
    from secantus.cli import main as serve  # noqa: PLC0415 (after the patch)

    return serve()


if __name__ == "__main__":
    sys.exit(main())
