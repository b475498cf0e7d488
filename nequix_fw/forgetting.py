"""Has fine-tuning made a foundation model forget? The forgetting and repulsive-wall checks.

- **Forgetting**: on a fixed foundation-domain set (`foundation_domain`: the campaign's elements
  in other prototypes, and neighbouring elements the campaign does not use), the fine-tuned
  ensemble's drift from the foundation model's own predictions (forces in eV/Å, energies per
  atom in meV after one constant per element, the reference-energy correction). Where a
  reference calculator covers a structure, both models' errors against it and their ratio.
- **The repulsive wall** (`wall_check`): per element pair, a dimer scan and an isotropic
  compression of a two-atom cell, over the range where the foundation model's own energy
  rises as the atoms approach (from its dimer minimum, resp. the cell at its reference volume,
  down to where its own wall ends). The fine-tuned model passes when its energy rises too,
  monotonically within a tolerance, to at least half the foundation's wall height: an
  attractive hole (energy falling as the atoms approach) fails it.

Stage functions on plain data; `campaign.stages.validate_stage` runs both for a fine-tuned campaign.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.data import chemical_symbols, covalent_radii
from pymatgen.core import Element

from nequix_fw.ensemble import Ensemble

#: Prototypes of the foundation-domain set, and their atoms per primitive cell.
PROTOTYPES = ("fcc", "bcc", "hcp", "sc", "diamond")
#: Dimer and compression scans: steps (Å, resp. lattice scale) and the tolerance (eV) by
#: which the energy may fall between two neighbouring points as the atoms approach.
DIMER_STEP_A = 0.08
COMPRESSION_STEP = 0.025
WALL_TOLERANCE_EV = 0.05
#: The share of the foundation's wall height (eV) the fine-tuned model must keep.
WALL_HEIGHT_SHARE = 0.5

Energies = Callable[[Sequence[Atoms]], np.ndarray]


def ensemble_energies(ensemble: Ensemble) -> Energies:
    """Energies (eV) of the ensemble mean: what MD with it feels."""
    return lambda frames: np.array([p.energies.mean() for p in ensemble.predict(list(frames))])


def _volume_per_atom(z: int) -> float:
    """A plausible volume per atom (Å³): ASE's reference crystal, else touching covalent
    spheres in fcc packing."""
    try:
        a = bulk(chemical_symbols[z])
        return float(a.get_volume() / len(a))
    except (ValueError, KeyError, RuntimeError):
        return float((2 * covalent_radii[z]) ** 3 / np.sqrt(2))


def _prototype(symbol: str, kind: str, volume: float) -> Atoms:
    """`symbol` as a `kind` crystal scaled to `volume` Å³ per atom."""
    a = bulk(symbol, kind, a=1.0, c=1.633 if kind == "hcp" else None)
    a.set_cell(a.cell * (volume * len(a) / a.get_volume()) ** (1 / 3), scale_atoms=True)
    return a


def neighbour_elements(elements: Sequence[int], covered: set[int], n: int = 4) -> list[int]:
    """Up to `n` elements the campaign does not use: each element's neighbours in the periodic
    table (the next groups of its period, then its group one period up and down), among
    those `covered`."""
    where = {z: (Element.from_Z(z).row, Element.from_Z(z).group) for z in range(1, 104)}
    out: list[int] = []
    for z in elements:
        row, group = where[z]
        for want in ((row, group - 1), (row, group + 1), (row - 1, group), (row + 1, group)):
            other = next((o for o, rg in where.items() if rg == want), None)
            if other in covered and other not in elements and other not in out:
                out.append(other)
    return out[:n]


def foundation_domain(
    elements: Sequence[int], covered: set[int], seed: int = 0, n_other: int = 4
) -> list[Atoms]:
    """The fixed foundation-domain set: each of `elements` in the `PROTOTYPES` and every pair
    of them as a CsCl cell ('campaign elements'), and `n_other` neighbouring elements of the
    foundation's `covered` ones in the same prototypes ('other elements'); each as it is,
    strained by +-3 % and rattled by 0.05 Å (seeded). ``info["group"]`` names the group."""
    rng = np.random.default_rng(seed)
    out: list[Atoms] = []

    def add(cell: Atoms, group: str, kind: str) -> None:
        cell = cell.repeat((2, 2, 2)) if len(cell) < 4 else cell
        for scale in (1.0, 0.97, 1.03):
            a = cell.copy()
            a.set_cell(a.cell * scale, scale_atoms=True)
            a.positions += rng.normal(0, 0.05, a.positions.shape)
            a.info.update(group=group, kind=f"{kind} x{scale:.2f}")
            out.append(a)

    zs = sorted(int(z) for z in elements)
    for group, members in (
        ("campaign elements", zs),
        ("other elements", neighbour_elements(zs, covered, n_other)),
    ):
        for z in members:
            for kind in PROTOTYPES:
                add(_prototype(chemical_symbols[z], kind, _volume_per_atom(z)), group, kind)
    for za, zb in itertools.combinations(zs, 2):
        v = 0.5 * (_volume_per_atom(za) + _volume_per_atom(zb))
        side = (2 * v) ** (1 / 3)
        cscl = Atoms(
            [za, zb], scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=[side] * 3, pbc=True
        )
        add(cscl, "campaign elements", "CsCl")
    return out


def forgetting_check(
    model: Ensemble,
    foundation: Ensemble,
    structures: Sequence[Atoms],
    reference: Callable[[Atoms], tuple[float, np.ndarray] | None] | None = None,
) -> dict:
    """Drift of `model` (the ensemble mean) from `foundation` on `structures`, per group
    (``info["group"]``): force RMSE (eV/Å), the drift relative to the foundation's force RMS,
    and the energy RMSE per atom (meV) after one constant per element. With `reference`
    (energy, forces of a structure, or None where it cannot label it): both models' force
    RMSE against it, and their ratio (fine-tuned / foundation)."""
    frames = list(structures)
    mine, base = model.predict(frames), foundation.predict(frames)
    f_m = [p.forces.mean(0) for p in mine]
    f_b = [p.forces.mean(0) for p in base]
    de = np.array([p.energies.mean() - q.energies.mean() for p, q in zip(mine, base, strict=True)])
    zs = sorted({int(z) for a in frames for z in a.numbers})
    counts = np.array([[np.sum(a.numbers == z) for z in zs] for a in frames], float)
    offsets = np.linalg.lstsq(counts, de, rcond=None)[0]
    de_atom = (de - counts @ offsets) / counts.sum(1)
    labels = [reference(a) if reference is not None else None for a in frames]
    out: dict = {}
    for group in sorted({a.info.get("group", "all") for a in frames}):
        idx = [i for i, a in enumerate(frames) if a.info.get("group", "all") == group]
        diff = np.concatenate([(f_m[i] - f_b[i]).ravel() for i in idx])
        scale = np.sqrt(np.mean(np.concatenate([f_b[i].ravel() for i in idx]) ** 2))
        row = {
            "n_structures": len(idx),
            "elements": sorted({chemical_symbols[z] for i in idx for z in frames[i].numbers}),
            "force_drift_rmse_eV_per_A": float(np.sqrt(np.mean(diff**2))),
            "force_drift_relative": float(np.sqrt(np.mean(diff**2)) / max(scale, 1e-9)),
            "energy_drift_rmse_meV_per_atom": float(1000 * np.sqrt(np.mean(de_atom[idx] ** 2))),
        }
        ref = [i for i in idx if labels[i] is not None]
        if ref:
            err_m = np.concatenate([(f_m[i] - labels[i][1]).ravel() for i in ref])
            err_b = np.concatenate([(f_b[i] - labels[i][1]).ravel() for i in ref])
            rm, rb = float(np.sqrt(np.mean(err_m**2))), float(np.sqrt(np.mean(err_b**2)))
            row.update(
                n_reference=len(ref),
                force_rmse_eV_per_A=rm,
                foundation_force_rmse_eV_per_A=rb,
                error_ratio=rm / max(rb, 1e-9),
            )
        out[group] = row
    return out


def _dimer(za: int, zb: int, r: float) -> Atoms:
    return Atoms([za, zb], positions=[[0, 0, 0], [r, 0, 0]], cell=[20.0] * 3, pbc=True)


def _pair_cell(za: int, zb: int, scale: float) -> Atoms:
    """A two-atom cell of the pair (bcc for one element, CsCl for two) at its reference
    volume per atom times `scale`³."""
    v = 0.5 * (_volume_per_atom(za) + _volume_per_atom(zb))
    side = (2 * v) ** (1 / 3) * scale
    return Atoms([za, zb], scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=[side] * 3, pbc=True)


def _wall_range(e_ref: np.ndarray) -> tuple[int, int]:
    """Indices (first, end) along a scan ordered from far to close where `e_ref` has its wall:
    down to its first minimum (the bond, or the reference volume), then as far as it rises
    (within the tolerance), judged from where it has risen a tenth of that height (where the
    minimum is shifts with fine-tuning; the wall should not)."""
    start = 0
    while start + 1 < len(e_ref) and e_ref[start + 1] <= e_ref[start]:
        start += 1
    end = start
    while end + 1 < len(e_ref) and e_ref[end + 1] >= e_ref[end] - WALL_TOLERANCE_EV:
        end += 1
    rise = e_ref[start : end + 1] - e_ref[start]
    first = start + int(np.argmax(rise >= 0.1 * rise[-1]))
    return first, end


def _scan(kind: str, x: np.ndarray, e: np.ndarray, e_ref: np.ndarray, pair: str) -> dict:
    """One scan (far to close) judged over the reference's wall."""
    start, end = _wall_range(e_ref)
    height_ref = float(e_ref[end] - e_ref[start])
    seg = e[start : end + 1]
    drops = seg[:-1] - seg[1:]  # > 0: the energy falls as the atoms approach
    worst = int(np.argmax(drops)) if len(drops) else 0
    height = float(seg[-1] - seg[0]) if len(seg) else 0.0
    unit = "Å" if kind == "dimer" else "x lattice"
    why = None
    if len(drops) and drops[worst] > WALL_TOLERANCE_EV:
        why = (
            f"{pair} {kind}: the energy falls by {drops[worst]:.2f} eV from "
            f"{x[start + worst]:.2f} to {x[start + worst + 1]:.2f} {unit} (an attractive hole)"
        )
    elif height < WALL_HEIGHT_SHARE * height_ref:
        why = (
            f"{pair} {kind}: the wall rises {height:.2f} eV from {x[start]:.2f} to "
            f"{x[end]:.2f} {unit}, the foundation's {height_ref:.2f} eV"
        )
    return {
        "range": [float(x[start]), float(x[end])],
        "wall_height_eV": height,
        "foundation_wall_height_eV": height_ref,
        "passed": why is None,
        "why": why,
    }


