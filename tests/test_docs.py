"""The documentation site: it builds strict (`mkdocs build --strict`, as `make docs`), its
generated reference lists every setting, flag, document and collection of the code, no
internal link is broken, the first tutorial runs end to end as written (shorter), and the
pages render in headless Chromium."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import matplotlib.image
import numpy as np
import pytest
import yaml
from pydantic import BaseModel

from nequix_fw import schemas, settings, store
from nequix_fw.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    p = subprocess.run(
        [BIN / "mkdocs", "build", "--strict", "--site-dir", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text()


def _classes(cls: type[BaseModel]) -> list[type[BaseModel]]:
    """`cls` and the settings classes nested in its fields, depth first."""

    def nested(annotation) -> list:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [c for a in typing.get_args(annotation) for c in nested(a)]

    out = [cls]
    for info in cls.model_fields.values():
        for c in nested(info.annotation):
            out += [x for x in _classes(c) if x not in out]
    return out


def _text(html: str) -> str:
    """The text of a page: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(unescape(re.sub(r"<[^>]+>", "", html)).split())


def test_the_reference_lists_every_setting(site):
    html = page(site, "reference/settings")
    text = _text(html)
    for section, cls in settings.SECTIONS.items():
        assert f'id="{section}"' in html, section
        for c in _classes(cls):
            for name, info in c.model_fields.items():
                assert f"<code>{info.alias or name}</code>" in html, (c.__name__, name)
                assert info.description, f"{c.__name__}.{name}: no description"
                words = " ".join(info.description.replace("`", "").split()[:6])
                assert words in text, (name, words)  # the description, not only the name


def _commands(parser) -> dict:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub)
                out.update({f"{name} {k}": v for k, v in nested.items()} or {name: sub})
    return out


def test_the_reference_lists_every_command_and_flag(site):
    html = page(site, "reference/cli")
    commands = _commands(build_parser())
    assert {"select", "label", "campaign", "campaign-status", "db", "export"} <= set(commands)
    for name, sub in commands.items():
        anchor = f'<h2 id="nequix-fw-{name.replace(" ", "-")}"'
        assert anchor in html, name
        section = html.split(anchor, 1)[1].split("<h2", 1)[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"nequix-fw {name} {action.option_strings}: no help"
            for option in action.option_strings or [action.dest]:  # flags, or a positional
                assert f"<code>{option}</code>" in section, (name, option)
            if action.choices:  # e.g. db's start, status, stop
                assert all(str(c) in section for c in action.choices), (name, action.dest)


def test_the_reference_lists_every_document_and_collection(site):
    html = page(site, "reference/schemas")
    for name in store.COLLECTIONS:
        assert f"<code>{name}</code>" in html, name
    assert set(store.COLLECTIONS) >= set(store.INDEXES)
    for name in schemas.__all__:
        cls = getattr(schemas, name)
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            assert f"<code>{name}</code>" in html, name
            for field, info in cls.model_fields.items():
                assert f"<code>{info.alias or field}</code>" in html, (name, field)
    api = page(site, "reference/api")
    for name in (
        "evaluation.run_ensemble",
        "dataset.update_dataset",
        "workflows.campaign_workflow",
        "ensemble.EnsembleCalculator",
    ):
        assert f'id="nequix_fw.{name}"' in api, name  # from the docstrings


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("href", "src"):
            if attrs.get(key):
                self.links.append(attrs[key])


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(errors="replace"))
    return parser


def test_no_internal_link_is_broken(site):
    pages = {p: _parse(p) for p in site.rglob("*.html") if p.name != "404.html"}  # absolute
    assert len(pages) > 25
    broken = []
    for path, parsed in pages.items():
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "javascript:")):
                continue
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{path.relative_to(site)}: {link}")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{path.relative_to(site)}: {link} (no such anchor)")
    assert not broken, broken[:20]


# -- the first tutorial, end to end -----------------------------------------------------------

FENCE = re.compile(r'^```(\w+)(?: title="([^"]+)")?\n(.*?)^```', re.S | re.M)
#: Shorter than the tutorial: one iteration, fewer epochs and MD steps (members trained for
#: 3 epochs barely differ, so every candidate counts as uncertain: lo 0).
SHORTER = {
    "campaign": {"max_iterations": 1},
    "explore": {"steps": 40, "sample_every": 20, "n_distortions": 2},
    "select": {"lo": 0.0},
    "train_ensemble": {"epochs": 3},
}


