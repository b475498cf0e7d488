"""The campaign's report: the status table (`campaign-status`) and the progress plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from nequix_fw.diagnosis import NAMES
from nequix_fw.forgetting import summary_line
from nequix_fw.schemas.campaign import read_campaign_log
from nequix_fw.structures import atomic_path
from nequix_fw.uncertainty import collapse_warning


def status_lines(its: list[dict]) -> list[str]:
    """The status table of a campaign's iteration records: one row each (counts, errors,
    calibration, MD stability, method, note), and under it the forgetting check, what it
    explored with, the property errors, the stalls and the collapse alarm."""
    out = [
        "iter  candidates  selected  labelled  dataset  force RMSE  energy RMSE  calib.  "
        "MD stable  method       note",
        " " * 51 + "(eV/Å)   (meV/atom)  factor",
    ]

    def cell(value, spec: str = "") -> str:
        return "-" if value is None else format(value, spec)

    for it in its:
        val = it.get("validation") or {}
        out.append(
            f"{it['iteration']:>4}  {cell(it.get('n_candidates', it.get('n_evaluated'))):>10}  "
            f"{cell(it.get('n_selected')):>8}  {cell(it.get('n_labelled')):>8}  "
            f"{cell(it.get('dataset_size')):>7}  "
            f"{cell(val.get('force_rmse_eV_per_A'), '.4f'):>10}  "
            f"{cell(val.get('energy_rmse_meV_per_atom'), '.1f'):>11}  "
            f"{cell((it.get('calibration') or {}).get('conformal_factor'), '.2f'):>6}  "
            f"{cell(it.get('md_stable_fraction'), '.0%'):>9}  "
            f"{cell(it.get('selection_method')):<11}  {it.get('stop_reason') or ''}"
        )
        if it.get("forgetting"):
            out.append("      " + summary_line(it["forgetting"]))
        if it.get("explored_with"):
            out.append(f"      explored with {it['explored_with']}")
        props = {k: v for k, v in (it.get("properties") or {}).items() if v is not None}
        if props:
            out.append("      properties: " + ", ".join(f"{k} {v:+.3g}" for k, v in props.items()))
        out += ["      " + line for line in stall_lines(it)]
        warning = collapse_warning(
            it.get("uncertainty_error_ratio"), f"iteration {it['iteration']}'s validation"
        )
        if warning:
            out.append("      " + warning)
    return out


def stall_lines(record: dict) -> list[str]:
    """One line per property that stalled in an iteration's `record`: its errors over the
    iterations looked at, and the diagnosis."""
    return [
        f"{property_label(name, record)} stalled "
        f"({', '.join(f'{e:+.3g}' for e in rec['errors'])} over iterations "
        f"{rec['iterations'][0]}-{rec['iterations'][1]}): {rec['diagnosis']}"
        for name, rec in (record.get("stalled") or {}).items()
    ]


def property_label(name: str, record: dict) -> str:
    """How reports name a property tolerance: V0, B0, the worst elastic constant (C12), ..."""
    if name == "elastic_percent":
        return record.get("elastic_worst") or "elastic"
    return NAMES.get(name, name.removesuffix("_eV").replace("_", " "))


def plot_progress(directory: str | Path) -> Path:
    """`<directory>/campaign.png`: validation errors, dataset size and selections per
    iteration, from campaign.json."""
    directory = Path(directory)
    its = read_campaign_log(directory / "campaign.json")["iterations"]
    k = [it["iteration"] for it in its]
    val = [it.get("validation") or {} for it in its]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(k, [v.get("force_rmse_eV_per_A", np.nan) for v in val], "o-", label="forces")
    ax1.set(xlabel="iteration", ylabel="force RMSE (eV/Å)", title="validation (ensemble mean)")
    ax1b = ax1.twinx()
    ax1b.plot(k, [v.get("energy_rmse_meV_per_atom", np.nan) for v in val], "s--", color="C1")
    ax1b.set_ylabel("energy RMSE (meV/atom)", color="C1")
    ax2.bar(k, [it.get("dataset_size", 0) for it in its], color="C2", label="dataset size")
    ax2.plot(k, [it.get("n_selected", np.nan) for it in its], "o-", color="C3", label="selected")
    ax2.set(xlabel="iteration", ylabel="structures", title="data")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(k)
    path = directory / "campaign.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path
