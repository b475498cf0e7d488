"""The documents the stages write, as pydantic models: their fields, types and units in one
place, checked when written and when read back. Each carries ``schema`` (its name),
``schema_version`` and ``nequix_fw_version``; files are plain JSON, indented, with one line per
item of a top-level list (`Document.to_file`, `Document.from_file`: the standard library's C
encoder and decoder, as monty's `dumpfn` with an indent goes through the pure-Python one, 4 s
for a selection manifest of 10^5 structures).

| document | file (`<output>`: the command's; in a campaign, iter_k/<stage>/) | written by |
| --- | --- | --- |
| `EnsembleResultsHeader` | ensemble_results.json (its header; records follow) | run-ensemble |
| `ExplorationManifest` | <output>/manifest.json | explore |
| `SelectionManifest` | <output>/manifest.json | select |
| `LabelTaskDoc` | <output>/<structure id>/task.json | label |
| `ValidationReport` | validation.json | validate |
| (`read_campaign_log`) | <campaign directory>/campaign.json | the campaign's stages |
"""

from nequix_fw.schemas.base import Document, DocumentError
from nequix_fw.schemas.exploration import ExplorationManifest
from nequix_fw.schemas.label_task import LabelTaskDoc
from nequix_fw.schemas.results import EnsembleResultsHeader
from nequix_fw.schemas.selection import SelectionCounts, SelectionManifest
from nequix_fw.schemas.validation import ValidationReport

__all__ = [
    "Document",
    "DocumentError",
    "EnsembleResultsHeader",
    "ExplorationManifest",
    "LabelTaskDoc",
    "SelectionCounts",
    "SelectionManifest",
    "ValidationReport",
]
