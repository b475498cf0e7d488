"""Property-driven candidates: when a property check of the last validation missed its
tolerance, structures that teach that property, for the usual evaluate -> select path (where
a campaign labels `campaign.property_labels` of each check's cells first, and uncertainty
decides the rest):

- the equation of state (``v0_percent``, ``bulk_modulus_percent``): the check's structure scaled
  to volumes across and beyond the E-V curve's span (-8 to +8 %), slightly rattled, and frames
  of NPT MD on the ensemble's mean at pressures that take the cell across that span
  (`npt_candidates`);
- elastic constants (``elastic_percent``): the structure under random strains of up to 2 % per
  component, shears included, slightly rattled;
- phonons (``phonon_percent``): the check's supercell with every atom displaced (normal, 0.02 to
  0.08 Å per component: the finite displacements and thermal motion);
- the vacancy formation energy (``vacancy_formation_eV``): the check's cell with its first atom
  removed, rattled by 0.01 to 0.08 Å (the neighbours' relaxation into the vacancy).

Each carries ``info["generator"] = "property:<check>"`` (the NPT frames
``"property:eos:npt"``).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from nequix_fw.ensemble import Ensemble
from nequix_fw.exploration.distortions import distorted_copies
from nequix_fw.exploration.md import run_md
from nequix_fw.exploration.walkers import run_trajectories
from nequix_fw.settings import ExplorationSettings
from nequix_fw.structures import min_distance

#: The tolerance names of each check.
CHECKS = {
    "eos": ("v0_percent", "bulk_modulus_percent"),
    "elastic": ("elastic_percent",),
    "phonons": ("phonon_percent",),
    "vacancy": ("vacancy_formation_eV",),
}
#: Volume strains of the E-V candidates (fractions): wider than the E-V curve's ±6 %.
EOS_VOLUME_RANGE = 0.08
ELASTIC_STRAIN_MAX = 0.02
PHONON_RATTLE_A = (0.02, 0.08)
#: Rattles (Å) of the vacancy candidates: about the neighbours' relaxation into the vacancy.
VACANCY_RATTLE_A = (0.01, 0.08)
#: NPT of the E-V candidates: the volume strains whose pressures (P = -B dV/V, from the
#: reference bulk modulus) each trajectory runs at, its temperature (K) and length (steps of
#: 2 fs), and the barostat's time (fs: the volume settles within the run).
NPT_VOLUME_STRAINS = (-0.06, -0.03, 0.03, 0.06)
NPT_TEMPERATURE_K = 300.0
NPT_STEPS = 200
NPT_TAUP_FS = 100.0
#: NPT frames kept: within this volume strain of the start (the E-V curve spans ±6 %), and no
#: two atoms closer than this fraction of the start's shortest distance (a poor ensemble's
#: barostat can crush a cell: such frames teach nothing and waste a label).
NPT_MAX_VOLUME_STRAIN = 0.12
NPT_MIN_DISTANCE_FRACTION = 0.8


def missed_checks(properties: dict | None, tolerances: dict[str, float]) -> dict[str, list[str]]:
    """The checks whose tolerances a validation's `properties` (errors by tolerance name)
    missed, each with the tolerances it missed; an error without a value (no fit, cells not
    labelled) counts as missed."""
    properties = properties or {}
    out = {}
    for check, names in CHECKS.items():
        missed = [
            n
            for n in names
            if n in tolerances and (properties.get(n) is None or abs(properties[n]) > tolerances[n])
        ]
        if missed:
            out[check] = missed
    return out


def property_candidates(
    structure: Atoms, check: str, n: int, seed: int, supercell: list[int] | None = None
) -> list[Atoms]:
    """`n` structures that teach `check` ('eos', 'elastic', 'phonons' or 'vacancy'), from the
    check's `structure` (the phonons' from its `supercell`; the vacancy's with its first atom
    removed, as the check removes it)."""
    rng = np.random.default_rng(seed)
    if check == "eos":
        out = []
        for v in np.linspace(-EOS_VOLUME_RANGE, EOS_VOLUME_RANGE, n):
            a = structure.copy()
            a.calc = None
            a.set_cell(a.cell[:] * (1 + v) ** (1 / 3), scale_atoms=True)
            a.positions += rng.normal(0, 0.01, a.positions.shape)
            a.info.update(volume_strain=float(v))
            out.append(a)
    elif check == "elastic":
        out = distorted_copies(
            structure, n, rattle_std=0.01, strain_max=ELASTIC_STRAIN_MAX, seed=seed
        )
    elif check == "phonons":
        big = structure.repeat(tuple(supercell or (2, 2, 2)))
        out = []
        for amplitude in np.linspace(*PHONON_RATTLE_A, n):
            a = big.copy()
            a.calc = None
            a.positions += rng.normal(0, amplitude, a.positions.shape)
            a.info.update(rattle_A=float(amplitude))
            out.append(a)
    elif check == "vacancy":
        out = []
        for amplitude in np.linspace(*VACANCY_RATTLE_A, n):
            a = structure.copy()
            a.calc = None
            del a[0]
            a.positions += rng.normal(0, amplitude, a.positions.shape)
            a.info.update(rattle_A=float(amplitude))
            out.append(a)
    else:
        raise ValueError(f"unknown property check {check!r}")
    for a in out:
        a.info["generator"] = f"property:{check}"
    return out


def npt_candidates(
    structure: Atoms, model: Ensemble | Calculator, bulk_modulus_GPa: float, n: int, seed: int
) -> list:
    """About `n` frames of NPT MD (Berendsen, `NPT_TEMPERATURE_K`) on `model` from
    `structure`, at the pressures that would strain its volume by `NPT_VOLUME_STRAINS` with the
    reference bulk modulus (GPa): the last frames of each trajectory, where the cell has
    settled. On an `Ensemble` (its mean), the trajectories run together as batched walkers, one
    ensemble call a step for all of them; any other ASE calculator runs them one after the
    other. A trajectory stops early, as exploration's do, when the ensemble's uncertainty
    passes its default stop; its frames up to there count. Frames beyond
    `NPT_MAX_VOLUME_STRAIN` or closer than `NPT_MIN_DISTANCE_FRACTION` are dropped."""
    per = max(1, n // len(NPT_VOLUME_STRAINS))
    check = ExplorationSettings.model_fields["check_every"].default  # frames come at checks
    settings = ExplorationSettings(
        temperatures_K=[NPT_TEMPERATURE_K],
        steps=NPT_STEPS,
        sample_every=max(check, NPT_STEPS // (2 * per) // check * check),
        taup_fs=NPT_TAUP_FS,
        compressibility_per_GPa=1.0 / bulk_modulus_GPa,
        walkers=len(NPT_VOLUME_STRAINS),
    )
    pressures = [-strain * bulk_modulus_GPa for strain in NPT_VOLUME_STRAINS]
    jobs = [(structure, NPT_TEMPERATURE_K, p, seed + i, None) for i, p in enumerate(pressures)]
    if isinstance(model, Ensemble):
        trajectories = run_trajectories(model, jobs, settings)
    else:
        trajectories = [run_md(a, model, t, settings, p, s) for a, t, p, s, _ in jobs]
    v0, d0 = structure.get_volume(), min_distance(structure)
    out = []
    for pressure, traj in zip(pressures, trajectories, strict=True):
        for frame in traj.frames[-per:]:
            sane = abs(frame.get_volume() / v0 - 1) <= NPT_MAX_VOLUME_STRAIN
            if sane and min_distance(frame) >= NPT_MIN_DISTANCE_FRACTION * d0:
                frame.info.update(generator="property:eos:npt", pressure_GPa=float(pressure))
                out.append(frame)
    return out
