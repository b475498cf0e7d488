"""The campaign record, ``<campaign directory>/campaign.json``: the campaign's name and one
record per iteration (counts, metrics, decisions), written by `nequix_fw.campaign.CampaignLog`
and mirrored in the store."""

from __future__ import annotations

import json
from pathlib import Path

from nequix_fw.schemas.base import DocumentError


def read_campaign_log(path: str | Path) -> dict:
    """A campaign record (campaign.json), checked: one line naming the file when it is missing
    or damaged."""
    path = Path(path)
    if not path.is_file():
        raise DocumentError(f"{path}: no campaign record (has iteration 0 run?)")
    try:
        log = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DocumentError(
            f"{path}: a damaged campaign record (not JSON: {exc}); its iterations are also in "
            "the store (collection nequix_fw_iterations)"
        ) from None
    if not (isinstance(log, dict) and isinstance(log.get("iterations"), list) and "name" in log):
        raise DocumentError(f"{path}: not a campaign record (no name and iterations)")
    return log
