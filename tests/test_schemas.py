"""The stages' documents (`nequix_fw.schemas`): what the stages write reads back as its model;
a file that is another document, or a damaged one, gets one error naming the file."""

import json

import ase.io
import pytest
from helpers import make_cells

from nequix_fw.labelling import label_structures, make_backend
from nequix_fw.schemas import (
    DocumentError,
    ExplorationManifest,
    LabelTaskDoc,
    SelectionManifest,
    ValidationReport,
)
from nequix_fw.settings import LabellingSettings


def test_a_label_task_reads_back_and_other_documents_are_refused(tmp_path):
    ase.io.write(tmp_path / "s.extxyz", make_cells(2, seed=4))
    s = LabellingSettings()
    summary = label_structures(
        tmp_path / "s.extxyz", tmp_path / "labels", make_backend(s), s, iteration=3, progress=False
    )
    task = tmp_path / "labels" / summary["structure_ids"][0] / "task.json"
    doc = LabelTaskDoc.from_file(task)
    raw = json.loads(task.read_text())
    assert raw["schema"] == "nequix-fw/label-task" and raw["schema_version"] == 1
    assert (doc.status, doc.iteration, doc.backend) == ("success", 3, "ase")
    assert doc.labelled_file == "labelled.extxyz" and doc.to_dict() == raw
    with pytest.raises(
        DocumentError,
        match=f"{task}: not a nequix-fw/selection document "
        "\\(schema 'nequix-fw/label-task' version 1 is not",
    ):
        SelectionManifest.from_file(task)
    raw.pop("settings_hash")
    task.write_text(json.dumps(raw))
    with pytest.raises(
        DocumentError,
        match="not a nequix-fw/label-task document \\(settings_hash: Field required\\)",
    ):
        LabelTaskDoc.from_file(task)
    task.write_text("{truncated")
    with pytest.raises(DocumentError, match=f"{task}: cannot read"):
        LabelTaskDoc.from_file(task)


def test_documents_carry_their_name_version_and_only_their_fields(tmp_path):
    doc = ExplorationManifest(settings={"steps": 10}, trajectories=[], frames=[{"id": "a"}])
    path = doc.to_file(tmp_path / "manifest.json")
    assert list(json.loads(path.read_text()))[:3] == [
        "schema",
        "schema_version",
        "nequix_fw_version",
    ]
    assert ExplorationManifest.from_file(path) == doc
    with pytest.raises(DocumentError, match="frame_count: Extra inputs are not permitted"):
        ExplorationManifest.check({**doc.to_dict(), "frame_count": 1}, "x.json")
    with pytest.raises(DocumentError, match="version 2 is not 'nequix-fw/exploration' version 1"):
        ExplorationManifest.check({**doc.to_dict(), "schema_version": 2}, "x.json")
    # optional sections of a validation report are left out, not written as null
    report = ValidationReport(models=[], n_structures=1, per_model={}, ensemble_mean={})
    assert "physics" not in report.to_dict() and "md_stability" not in report.to_dict()
    # a list of objects is written one item per line, as it goes, and reads back the same
    frames = [{"id": f"s{i}", "x": [i, 0.5]} for i in range(3)]
    path = ExplorationManifest(settings={}, trajectories=[], frames=frames).to_file(path)
    lines = path.read_text().splitlines()
    assert [json.loads(ln.strip().rstrip(",")) for ln in lines if '"id"' in ln] == frames
    assert ExplorationManifest.from_file(path).frames == frames


def test_the_campaign_record_is_checked_when_written_and_a_bad_entry_writes_nothing(tmp_path):
    """`CampaignLog.record` checks the iteration against `IterationRecord` before writing:
    a wrong type is refused with the field named, and campaign.json keeps what it held."""
    from nequix_fw.campaign import CampaignLog

    log = CampaignLog(tmp_path / "run", "c")
    log.record(1, n_selected=3, properties={"v0_percent": 0.2})
    before = (tmp_path / "run" / "campaign.json").read_text()
    with pytest.raises(DocumentError, match="iteration 1: n_selected: .*got 'many'"):
        log.record(1, n_selected="many")
    with pytest.raises(DocumentError, match="iteration 2: properties.v0_percent"):
        log.record(2, properties={"v0_percent": "small"})
    assert (tmp_path / "run" / "campaign.json").read_text() == before
    assert log.iteration_record(1) == {
        "iteration": 1,
        "n_selected": 3,
        "properties": {"v0_percent": 0.2},
    }
