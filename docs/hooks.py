"""mkdocs hook: a page's ``<!-- reference: NAME -->`` becomes the reference generated from the
code by `gen_reference.GENERATORS[NAME]`; links from benchmarks/README.md into ``../docs/``
(included in benchmarks.md) point into the site."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from gen_reference import GENERATORS  # noqa: E402 (the docs directory, put on the path above)

MARKER = re.compile(r"<!-- reference: (\w+) -->")
BENCHMARKS = '--8<-- "benchmarks/README.md"'  # benchmarks.md's include


def _generate(match: re.Match) -> str:
    name = match.group(1)
    if name not in GENERATORS:
        raise KeyError(f"no reference generator {name!r}; known: {sorted(GENERATORS)}")
    return GENERATORS[name]()


def on_page_markdown(markdown: str, page=None, **_) -> str:
    if page is not None and page.file.src_uri == "benchmarks.md":  # before the snippets
        readme = (Path(__file__).parents[1] / "benchmarks" / "README.md").read_text()
        markdown = markdown.replace(BENCHMARKS, readme.replace("](../docs/", "]("))
    return MARKER.sub(_generate, markdown)
