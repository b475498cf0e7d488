"""Powerups, as atomate users know them: functions that modify a campaign's workflow before
`lpad add`. Each changes the Fireworks of the given stages now *and* the campaign's
`resources` (or sections) that its growing tasks carry, so that the Fireworks the campaign
appends later (its next iterations) get the same.

    wf = campaign_workflow(campaign_sections("campaign.yaml"))
    wf = add_priority(wf, 10)
    wf = set_queueadapter(wf, {"walltime": "12:00:00", "nodes": 4}, stages=["label"])
"""

from __future__ import annotations

from collections.abc import Iterable

from fireworks import Workflow

from nequix_fw.errors import SettingsError
from nequix_fw.settings import STAGES, FireworkResources, LabellingSettings, make_settings


def _stage(fw_name: str) -> str:
    return fw_name.split()[-2]


def _sections(wf: Workflow) -> list[dict]:
    """The campaign's settings sections in the growing tasks (each one's own copy, or a shared
    one)."""
    found, seen = [], set()
    for fw in wf.fws:
        for task in fw.tasks:
            sections = task.get("sections")
            if sections is not None and id(sections) not in seen:
                seen.add(id(sections))
                found.append(sections)
    return found


def _set_resources(wf: Workflow, stages: Iterable[str] | None, **values) -> Workflow:
    """Set `values` (FireworkResources fields) for `stages` (default: all) in the Fireworks'
    specs and in the campaign's resources."""
    chosen = list(STAGES if stages is None else stages)
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise SettingsError(f"unknown stages {unknown}; the stages are {list(STAGES)}")
    for sections in _sections(wf):
        resources = sections.setdefault("campaign", {}).setdefault("resources", {})
        for stage in chosen:
            old = resources.get(stage, {})
            entry = {**old, **values}
            if "queueadapter" in values:  # new keys over the stage's own
                entry["queueadapter"] = {**old.get("queueadapter", {}), **values["queueadapter"]}
            make_settings(FireworkResources, **entry)  # valid before anything changes
            resources[stage] = entry
    for fw in wf.fws:
        if _stage(fw.name) in chosen:
            spec = FireworkResources(**values).spec()
            if "_queueadapter" in spec:
                spec["_queueadapter"] = {
                    **fw.spec.get("_queueadapter", {}),
                    **spec["_queueadapter"],
                }
            fw.spec.update(spec)
    return wf


def add_priority(wf: Workflow, priority: int, stages: Iterable[str] | None = None) -> Workflow:
    """FireWorks `_priority` of the stages' Fireworks (default: all): higher runs first."""
    return _set_resources(wf, stages, priority=priority)


def set_category(wf: Workflow, category: str, stages: Iterable[str] | None = None) -> Workflow:
    """FireWorks `_category`: only workers of this category (my_fworker.yaml) run them."""
    return _set_resources(wf, stages, category=category)


def set_fworker(wf: Workflow, fworker: str, stages: Iterable[str] | None = None) -> Workflow:
    """FireWorks `_fworker`: only the worker of this name runs them."""
    return _set_resources(wf, stages, fworker=fworker)


def set_queueadapter(
    wf: Workflow, queueadapter: dict, stages: Iterable[str] | None = None
) -> Workflow:
    """FireWorks `_queueadapter` keys (walltime, nodes, ...), over the stages' own: what
    `qlaunch -r` asks the queue for."""
    return _set_resources(wf, stages, queueadapter=queueadapter)


def use_stand_in_labels(wf: Workflow, calculator: str = "emt", **params) -> Workflow:
    """Label with an ASE calculator (default EMT) instead of the campaign's DFT backend: a test
    run of a VASP or CP2K campaign's whole workflow, cheaply (atomate's `use_fake_vasp`)."""
    labelling = {"backend": "ase", "calculator": calculator, "calculator_params": params}
    make_settings(LabellingSettings, **labelling)
    for fw in wf.fws:
        for task in fw.tasks:
            if "label" in task:  # a LabelTask's own section
                task["label"] = dict(labelling)
    for sections in _sections(wf):
        sections["label"] = dict(labelling)
        for entry in sections.get("campaign", {}).get("schedule", {}).values():
            entry.pop("label", None)  # no scheduled change of the level of theory either
    return wf
