"""Ensemble-driven molecular dynamics with uncertainty and physics stops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.md.bussi import Bussi
from ase.md.langevin import Langevin
from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT, NoseHooverChainNVT
from ase.md.nptberendsen import NPTBerendsen
from ase.md.velocitydistribution import thermalize_momenta

from nequix_fw.errors import SettingsError
from nequix_fw.settings import ExplorationSettings
from nequix_fw.structures import min_distance, structure_id


@dataclass
class Trajectory:
    """Outcome of one MD run: sampled frames (with provenance in `info`) and why it stopped."""

    frames: list[Atoms]
    # completed | uncertainty | min_distance | temperature | non-finite | energy_drift
    stop_reason: str
    stop_step: int
    condition: dict
    survived_step: int = 0  # the last check that passed
    energy_drift: float | None = None  # eV/atom/ps at the last check (Bussi)


def _dynamics(
    atoms: Atoms,
    temperature_K: float,
    pressure_GPa: float | None,
    settings: ExplorationSettings,
    rng,
):
    dt = settings.timestep_fs * units.fs
    taut, taup = settings.taut_fs * units.fs, settings.taup_fs * units.fs
    if pressure_GPa is not None:
        if settings.barostat == "berendsen":
            return NPTBerendsen(
                atoms,
                dt,
                temperature_K=temperature_K,
                pressure_au=pressure_GPa * units.GPa,
                taut=taut,
                taup=taup,
                compressibility_au=settings.compressibility_per_GPa / units.GPa,
            )

        cls = MTKNPT if settings.barostat == "mtk" else IsotropicMTKNPT
        return cls(
            atoms,
            dt,
            temperature_K=temperature_K,
            pressure_au=pressure_GPa * units.GPa,
            tdamp=taut,
            pdamp=taup,
        )
    if settings.thermostat == "bussi":
        return Bussi(atoms, dt, temperature_K, taut, rng=rng)
    if settings.thermostat == "nose_hoover":
        return NoseHooverChainNVT(atoms, dt, temperature_K=temperature_K, tdamp=taut)

    atoms.set_constraint(FixCom())  # the centre of mass stays put (ASE's advice over fixcm)
    return Langevin(
        atoms,
        dt,
        temperature_K=temperature_K,
        friction=settings.friction_per_fs / units.fs,
        fixcm=False,
        rng=rng,
    )


def stop_reason(
    settings: ExplorationSettings,
    temperature_K: float,
    energy: float,
    forces: np.ndarray,
    max_force_dev: float | None,
    min_dist: Callable[[], float],
    temperature: float,
    energy_drift: float | None = None,
) -> str:
    """Why a trajectory stops at a check ("completed": it goes on), in the order of the checks:
    non-finite results, uncertainty above `hi`, atoms too close, temperature runaway, drift of
    the conserved energy (eV/atom/ps, Bussi)."""
    if not np.isfinite(forces).all() or not np.isfinite(energy):
        return "non-finite"
    level = settings.stop_force_dev
    if level is not None and max_force_dev is not None and max_force_dev > level:
        return "uncertainty"
    if min_dist() < settings.stop_min_distance_A:
        return "min_distance"
    if temperature > settings.max_temperature_factor * temperature_K:
        return "temperature"
    limit = settings.max_energy_drift_eV_per_atom_ps
    if limit is not None and energy_drift is not None and energy_drift > limit:
        return "energy_drift"
    return "completed"


def energy_drift(h: float, h0: float, n_atoms: int, time_fs: float) -> float:
    """Drift (eV/atom/ps) of a conserved energy from `h0` to `h` (eV) over `time_fs`."""
    return abs(h - h0) / n_atoms / (time_fs / 1000)


class FrameLog:
    """The frames a trajectory keeps: every `sample_every` steps while in trust, and on an
    uncertainty stop its last checked frame still in trust (info ``last_in_trust``)."""

    def __init__(
        self,
        settings: ExplorationSettings,
        parent_id: str,
        temperature_K: float,
        pressure_GPa: float | None,
        seed: int,
    ):
        self.settings = settings
        self.info = {
            "generator": "md",
            "parent_id": parent_id,
            "temperature_K": temperature_K,
            "seed": seed,
        }
        if pressure_GPa is not None:
            self.info["pressure_GPa"] = pressure_GPa
        self.condition = {
            "temperature_K": temperature_K,
            "pressure_GPa": pressure_GPa,
            "seed": seed,
        }
        self.frames: list[Atoms] = []
        self._in_trust: Atoms | None = None
        self.survived_step = 0  # the last check passed
        self.energy_drift: float | None = None

    def checked(
        self,
        step: int,
        reason: str,
        atoms: Atoms,
        max_force_dev: float | None,
        drift: float | None = None,
    ) -> None:
        """Record the check at `step` of `atoms` (copied) that gave `reason`; `drift`: the
        conserved energy's drift so far (eV/atom/ps), where tracked."""
        self.energy_drift = drift
        if reason == "completed":
            self.survived_step = step
            f = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
            f.info.update(
                self.info,
                step=step,
                time_fs=step * self.settings.timestep_fs,
                **({"max_force_dev": float(max_force_dev)} if max_force_dev is not None else {}),
            )
            self._in_trust = f
            if step % self.settings.sample_every == 0:
                self.frames.append(f)
        elif reason == "uncertainty" and self._in_trust is not None:
            if not self.frames or self.frames[-1] is not self._in_trust:
                self._in_trust.info["last_in_trust"] = True
                self.frames.append(self._in_trust)

    def trajectory(self, reason: str, step: int) -> Trajectory:
        return Trajectory(
            self.frames, reason, step, self.condition, self.survived_step, self.energy_drift
        )