def wall_check(energies: Energies, reference: Energies, elements: Sequence[int]) -> dict:
    """The dimer and compression scans of every pair of `elements` for the model whose
    `energies` are given, over the walls of `reference` (the foundation model). Returns
    ``{"passed": bool, "failures": [why...], "pairs": {"Cu-Au": {"dimer": ..., ...}}}``."""
    zs = sorted(int(z) for z in elements)
    pairs: dict = {}
    failures = []
    for za, zb in itertools.combinations_with_replacement(zs, 2):
        name = f"{chemical_symbols[za]}-{chemical_symbols[zb]}"
        rcov = covalent_radii[za] + covalent_radii[zb]
        r = np.arange(1.3 * rcov, 0.4 * rcov, -DIMER_STEP_A)
        s = np.arange(1.0, 0.6, -COMPRESSION_STEP)
        scans = {}
        for kind, x, frames in (
            ("dimer", r, [_dimer(za, zb, v) for v in r]),
            ("compression", s, [_pair_cell(za, zb, v) for v in s]),
        ):
            scans[kind] = _scan(kind, x, energies(frames), reference(frames), name)
            if not scans[kind]["passed"]:
                failures.append(scans[kind]["why"])
        pairs[name] = scans
    return {"passed": not failures, "failures": failures, "pairs": pairs}