def test_the_first_campaign_tutorial_runs_end_to_end(tmp_path):
    """Its files written as titled, its commands run in order through bash, with `SHORTER`
    settings: the campaign labels, explores, selects, grows its MongoDB dataset, validates
    against EMT and reports, and the server stops."""
    text = (ROOT / "docs" / "tutorials" / "first-campaign.md").read_text()
    blocks = FENCE.findall(text)
    titled = {title: body for _, title, body in blocks if title}
    assert set(titled) == {"make_structures.py", "campaign.yaml"}
    config = yaml.safe_load(titled.pop("campaign.yaml"))
    for section, values in SHORTER.items():
        config[section].update(values)
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(config))
    for name, body in titled.items():
        (tmp_path / name).write_text(body)
    commands = [
        line
        for lang, _, body in blocks
        if lang == "bash"
        for line in body.replace("\\\n", " ").splitlines()
        if line.strip()
    ]
    assert commands[0].startswith("nequix-fw db start") and commands[-1].startswith("nequix-fw db")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "JAX_PLATFORMS": "cpu"}
    # the structures: the page says to run the script it shows; before the server stops, the
    # query how-to's script reads the campaign's database
    assert "make_structures.py" in text
    query = FENCE.findall((ROOT / "docs" / "how-to" / "query-mongodb.md").read_text())
    (tmp_path / "query.py").write_text(next(body for _, title, body in query if title))
    outputs = []
    try:
        for command in [
            "python make_structures.py",
            *commands[:-1],
            "python query.py",
            *commands[-1:],
        ]:
            p = subprocess.run(
                command,
                shell=True,
                executable="/bin/bash",
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert p.returncode == 0, (command, p.stdout[-1500:], p.stderr[-3000:])
            outputs.append(p.stdout)
    finally:
        if (tmp_path / "db" / "server.pid").exists():
            subprocess.run([BIN / "nequix-fw", "db", "stop", "--dir", tmp_path / "db"], env=env)
    log = json.loads((tmp_path / "campaign" / "campaign.json").read_text())
    its = {it["iteration"]: it for it in log["iterations"]}
    assert set(its) == {0, 1}
    assert its[0]["n_labelled"] == 8 and its[1]["n_selected"] == 8  # max_selected
    assert its[1]["dataset_size"] == 8 + its[1]["n_labelled"] == 16
    assert its[1]["stop_reason"] == "max_iterations (1) reached"
    assert {"v0_percent", "bulk_modulus_percent"} <= set(its[1]["properties"])
    status = outputs[commands.index("nequix-fw campaign-status campaign") + 1]
    added, *curve = outputs[-2].splitlines()[:3]  # query.py: count, then one line per iteration
    assert int(added) == its[1]["n_added"]
    assert [line.split()[:2] for line in curve] == [["0", "8"], ["1", "16"]]
    assert "campaign agpd (from MongoDB" in status and "max_iterations (1) reached" in status
    validate = tmp_path / "campaign" / "iter_001" / "validate"
    report = json.loads((validate / "validation.json").read_text())
    assert report["ensemble_mean"]["forces_eV_per_A"]["rmse"] > 0
    assert report["physics"]["ev_reference"]["v0"] > 0  # EMT's own E-V curve
    assert (validate / "validation_parity.png").is_file()
    assert "stopped" in outputs[-1] and not (tmp_path / "db" / "server.pid").exists()


# -- looked at as a reader would --------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = {
    "index.html": ["Where to go", "Your first campaign"],
    "tutorials/first-campaign/index.html": ["make_structures.py", "rlaunch", "campaign-status"],
    "reference/settings/index.html": ["max_selected", "temperatures_K", "property_tolerances"],
}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make sysdeps)")
@pytest.mark.parametrize("name", list(SHOTS))
def test_pages_render_in_headless_chromium(site, name, tmp_path):
    """A screenshot of the page shows rendered content (the theme's header and navigation,
    text), and the DOM after scripts ran holds the page's own content."""
    url = (site / name).as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "page.png"
    p = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1280,1400", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[:2] == (1400, 1280)
    header = img[:40].reshape(-1, 3)  # material's coloured header bar
    assert np.mean(np.abs(header - header.mean(axis=0)).sum(axis=1) < 0.1) > 0.5
    assert header.mean() < 0.8  # coloured, not white
    body = img[100:].reshape(-1, 3)
    ink = np.mean(body.mean(axis=1) < 0.6)  # text: dark pixels on white
    assert 0.005 < ink < 0.5, ink
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    assert 'class="md-header' in dom and 'class="md-nav' in dom
    for text in SHOTS[name]:
        assert text in dom, text
