"""The powerups (`nequix_fw.powerups`) on a built campaign workflow."""

import shutil
from pathlib import Path

import pytest
from fireworks import Workflow
from helpers import preset_inputs

from nequix_fw.campaign import Campaign
from nequix_fw.errors import SettingsError
from nequix_fw.labelling import make_backend
from nequix_fw.powerups import (
    add_priority,
    set_category,
    set_fworker,
    set_queueadapter,
    use_stand_in_labels,
)
from nequix_fw.settings import LabellingSettings
from nequix_fw.workflows import (
    campaign_sections,
    campaign_workflow,
    exploration_workflow,
    labelling_workflow,
)

ROOT = Path(__file__).resolve().parents[1]


def test_powerups_change_the_fireworks_now_and_those_appended_later(tmp_path, monkeypatch):
    """add_priority / set_category / set_queueadapter / set_fworker change the matching
    Fireworks' specs and the campaign's resources in every task, so that the iterations the
    workflow appends later carry them too; use_stand_in_labels makes a VASP campaign label
    with EMT (its schedule cannot switch back)."""

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "workflows" / "vasp_mpstatic.yaml", "c.yaml")
    preset_inputs(tmp_path, "Cu")
    wf = campaign_workflow(campaign_sections("c.yaml", tmp_path / "my_launchpad.yaml"))
    wf = add_priority(wf, 7)
    wf = set_category(wf, "fast", stages=["train_ensemble"])
    wf = set_queueadapter(wf, {"walltime": "02:00:00", "nodes": 2}, stages=["label"])
    wf = set_fworker(wf, "big", stages=["validate"])
    wf = use_stand_in_labels(wf)
    wf = Workflow.from_dict(wf.to_dict())  # as lpad add stores it
    specs = {fw.name.split()[-2]: fw.spec for fw in wf.fws}
    assert {s["_priority"] for s in specs.values()} == {7}
    assert specs["train_ensemble"]["_category"] == "fast"
    assert "_category" not in specs["update_dataset"]
    assert specs["label"]["_queueadapter"]["walltime"] == "02:00:00"
    assert specs["label"]["_queueadapter"]["nodes"] == 2
    assert specs["label"]["_queueadapter"]["ntasks"] == 64  # the preset's other keys kept
    assert specs["validate"]["_fworker"] == "big"
    sections = next(t["sections"] for fw in wf.fws for t in fw.tasks if "sections" in t)
    assert all(
        t["label"]["backend"] == "ase" for fw in wf.fws for t in fw.tasks if "label" in t
    )  # the label tasks' own sections too
    c = Campaign(sections)
    later = [*exploration_workflow(c, 1).fws, *labelling_workflow(c, 1, 3).fws]
    later_specs = {fw.name.split()[-2]: fw.spec for fw in later}
    assert set(later_specs) == {
        "explore",
        "run_ensemble",
        "select",
        "label",
        "update_dataset",
        "train_ensemble",
        "validate",
    }
    assert {s["_priority"] for s in later_specs.values()} == {7}
    assert later_specs["train_ensemble"]["_category"] == "fast"
    assert later_specs["label"]["_queueadapter"]["walltime"] == "02:00:00"
    backend = make_backend(c.section(LabellingSettings, 3))
    assert backend.name == "ase" and backend.calculator == "emt"
    with pytest.raises(SettingsError, match="unknown stages \\['training'\\]"):
        add_priority(wf, 1, stages=["training"])