def run_md(
    atoms: Atoms,
    calc,
    temperature_K: float,
    settings: ExplorationSettings,
    pressure_GPa: float | None = None,
    seed: int = 0,
    parent_id: str | None = None,
) -> Trajectory:
    """MD on `calc` (an `EnsembleCalculator`, or any ASE calculator) under one condition.

    Every `check_every` steps the trajectory is checked (`stop_reason`): ensemble uncertainty
    above `stop_force_dev`, atoms closer than `stop_min_distance_A`, a temperature above
    `max_temperature_factor` x target, or non-finite forces stop it, recording why and when.
    Frames are kept as `FrameLog` says, with their provenance (parent id, condition, step,
    time, uncertainty).
    """

    if pressure_GPa is not None and not atoms.pbc.all():
        raise SettingsError(
            f"{atoms.get_chemical_formula()}: NPT needs a fully periodic cell; "
            "this structure is not"
        )
    rng = np.random.default_rng(seed)
    a = atoms.copy()
    a.calc = calc
    thermalize_momenta(a, temperature_K, rng=rng)
    dyn = _dynamics(a, temperature_K, pressure_GPa, settings, rng)
    log = FrameLog(settings, parent_id or structure_id(atoms), temperature_K, pressure_GPa, seed)
    h0 = a.get_potential_energy() + a.get_kinetic_energy()
    reason, step = "completed", 0
    while step < settings.steps and reason == "completed":
        dyn.run(settings.check_every)
        step += settings.check_every
        dev = a.calc.results.get("max_force_dev")
        drift = None
        if hasattr(dyn, "transferred_energy"):  # Bussi's conserved energy
            h = a.get_potential_energy() + a.get_kinetic_energy() - dyn.transferred_energy
            drift = energy_drift(h, h0, len(a), step * settings.timestep_fs)
        reason = stop_reason(
            settings,
            temperature_K,
            a.get_potential_energy(),
            a.get_forces(),
            dev,
            lambda: min_distance(a),
            a.get_temperature(),
            drift,
        )
        log.checked(step, reason, a, dev, drift)
    return log.trajectory(reason, step)
