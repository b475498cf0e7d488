"""Exploration: candidate structures from distortions and ensemble-driven MD."""

from __future__ import annotations

from dataclasses import dataclass

import ase.io
import numpy as np
from ase import Atoms

from nequix_fw.settings import ExplorationSettings


def distorted_copies(
    atoms: Atoms,
    n: int,
    rattle_std: float = 0.05,
    strain_max: float = 0.0,
    seed: int = 0,
) -> list[Atoms]:
    """`n` copies of `atoms`, each with Gaussian displacements (std `rattle_std`, Å) and, for
    periodic cells, a random symmetric strain with components uniform in ±`strain_max`."""
    if rattle_std < 0 or strain_max < 0:
        raise ValueError("rattle_std and strain_max must be >= 0")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = atoms.copy()
        if strain_max > 0 and a.pbc.all():
            e = rng.uniform(-strain_max, strain_max, (3, 3))
            a.set_cell(a.cell[:] @ (np.eye(3) + (e + e.T) / 2), scale_atoms=True)
        a.positions += rng.normal(0.0, rattle_std, a.positions.shape)
        out.append(a)
    return out


# -- ensemble-driven molecular dynamics -----------------------------------------------------------


@dataclass
class Trajectory:
    """Outcome of one MD run: sampled frames (with provenance in `info`) and why it stopped."""

    frames: list[Atoms]
    stop_reason: str  # "completed" | "uncertainty" | "min_distance" | "temperature" | "non-finite"
    stop_step: int
    condition: dict


def _dynamics(atoms: Atoms, temperature_K: float, pressure_GPa: float | None,
              settings: ExplorationSettings, rng):  # fmt: skip
    from ase import units

    dt = settings.timestep_fs * units.fs
    if pressure_GPa is not None:
        from ase.md.nptberendsen import NPTBerendsen

        return NPTBerendsen(
            atoms, dt, temperature_K=temperature_K, pressure=pressure_GPa * units.GPa,
            taut=settings.taut_fs * units.fs, taup=settings.taup_fs * units.fs,
            compressibility=settings.compressibility_per_GPa / units.GPa,
        )  # fmt: skip
    if settings.thermostat == "bussi":
        from ase.md.bussi import Bussi

        return Bussi(atoms, dt, temperature_K, settings.taut_fs * units.fs, rng=rng)
    from ase.md.langevin import Langevin

    return Langevin(atoms, dt, temperature_K=temperature_K,
                    friction=settings.friction_per_fs / units.fs, rng=rng)  # fmt: skip


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
    steps with their provenance (parent id, condition, step, time, uncertainty).
    """
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from nequix_fw.errors import SettingsError
    from nequix_fw.structures import min_distance, structure_id

    if pressure_GPa is not None and not atoms.pbc.all():
        raise SettingsError("NPT needs a periodic cell; this structure is not fully periodic")
    rng = np.random.default_rng(seed)
    a = atoms.copy()
    a.calc = calc
    MaxwellBoltzmannDistribution(a, temperature_K=temperature_K, rng=rng)
    dyn = _dynamics(a, temperature_K, pressure_GPa, settings, rng)
    parent_id = parent_id or structure_id(atoms)
    condition = {"temperature_K": temperature_K, "pressure_GPa": pressure_GPa, "seed": seed}
    frames: list[Atoms] = []
    reason, step = "completed", 0
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
        if reason == "completed" and step % settings.sample_every == 0:
            f = Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc)
            f.info.update(parent_id=parent_id, step=step, time_fs=step * settings.timestep_fs,
                          temperature_K=temperature_K, seed=seed,
                          **({"pressure_GPa": pressure_GPa} if pressure_GPa is not None else {}),
                          **({"max_force_dev": float(dev)} if dev is not None else {}))  # fmt: skip
            frames.append(f)
        if reason != "completed":
            break
    return Trajectory(frames, reason, step, condition)


def explore(
    ensemble,
    structures: list,
    output,
    settings: ExplorationSettings,
    progress: bool = True,
) -> dict:
    """Run the schedule (temperatures x pressures x seeds) from every structure with the ensemble
    mean; write the deduplicated candidate pool (`candidates.extxyz` + `manifest.json`)."""
    import json
    from pathlib import Path

    from tqdm import tqdm

    from nequix_fw.ensemble import EnsembleCalculator
    from nequix_fw.errors import StructureError
    from nequix_fw.structures import atomic_path, check_writable_dir, structure_id

    if not structures:
        raise StructureError("no starting structures for exploration")
    output = Path(output)
    check_writable_dir(output)
    for fr in structures:
        ensemble.check_covered(fr.atoms, f"{fr.source} frame {fr.frame}")
    pressures = settings.pressures_GPa or [None]
    jobs = [(fr, t, p, s) for fr in structures for t in settings.temperatures_K
            for p in pressures for s in settings.seeds]  # fmt: skip
    calc = EnsembleCalculator(ensemble)
    pool: dict[str, Atoms] = {}
    trajectories = []
    for fr, t, p, s in tqdm(jobs, desc="explore", unit="traj", disable=not progress):
        traj = run_md(fr.atoms, calc, t, settings, p, s, structure_id(fr.atoms))
        for f in traj.frames:
            pool.setdefault(structure_id(f), f)
        trajectories.append({
            "parent_id": structure_id(fr.atoms), "source": fr.source, "frame": fr.frame,
            **traj.condition, "stop_reason": traj.stop_reason, "stop_step": traj.stop_step,
            "n_frames": len(traj.frames),
        })  # fmt: skip
    frames = list(pool.values())
    with atomic_path(output / "candidates.extxyz") as tmp:
        ase.io.write(tmp, frames, format="extxyz")
    manifest = {
        "schema": "nequix-fw/exploration", "schema_version": 1,
        "settings": settings.model_dump(mode="json"),
        "trajectories": trajectories,
        "frames": [{"id": i, **f.info} for i, f in pool.items()],
    }  # fmt: skip
    with atomic_path(output / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest
