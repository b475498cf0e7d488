"""A campaign's settings with their overlays (the schedule, the exploration phase, the
system) and its directory layout: where each iteration's stages write, the ensemble in use."""

from __future__ import annotations

from pathlib import Path

from pymongo.database import Database

from nequix_fw.campaign.log import CampaignLog
from nequix_fw.errors import ModelError
from nequix_fw.settings import (
    CampaignSettings,
    Stage,
    SystemSettings,
    check_sections,
    section_name,
    section_settings,
)
from nequix_fw.store import CampaignStore, Store


class Campaign:
    """A campaign's settings (raw sections, as its growing FireTasks carry them), its layout and
    its log: what the workflow's builders resolve each stage's inputs from."""

    def __init__(self, sections: dict, db: Database | None = None, env: dict | None = None):
        """`env`: the FireWorks worker's env, which fills ``>>key<<`` values in any section
        (None: they are left out, as when a workflow is built)."""
        self.sections = check_sections(sections, "campaign settings")
        self.env = env
        self.settings: CampaignSettings = self.section(CampaignSettings)
        self.directory = Path(self.settings.directory)
        self.log = CampaignLog(self.directory, self.settings.name, db, self.settings.launchpad)

    def section_values(
        self, name: str, k: int | None = None, system: SystemSettings | None = None
    ) -> dict:
        """The values of section `name` as given (``>>key<<`` placeholders kept): at iteration
        `k` with the schedule's entries up to k (and its exploration phase's), and for
        `system` with its own."""
        values = dict(self.sections.get(name, {}))
        if k is not None:
            for start in sorted(self.settings.schedule):
                if start <= k:
                    values.update(self.settings.schedule[start].get(name, {}))
            phase = self.phase(k, system)
            if phase is not None:
                values.update(self.settings.phases[phase].settings.get(name, {}))
        if system is not None:
            values.update(system.settings.get(name, {}))
            if name == "select" and system.max_selected is not None:
                values["max_selected"] = system.max_selected
        return values

    def section(self, cls, k: int | None = None, system: SystemSettings | None = None):
        """Settings of section `cls` (see `section_values`), placeholders filled from the
        worker's env."""
        return section_settings(cls, self.section_values(section_name(cls), k, system), self.env)

    def systems_at(self, k: int) -> list[SystemSettings | None]:
        """The systems explored at iteration k: those not converged before it ([None]: a
        campaign of one system)."""
        if not self.settings.systems:
            return [None]
        done = set()
        for it in self.log.read()["iterations"]:
            if it["iteration"] < k:
                done |= {n for n, rec in (it.get("systems") or {}).items() if rec.get("converged")}
        return [system for system in self.settings.systems if system.name not in done]

    def stage_dir(self, k: int, stage: Stage, system: SystemSettings | None = None) -> Path:
        """Where iteration k's `stage` writes (<stage>/<system>/ for a system's own part)."""
        d = self.iter_dir(k) / stage
        return d if system is None else d / system.name

    def results_file(self, k: int, system: SystemSettings | None) -> Path:
        name = "ensemble_results" + ("" if system is None else f"_{system.name}")
        return self.stage_dir(k, "run_ensemble") / f"{name}.json"

    def phase(self, k: int, system: SystemSettings | None = None) -> int | None:
        """Index of iteration k's exploration phase in `campaign.phases` (None without phases,
        and at iteration 0, which labels the initial structures): each iteration that converged
        its phase moves the next one to the following phase. With systems, each system goes
        through the phases on its own (None without a system)."""
        if k < 1 or not self.settings.phases or (self.settings.systems and system is None):
            return None
        phase = 0
        for it in self.log.read()["iterations"]:
            rec = it if system is None else (it.get("systems") or {}).get(system.name, {})
            if 1 <= it["iteration"] < k and rec.get("stage_converged"):
                phase += 1
        return min(phase, len(self.settings.phases) - 1)

    def phase_name(self, phase: int) -> str:
        return self.settings.phases[phase].name or str(phase)

    @property
    def launchpad(self) -> Database | Path | None:
        """Where the store is: the running LaunchPad's database, else the LaunchPad file."""
        return self.log.launchpad

    @property
    def dataset(self) -> str:
        """The training set: `campaign.dataset`, else the store dataset db:<name> (a campaign
        runs from a LaunchPad, whose database holds it)."""
        return self.settings.dataset or f"db:{self.settings.name}"

    @property
    def store(self) -> CampaignStore | None:
        return self.log.store

    @property
    def datasets(self) -> Store:
        return self.log.datasets

    def iter_dir(self, k: int) -> Path:
        return iteration_dir(self.directory, k)

    def models(self, k: int) -> list[str]:
        return member_files(self.models_dir(k))

    def models_dir(self, k: int) -> Path:
        return models_dir(self.directory, k)

    def record(self, k: int, **entries) -> dict:
        return self.log.record(k, **entries)

    def iteration_record(self, k: int) -> dict:
        return self.log.iteration_record(k)


def iteration_dir(directory: str | Path, k: int) -> Path:
    """Where iteration k of the campaign in `directory` writes."""
    return Path(directory) / f"iter_{k:03d}"


def models_dir(directory: str | Path, k: int) -> Path:
    """The ensemble in use after iteration k of the campaign in `directory`: its own, or, when
    it trained none (a phase that converged without selecting), that of the last iteration
    before it that did."""
    for j in range(k, -1, -1):
        trained = iteration_dir(directory, j) / "train_ensemble"
        if any(trained.glob("member_*.nqx")):
            return trained
    return iteration_dir(directory, k) / "train_ensemble"


def member_files(models_dir: str | Path) -> list[str]:
    """The trained members (member_*.nqx) of an ensemble directory."""
    paths = sorted(Path(models_dir).glob("member_*.nqx"))
    if not paths:
        raise ModelError(f"{models_dir}: no trained members (member_*.nqx)")
    return [str(p) for p in paths]
