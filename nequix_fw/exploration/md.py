"""Ensemble-driven molecular dynamics with uncertainty and physics stops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms, units

from nequix_fw.errors import SettingsError
from nequix_fw.settings import ExplorationSettings
from nequix_fw.structures import min_distance, structure_id


@dataclass
class Trajectory:
    """Outcome of one MD run: sampled frames (with provenance in `info`) and why it stopped."""

    frames: list[Atoms]
    stop_reason: str  # "completed" | "uncertainty" | "min_distance" | "temperature" | "non-finite"
    stop_step: int
    condition: dict


def _dynamics(atoms: Atoms, temperature_K: float, pressure_GPa: float | None,
              settings: ExplorationSettings, rng):  # fmt: skip
    dt = settings.timestep_fs * units.fs
    taut, taup = settings.taut_fs * units.fs, settings.taup_fs * units.fs
    if pressure_GPa is not None:
        if settings.barostat == "berendsen":
            from ase.md.nptberendsen import NPTBerendsen

            return NPTBerendsen(
                atoms, dt, temperature_K=temperature_K, pressure_au=pressure_GPa * units.GPa,
                taut=taut, taup=taup,
                compressibility_au=settings.compressibility_per_GPa / units.GPa,
            )  # fmt: skip
        from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

        cls = MTKNPT if settings.barostat == "mtk" else IsotropicMTKNPT
        return cls(atoms, dt, temperature_K=temperature_K, pressure_au=pressure_GPa * units.GPa,
                   tdamp=taut, pdamp=taup)  # fmt: skip
    if settings.thermostat == "bussi":
        from ase.md.bussi import Bussi

        return Bussi(atoms, dt, temperature_K, taut, rng=rng)
    if settings.thermostat == "nose_hoover":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(atoms, dt, temperature_K=temperature_K, tdamp=taut)
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    atoms.set_constraint(FixCom())  # the centre of mass stays put (ASE's advice over fixcm)
    return Langevin(atoms, dt, temperature_K=temperature_K,
                    friction=settings.friction_per_fs / units.fs, fixcm=False, rng=rng)  # fmt: skip


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

    Every `check_every` steps the trajectory is checked: ensemble uncertainty above `hi`, atoms
    closer than `min_distance`, a temperature above `max_temperature_factor` x target, or
    non-finite forces stop it, recording why and when. Frames are sampled every `sample_every`
    steps with their provenance (parent id, condition, step, time, uncertainty). A trajectory
    stopped on uncertainty also keeps its last checked frame that was still in trust (info
    ``last_in_trust``), the most informative one, when it was not sampled already.
    """
    from ase.md.velocitydistribution import thermalize_momenta

    if pressure_GPa is not None and not atoms.pbc.all():
        raise SettingsError(f"{atoms.get_chemical_formula()}: NPT needs a fully periodic cell; "
                            "this structure is not")  # fmt: skip
    rng = np.random.default_rng(seed)
    a = atoms.copy()
    a.calc = calc
    thermalize_momenta(a, temperature_K, rng=rng)
    dyn = _dynamics(a, temperature_K, pressure_GPa, settings, rng)
    parent_id = parent_id or structure_id(atoms)
    condition = {"temperature_K": temperature_K, "pressure_GPa": pressure_GPa, "seed": seed}
    frames: list[Atoms] = []
    reason, step, in_trust = "completed", 0, None

    def snapshot() -> Atoms:
        f = Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc)
        f.info.update(generator="md", parent_id=parent_id, step=step,
                      time_fs=step * settings.timestep_fs, temperature_K=temperature_K, seed=seed,
                      **({"pressure_GPa": pressure_GPa} if pressure_GPa is not None else {}),
                      **({"max_force_dev": float(dev)} if dev is not None else {}))  # fmt: skip
        return f

    while step < settings.steps:
        dyn.run(settings.check_every)
        step += settings.check_every
        forces = a.get_forces()
        dev = a.calc.results.get("max_force_dev")
        if not np.isfinite(forces).all() or not np.isfinite(a.get_potential_energy()):
            reason = "non-finite"
        elif settings.hi is not None and dev is not None and dev > settings.hi:
            reason = "uncertainty"
        elif min_distance(a) < settings.min_distance:
            reason = "min_distance"
        elif a.get_temperature() > settings.max_temperature_factor * temperature_K:
            reason = "temperature"
        if reason == "completed":
            in_trust = snapshot()
            if step % settings.sample_every == 0:
                frames.append(in_trust)
        elif reason == "uncertainty" and in_trust is not None:
            if not frames or frames[-1] is not in_trust:
                in_trust.info["last_in_trust"] = True
                frames.append(in_trust)
        if reason != "completed":
            break
    return Trajectory(frames, reason, step, condition)
