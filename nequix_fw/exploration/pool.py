"""The candidate pool: MD frames, distorted copies and random packings, deduplicated."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import ase.io
import numpy as np
from ase import Atoms
from tqdm import tqdm

from nequix_fw.ensemble import Ensemble
from nequix_fw.errors import SettingsError, StructureError
from nequix_fw.exploration.distortions import (
    distorted_copies,
    random_packing,
    with_substitutions,
    with_vacancies,
)
from nequix_fw.exploration.md import Trajectory
from nequix_fw.exploration.walkers import run_trajectories
from nequix_fw.schemas import ExplorationManifest
from nequix_fw.settings import EnsembleSettings, ExplorationSettings
from nequix_fw.structures import Frame, atomic_path, check_output, structure_id

logger = logging.getLogger(__name__)


def generate_structures(structures: list[Frame], settings: ExplorationSettings) -> list[Atoms]:
    """Distorted copies of each starting structure (rattle, strain, then vacancies and
    substitutions) and the random packings of the settings, with provenance in ``info``."""
    rng = np.random.default_rng(settings.seeds[0])
    out = []
    for fr in structures:
        parent_id = structure_id(fr.atoms)
        if settings.n_distortions and settings.vacancies >= len(fr.atoms):
            raise StructureError(
                f"{fr.source} frame {fr.frame}: cannot make {settings.vacancies} vacancies in "
                f"{len(fr.atoms)} atoms"
            )
        copies = distorted_copies(
            fr.atoms,
            settings.n_distortions,
            settings.rattle_A,
            settings.strain_max,
            seed=int(rng.integers(2**31)),
            rattle_distribution=settings.rattle_distribution,
            strain_volumetric=settings.strain_volumetric,
            strain_shear=settings.strain_shear,
        )
        for a in copies:
            if settings.vacancies:
                a = with_vacancies(a, settings.vacancies, rng)
            if settings.substitutions:
                a = with_substitutions(
                    a, settings.substitutions, settings.substitution_fraction, rng
                )
            a.info = {"generator": "distortion", "parent_id": parent_id}
            out.append(a)
    for spec in settings.random_packing:
        for _ in range(spec.n_structures):
            a = random_packing(spec.composition, spec.density_g_cm3, spec.min_distance_A, rng)
            a.info = {
                "generator": "random_packing",
                "composition": spec.composition,
                "density_g_cm3": spec.density_g_cm3,
            }
            out.append(a)
    return out


_WORKER_ENSEMBLE = None


def _init_worker(model_paths: list[str], ensemble_settings: dict) -> None:
    global _WORKER_ENSEMBLE

    _WORKER_ENSEMBLE = Ensemble.from_specs(model_paths, EnsembleSettings(**ensemble_settings))


def _run_jobs(args: tuple) -> list[Trajectory]:
    jobs, settings = args
    return run_trajectories(_WORKER_ENSEMBLE, jobs, settings)


def stop_counts(trajectories: list[dict]) -> dict[str, int]:
    """How many trajectories (of an exploration manifest) stopped for each reason."""
    return dict(Counter(t["stop_reason"] for t in trajectories))


def _why_none(trajectories: list[dict], settings: ExplorationSettings) -> str:
    """Why trajectories gave no frame, and what to change."""
    early = {r: n for r, n in stop_counts(trajectories).items() if r != "completed"}
    if early:
        stops = ", ".join(f"{n} on {r}" for r, n in sorted(early.items()))
        hint = (
            f"the model is uncertain from the start (max_force_dev above explore.stop_force_dev "
            f"{settings.stop_force_dev} eV/Å): raise it, or explore.check_every lower "
            "(command line: --hi, --check-every)"
            if "uncertainty" in early
            else "see the trajectories' stop reasons; lower explore.check_every "
            "(command line: --check-every)"
        )
        return (
            f"{len(trajectories)} trajectories stopped before their first sampled frame "
            f"({stops}); {hint}"
        )
    return (
        f"{len(trajectories)} trajectories of {settings.steps} steps sample every "
        f"{settings.sample_every} steps, and no distortions or random packings were asked for; "
        "lower explore.sample_every or raise explore.steps (command line: --sample-every, --steps)"
    )


def explore(
    ensemble,
    structures: list[Frame],
    output,
    settings: ExplorationSettings,
    progress: bool = True,
) -> dict:
    """Build the candidate pool and write it (`candidates.extxyz` + `manifest.json`).

    MD runs the schedule (temperatures x pressures x seeds) from every starting structure on
    the ensemble mean, as batched walkers (`settings.walkers` at a time) in each of
    `settings.n_workers` processes; distorted copies and random packings are added; the pool
    is deduplicated by content hash.
    """

    if not structures and not settings.random_packing:
        raise StructureError("no starting structures for exploration")
    output = check_output(output, "directory")
    ensemble.check_distinct()
    for fr in structures:
        where = f"{fr.source} frame {fr.frame}"
        ensemble.check_covered(fr.atoms, where)
        if settings.steps and settings.pressures_GPa and not fr.atoms.pbc.all():
            raise SettingsError(
                f"{where}: NPT (pressures_GPa) needs a fully periodic cell, and "
                "this structure is not; explore it at constant volume"
            )
    generated = generate_structures(structures, settings)
    for a in generated:
        ensemble.check_covered(a, f"generated structure ({a.info['generator']})")
    pressures = settings.pressures_GPa or [None]
    parents = {id(fr): structure_id(fr.atoms) for fr in structures}
    conditions = (
        [
            (fr, t, p, s)
            for fr in structures
            for t in settings.temperatures_K
            for p in pressures
            for s in settings.seeds
        ]
        if settings.steps
        else []
    )
    jobs = [(fr.atoms, t, p, s, parents[id(fr)]) for fr, t, p, s in conditions]
    with tqdm(total=len(jobs), desc="explore", unit="traj", disable=not progress) as bar:
        if settings.n_workers > 1 and len(jobs) > 1:
            init = ([m.info.path for m in ensemble.models], ensemble.settings.model_dump())
            n = min(settings.n_workers, len(jobs))
            chunks = [jobs[i::n] for i in range(n)]
            ctx = get_context("spawn")
            trajs: list[Trajectory | None] = [None] * len(jobs)
            with ProcessPoolExecutor(n, ctx, _init_worker, init) as workers:
                for i, chunk in enumerate(workers.map(_run_jobs, [(c, settings) for c in chunks])):
                    trajs[i::n] = chunk
                    bar.update(len(chunk))
        else:
            trajs = run_trajectories(ensemble, jobs, settings, bar.update)
    pool: dict[str, Atoms] = {}
    trajectories = []
    for (fr, *_), traj in zip(conditions, trajs, strict=True):
        for f in traj.frames:
            pool.setdefault(structure_id(f), f)
        trajectories.append(
            {
                "parent_id": parents[id(fr)],
                "source": fr.source,
                "frame": fr.frame,
                **traj.condition,
                "stop_reason": traj.stop_reason,
                "stop_step": traj.stop_step,
                "n_frames": len(traj.frames),
            }
        )
    for a in generated:
        pool.setdefault(structure_id(a), a)
    frames = list(pool.values())
    if not frames:
        why = _why_none(trajectories, settings)
        raise StructureError(f"{output}: the exploration yielded no candidate frame: {why}")
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "candidates.extxyz") as tmp:
        ase.io.write(tmp, frames, format="extxyz")
    doc = ExplorationManifest(
        settings=settings.model_dump(mode="json"),
        trajectories=trajectories,
        frames=[{"id": i, **f.info} for i, f in pool.items()],
    )
    doc.to_file(output / "manifest.json")
    manifest = doc.to_dict()
    logger.info(
        "explored %d trajectories (stops: %s), %d generated structures: %d candidates -> %s",
        len(trajectories),
        stop_counts(trajectories),
        len(generated),
        len(frames),
        output,
    )
    return manifest