def _labeller(calc) -> Callable[[Atoms], tuple[float, np.ndarray] | None]:
    """Energy and forces of a structure by the ASE calculator `calc`; None where it cannot
    (an element it does not know, a structure it gives no finite numbers for)."""

    def label(atoms: Atoms) -> tuple[float, np.ndarray] | None:
        a = atoms.copy()
        a.calc = calc
        try:
            with np.errstate(all="ignore"):
                e, f = float(a.get_potential_energy()), a.get_forces()
        except (NotImplementedError, KeyError, ValueError):
            return None
        return (e, f) if np.isfinite(e) and np.isfinite(f).all() else None

    return label


def forgetting_report(model: Ensemble, foundation: str, elements: Sequence[int], calc=None) -> dict:
    """Both checks of `model` (fine-tuned from the `foundation` model, a path or name) on the
    campaign's `elements`: ``{"foundation": name, "domain": forgetting_check(...) per group,
    "wall": wall_check(...)}``; `calc` (an ASE calculator) is the reference where it can
    label."""
    base = Ensemble.from_specs([foundation])
    covered = set(base.models[0].atomic_numbers)
    domain = foundation_domain(elements, covered)
    reference = None if calc is None else _labeller(calc)
    return {
        "foundation": base.model_infos()[0]["name"],
        "domain": forgetting_check(model, base, domain, reference),
        "wall": wall_check(ensemble_energies(model), ensemble_energies(base), elements),
    }


def forgetting_summary(report: dict) -> dict:
    """The numbers of a `forgetting_report` that an iteration record keeps: force drift and
    error ratio per group (keys ``<campaign|other>_force_drift_eV_per_A``,
    ``<...>_error_ratio``) and the wall check's outcome (``wall_passed``, ``wall_failures``)."""
    out: dict = {}
    for group, row in report["domain"].items():
        key = group.split()[0]
        out[f"{key}_force_drift_eV_per_A"] = row["force_drift_rmse_eV_per_A"]
        out[f"{key}_error_ratio"] = row.get("error_ratio")
    return {
        **out,
        "wall_passed": report["wall"]["passed"],
        "wall_failures": report["wall"]["failures"],
    }


def summary_line(summary: dict) -> str:
    """One line of a `forgetting_summary` for reports."""
    parts = []
    for key in ("campaign", "other"):
        drift = summary.get(f"{key}_force_drift_eV_per_A")
        if drift is not None:
            ratio = summary.get(f"{key}_error_ratio")
            part = f"{key} elements {drift:.3f} eV/Å"
            parts.append(part + (f" (error {ratio:.2f}x the foundation's)" if ratio else ""))
    wall = "passed" if summary["wall_passed"] else "FAILED: " + "; ".join(summary["wall_failures"])
    return f"drift from the foundation: {', '.join(parts)}; repulsive wall {wall}"
