"""The campaign's log: one record per iteration in <directory>/campaign.json and, with a
database, in the store."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pymongo.database import Database

from nequix_fw.schemas.campaign import check_iterations, read_campaign_log
from nequix_fw.store import CampaignStore, Store
from nequix_fw.structures import atomic_path

logger = logging.getLogger(__name__)


class CampaignLog:
    """Where a campaign's stages report: one record per iteration in <directory>/campaign.json
    and, with a database, in the store of campaign `name`."""

    def __init__(
        self,
        directory: str | Path,
        name: str,
        db: Database | None = None,
        launchpad: str | Path | None = None,
    ):
        """`db`: the database of the LaunchPad running a FireTask; `launchpad`: the LaunchPad
        file (the store's database when there is no `db`; its path goes into campaign.json)."""
        self.directory = Path(directory)
        self.name = name
        self.launchpad_file = None if launchpad is None else Path(launchpad)
        self.launchpad: Database | Path | None = db if db is not None else self.launchpad_file
        self._store: CampaignStore | None = None

    @property
    def store(self) -> CampaignStore | None:
        """Where the campaign's records go besides its directory (None without a database)."""
        if self.launchpad is None:
            return None
        if self._store is None:
            self._store = CampaignStore(self.launchpad, self.name)
        return self._store

    @property
    def datasets(self) -> Store:
        """The store of the ``db:NAME`` datasets, as the stages get it."""
        return Store(self.launchpad)

    def record(self, k: int, **entries) -> dict:
        """Merge `entries` into iteration k's record of campaign.json (written atomically) and
        of the store's iterations."""
        log = self.read()
        if self.launchpad_file is not None:  # the file's path, never its contents
            log["launchpad"] = str(self.launchpad_file)
        its = {it["iteration"]: it for it in log["iterations"]}
        its.setdefault(k, {"iteration": k}).update(entries)
        # checked before it is written: a wrong type never reaches the file or the store
        check_iterations([json.loads(json.dumps(its[k], default=str))], "the campaign record")
        log["iterations"] = [its[i] for i in sorted(its)]
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.directory / "campaign.json") as tmp:
            tmp.write_text(json.dumps(log, indent=1, default=str))
        if self.store is not None:
            self.store.save_iteration(k, its[k])
        summary = ", ".join(f"{key}={value}" for key, value in entries.items())
        logger.info("campaign %s iteration %d: %s", self.name, k, summary)
        return its[k]

    def iteration_record(self, k: int) -> dict:
        """Iteration k's record in campaign.json ({} if it has none yet)."""
        return next((it for it in self.read()["iterations"] if it["iteration"] == k), {})

    def read(self) -> dict:
        """campaign.json (an empty record before the first stage reported)."""
        path = self.directory / "campaign.json"
        if path.is_file():
            return read_campaign_log(path)
        return {"name": self.name, "iterations": []}
