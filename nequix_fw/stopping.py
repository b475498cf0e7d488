"""When a campaign goes on and when it stops: the decisions after each selection (label what
was selected, move to the next exploration phase, or stop) and after each validation (the
next iteration, or a stopping rule: max_iterations, target errors, MD stability, property
tolerances, every system or the last phase converged).

The exploration phases are the campaign file's `campaign.phases` (dpgen2's name for them); the
seven pipeline steps are the stages of `nequix_fw.campaign`.
"""

from __future__ import annotations

from nequix_fw.campaign import Campaign
from nequix_fw.campaign.report import property_label, stall_lines
from nequix_fw.settings import SystemSettings


def selection_decision(c: Campaign, k: int, record: dict) -> tuple[str | None, bool]:
    """After iteration k's selection: (why the campaign stops or None, whether to label).
    With exploration phases (`campaign.phases`), a phase whose accurate fraction is reached,
    or that selected fewer than `min_selected`, has converged: the next iteration explores in
    the next phase (after labelling what was selected, if enough was), and the last phase's
    convergence stops the campaign."""
    if c.settings.systems:
        return _systems_decision(c, k, record)
    phase = c.phase(k)
    if phase is None:
        return selection_stop(c, k, record), True
    n = record["n_selected"]
    why = _converged(
        record["selection"], n, c.settings.phases[phase].accurate_fraction, c.settings.min_selected
    )
    c.record(k, stage=phase, stage_converged=why)
    if why is None:
        return None, True
    if phase == len(c.settings.phases) - 1:
        return f"converged: last phase {c.phase_name(phase)}: {why}", False
    return None, n >= c.settings.min_selected


def _systems_decision(c: Campaign, k: int, record: dict) -> tuple[str | None, bool]:
    """Each system explored at k converges on its own (accurate fraction, or fewer than
    min_selected selected) and is no longer explored; the campaign stops when all have. With
    phases, each system goes through them on its own: converging a phase moves the system to
    the next, and converging the last ends it."""
    systems = record["systems"]
    for system in c.systems_at(k):
        rec = systems[system.name]
        phase = c.phase(k, system)
        if phase is None:
            target = system.accurate_fraction or c.settings.accurate_fraction
        else:
            target = c.settings.phases[phase].accurate_fraction
        why = _converged(rec["selection"], rec["n_selected"], target, c.settings.min_selected)
        if phase is None:
            rec["converged"] = why
            continue
        rec.update(stage=phase, stage_converged=why, converged=None)
        if why and phase == len(c.settings.phases) - 1:
            rec["converged"] = f"last phase {c.phase_name(phase)}: {why}"
    c.record(k, systems=systems)
    return _every_system_converged(systems), record["n_selected"] > 0


def _every_system_converged(systems: dict) -> str | None:
    """The stop reason once every system explored in an iteration (its `systems` records) has
    converged: the others converged before."""
    if not systems or not all(rec.get("converged") for rec in systems.values()):
        return None
    why = "; ".join(f"{name}: {rec['converged']}" for name, rec in systems.items())
    return f"converged: every system ({why})"


def _converged(
    counts: dict, n_selected: int, accurate_fraction: float | None, min_selected: int
) -> str | None:
    """Why a selection (its class `counts`) shows convergence: at least `accurate_fraction` of
    the candidates accurate (DP-GEN's measure), or fewer than `min_selected` selected."""
    n_candidates = counts["accurate"] + counts["candidate"] + counts["failed"]
    if accurate_fraction is not None and n_candidates:
        if counts["accurate"] / n_candidates >= accurate_fraction:
            return (
                f"{counts['accurate']} of {n_candidates} candidates accurate "
                f"(>= {accurate_fraction:.0%})"
            )
    if n_selected < min_selected:
        return f"{n_selected} selected (< {min_selected})"
    return None


def selection_stop(c: Campaign, k: int, record: dict) -> str | None:
    """Why the campaign stops after iteration k's selection (None: label and train). A
    selection that shows convergence while the last validation missed a property tolerance
    stops the campaign (nothing is left to label) without calling it converged."""
    why = _converged(
        record["selection"],
        record["n_selected"],
        c.settings.accurate_fraction,
        c.settings.min_selected,
    )
    if not why:
        return None
    unmet = _unmet_tolerances(c, k - 1)
    if unmet:
        return f"stopped: {why}, but not converged: iteration {k - 1} missed {unmet}"
    return f"converged: {why}"


def _unmet_tolerances(c: Campaign, k: int) -> str:
    """The `property_tolerances` that iteration k's validation missed, with its errors ('' when
    all hold, or none are set)."""
    errors = c.iteration_record(k).get("properties") or {}
    return ", ".join(
        f"{name} {'not computed' if err is None else f'{err:+.3g}'} (tolerance {tolerance})"
        for name, tolerance in c.settings.property_tolerances.items()
        if not _within((err := errors.get(name)), tolerance)
    )


def _within(err: float | None, tolerance: float) -> bool:
    """Whether a property's recorded error meets its tolerance (a missing one does not)."""
    return err is not None and abs(err) <= tolerance


def iteration_stop(c: Campaign, k: int, record: dict) -> str | None:
    """Why the campaign stops after iteration k's validation (None: go on to k + 1)."""
    s = c.settings
    rmse = (record.get("validation") or {}).get("force_rmse_eV_per_A")
    stable = record.get("md_stable_fraction")
    met = []  # every target given must hold: what holds, or False
    if s.target_force_rmse is not None:
        ok = rmse is not None and rmse <= s.target_force_rmse
        met.append(ok and f"validation force RMSE {rmse:.4f} <= {s.target_force_rmse} eV/Å")
    if s.md_stable_fraction is not None:
        ok = stable is not None and stable >= s.md_stable_fraction
        met.append(ok and f"{stable:.0%} of MD runs stable (>= {s.md_stable_fraction:.0%})")
    errors = record.get("properties") or {}
    for name, tolerance in s.property_tolerances.items():
        err = errors.get(name)
        met.append(_within(err, tolerance) and f"{name} error {err:+.3g} within {tolerance}")
    if met and all(met):
        return "converged: " + ", ".join(met)
    if s.systems and s.phases:
        stop = _systems_phase_iterations(c, k)
        if stop:
            return stop
    phase = c.phase(k)
    if phase is not None and not record.get("stage_converged"):
        why = _phase_spent(c, k, phase)
        if why:
            c.record(k, stage_converged=why)
            if phase == len(s.phases) - 1:
                return f"converged: last phase {c.phase_name(phase)}: {why}"
    if k >= s.max_iterations:
        missed = _missed_properties(c, record)
        if missed:
            return f"stopped: max_iterations ({s.max_iterations}) reached, not converged: {missed}"
        return f"max_iterations ({s.max_iterations}) reached"
    return None


def _missed_properties(c: Campaign, record: dict) -> str:
    """The property tolerances an iteration's `record` misses, by the properties' names with
    their errors (C12 +27 %, B0 -14 %), then the diagnosis of those that stalled ('' when
    none is missed)."""
    errors = record.get("properties") or {}
    missed = []
    for name, tolerance in c.settings.property_tolerances.items():
        err = errors.get(name)
        if _within(err, tolerance):
            continue
        label = property_label(name, record)
        unit = " eV" if name.endswith("_eV") else " %"
        missed.append(f"{label} not computed" if err is None else f"{label} {err:+.3g}{unit}")
    return "; ".join([", ".join(missed), *stall_lines(record)]) if missed else ""


def _phase_spent(
    c: Campaign, k: int, phase: int, system: SystemSettings | None = None
) -> str | None:
    """Why `phase` has converged by its iteration count after iteration k (of `system`)."""
    limit = c.settings.phases[phase].iterations
    done = sum(1 for j in range(1, k + 1) if c.phase(j, system) == phase)
    return f"{done} iterations" if limit is not None and done >= limit else None


def _systems_phase_iterations(c: Campaign, k: int) -> str | None:
    """After iteration k's validation, with systems and phases: a system that has spent its
    phase's `iterations` converges that phase (the last: the system). The stop reason once
    every system has converged."""
    systems = c.iteration_record(k).get("systems")
    if not systems:  # iteration 0 explores nothing
        return None
    for system in c.systems_at(k):
        rec = systems.get(system.name)
        phase = c.phase(k, system)
        if rec is None or rec.get("stage_converged") or phase is None:
            continue
        why = _phase_spent(c, k, phase, system)
        if why:
            rec["stage_converged"] = why
            if phase == len(c.settings.phases) - 1:
                rec["converged"] = f"last phase {c.phase_name(phase)}: {why}"
    c.record(k, systems=systems)
    return _every_system_converged(systems)
