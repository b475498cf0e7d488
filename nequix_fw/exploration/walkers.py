"""Batched walkers: many MD trajectories advanced together, one compiled ensemble call a step.

Every walker keeps its own state, random stream, checks (`stop_reason`), frames (`FrameLog`)
and stop reason; what the walkers share is the force call: at each step the graphs of all
running walkers (each from its own neighbour list with a skin) go to the ensemble in one call,
padded to fixed capacities (walkers, atoms, edges), so a run compiles once. A walker that stops
leaves the batch and the next start takes its place without recompiling. Each trajectory depends
on nothing but its own state, so it equals the one-walker path (`run_md`) to numerical
precision.

Two drivers:

- `run_nvt_walkers` (NVT with the Langevin or Bussi thermostat, the default exploration): the
  integrators are written once for a walker in numpy, as ASE writes them, so that a step costs
  microseconds of Python: ASE's `Langevin` (Vanden-Eijnden & Ciccotti, Chem. Phys. Lett. 429,
  310 (2006), Eq. 23) with the `FixCom` constraint that `run_md` sets, and ASE's `Bussi`
  (Bussi, Donadio & Parrinello, J. Chem. Phys. 126, 014101 (2007), Eq. A7) on velocity Verlet.
- `run_walkers` (any integrator: Nosé-Hoover chains, NPT): ASE's own integrator per walker, each
  in its own thread; a walker's force call waits until every running walker has handed in its
  graph, then one call evaluates them all.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from itertools import islice

import numpy as np
from ase import Atoms, units
from ase.geometry import complete_cell

from nequix_fw.ensemble import (
    Ensemble,
    EnsembleCalculator,
    NeighbourCache,
    Prediction,
    bucket_size,
)
from nequix_fw.exploration.md import FrameLog, Trajectory, run_md, stop_reason
from nequix_fw.settings import ExplorationSettings
from nequix_fw.structures import min_distance
from nequix_fw.uncertainty import atomic_force_deviation

MDJob = tuple  # (atoms, temperature_K, pressure_GPa | None, seed, parent_id)


class BatchEvaluator:
    """Ensemble calls over up to `n_walkers` graphs at fixed capacities.

    `n_walkers` + 1 graphs and the atoms of the `n_walkers` largest structures (`max_atoms`)
    + 1; the edge capacity is `max_atoms` times the most edges per atom seen, with
    `edge_headroom`, so a walker replaced by a larger start of similar density still fits; it
    only grows (and recompiles) when a batch exceeds it.
    """

    edge_headroom = 1.1

    def __init__(self, ensemble: Ensemble, n_walkers: int, max_atoms: int):
        self.ensemble = ensemble
        self.max_atoms = max_atoms
        self.n_graph = n_walkers + 1
        self.n_node = bucket_size(max_atoms + 1, 16)
        self.edge_capacity = 0
        self.calls = 0  # batched ensemble calls
        self.walker_steps = 0  # force evaluations served
        self.capacity_changes = 0

    def __call__(self, graphs: list[dict]) -> list[Prediction]:
        n_edge = sum(int(g["n_edge"][0]) for g in graphs)
        if n_edge > self.edge_capacity:
            density = max(int(g["n_edge"][0]) / int(g["n_node"][0]) for g in graphs)
            need = max(n_edge, density * self.max_atoms) * self.edge_headroom
            self.edge_capacity = bucket_size(math.ceil(need), 64)
            self.capacity_changes += 1
        self.calls += 1
        self.walker_steps += len(graphs)
        return self.ensemble.predict_graphs(graphs, self.n_graph, self.n_node, self.edge_capacity)


def _evaluator(ensemble: Ensemble, jobs: Sequence[MDJob], n: int) -> BatchEvaluator:
    largest = sorted((len(job[0]) for job in jobs), reverse=True)[:n]
    return BatchEvaluator(ensemble, n, sum(largest))


# -- NVT walkers in numpy ---------------------------------------------------------------------


class _NVTWalker:
    """One NVT trajectory of a batched run (`run_md`'s equations, state and checks)."""

    def __init__(self, index: int, job: MDJob, settings: ExplorationSettings, ensemble: Ensemble):
        from ase.md.velocitydistribution import thermalize_momenta

        atoms, temperature_K, _, seed, parent_id = job
        ensemble.check_covered(atoms, f"structure {parent_id}")
        self.index, self.settings, self.temperature_K = index, settings, temperature_K
        self.rng = np.random.default_rng(seed)
        self.atoms = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        thermalize_momenta(self.atoms, temperature_K, rng=self.rng)
        self.p = self.atoms.get_momenta()
        self.m = self.atoms.get_masses()[:, None]
        self.dt = dt = settings.timestep_fs * units.fs
        kt = units.kB * temperature_K
        self.langevin = settings.thermostat == "langevin"
        if self.langevin:  # ase.md.langevin.Langevin.updatevars
            fr = settings.friction_per_fs / units.fs
            sigma = np.sqrt(2 * kt * fr / self.m)
            self.c1 = dt / 2.0 - dt * dt * fr / 8.0
            self.c2 = dt * fr / 2 - dt * dt * fr * fr / 8.0
            self.c3 = np.sqrt(dt) * sigma / 2.0 - dt**1.5 * fr * sigma / 8.0
            self.c5 = dt**1.5 * sigma / (2 * np.sqrt(3))
            self.c4 = fr / 2.0 * self.c5
            self.dof = 3 * len(atoms) - 3  # FixCom removes the centre-of-mass motion
        else:  # ase.md.bussi.Bussi
            self.dof = 3 * len(atoms)
            self.exp_term = math.exp(-dt / (settings.taut_fs * units.fs))
            self.target_kinetic_energy = 0.5 * kt * self.dof
        self.neighbours = NeighbourCache(ensemble.cutoff, ensemble.settings.skin_A)
        self.atom_indices = ensemble._atom_indices
        self.log = FrameLog(settings, parent_id, temperature_K, None, seed)
        self.step = 0
        self.forces: np.ndarray | None = None  # mean forces at the current positions
        self.energy = 0.0
        self.broken = False  # non-finite results: frozen until the next check stops it
        self.reason: str | None = None  # set when the trajectory ends
        self._graph: dict | None = None

    def graph(self) -> dict:
        self._graph = self.neighbours.graph(self.atoms, self.atom_indices)
        return self._graph

    def drift(self) -> None:
        """The step up to the force call: thermostat, half kick, full drift."""
        m, f, x = self.m, self.forces, self.atoms.positions.copy()
        if self.langevin:  # ase.md.langevin.Langevin.step, FixCom.adjust_positions
            v = self.p / m
            xi = self.rng.standard_normal(size=x.shape)
            eta = self.rng.standard_normal(size=x.shape)
            rnd_pos = self.c5 * eta
            self.rnd_vel = self.c3 * xi - self.c4 * eta
            v += self.c1 * f / m - self.c2 * v + self.rnd_vel
            new = x + self.dt * v + rnd_pos
            mass = m[:, 0]
            new += mass @ x / mass.sum() - mass @ new / mass.sum()
            self.atoms.positions = new
            self.v = (new - x - rnd_pos) / self.dt
        else:  # ase.md.bussi.Bussi.scale_velocities, then ase.md.verlet.VelocityVerlet.step
            kinetic = 0.5 * np.vdot(self.p, self.p / m)
            scaling = (1 - self.exp_term) * self.target_kinetic_energy / kinetic / self.dof
            r1 = self.rng.standard_normal()
            rest = 2.0 * self.rng.standard_gamma(0.5 * (self.dof - 1))
            alpha = math.sqrt(self.exp_term + scaling * (rest + r1**2)
                              + 2 * r1 * math.sqrt(self.exp_term * scaling))  # fmt: skip
            self.p = alpha * self.p + 0.5 * self.dt * f
            self.atoms.positions = x + self.dt * self.p / m

    def receive(self, pred: Prediction | None) -> None:
        """The forces at the new positions (None for a frozen walker): finish the step,
        check it every `check_every` steps."""
        if pred is not None:
            energy, forces = float(pred.energies.mean()), pred.forces.mean(axis=0)
            if self.forces is not None:  # the second half kick
                if self.langevin:
                    v = self.v + self.c1 * forces / self.m - self.c2 * self.v + self.rnd_vel
                    p = v * self.m
                    self.p = p - self.m * (p.sum(axis=0) / self.m.sum())  # FixCom.adjust_momenta
                else:
                    self.p = self.p + 0.5 * self.dt * forces
            first = self.forces is None
            self.forces, self.energy = forces, energy
            self.broken = not (np.isfinite(forces).all() and np.isfinite(energy))
            if first:
                return
        self.step += 1
        if self.step % self.settings.check_every:
            return
        dev = float(atomic_force_deviation(pred.forces).max()) if pred is not None else None
        temperature = np.vdot(self.p, self.p / self.m) / (self.dof * units.kB)
        reason = stop_reason(self.settings, self.temperature_K, self.energy, self.forces, dev,
                             self._min_distance, temperature)  # fmt: skip
        self.log.checked(self.step, reason, self.atoms, dev)
        if reason != "completed" or self.step >= self.settings.steps:
            self.reason = reason

    def _min_distance(self) -> float:
        g = self._graph
        if g is None or self.settings.min_distance >= self.neighbours.cutoff:
            return min_distance(self.atoms)
        pos = self.atoms.positions
        d = pos[g["senders"]] - pos[g["receivers"]] + g["shifts"] @ complete_cell(self.atoms.cell)
        return float(np.sqrt((d**2).sum(axis=1).min())) if len(d) else math.inf


def run_nvt_walkers(
    ensemble: Ensemble,
    jobs: Sequence[MDJob],
    settings: ExplorationSettings,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[Trajectory], BatchEvaluator]:
    """Run NVT `jobs` (Langevin or Bussi) as up to `settings.walkers` walkers advanced in
    lockstep; trajectories in job order."""
    if settings.thermostat not in ("langevin", "bussi") or any(j[2] is not None for j in jobs):
        raise ValueError("run_nvt_walkers runs NVT Langevin or Bussi jobs only")
    n = min(settings.walkers, len(jobs))
    evaluate = _evaluator(ensemble, jobs, n)
    out: list[Trajectory | None] = [None] * len(jobs)
    queue = iter(range(len(jobs)))
    active = [_NVTWalker(k, jobs[k], settings, ensemble) for k in islice(queue, n)]
    while active:
        live = [w for w in active if not w.broken]
        preds = evaluate([w.graph() for w in live]) if live else []
        by_walker = dict(zip(map(id, live), preds, strict=True))
        for w in active:
            w.receive(by_walker.get(id(w)))
        for w in active:
            if w.reason is not None:
                out[w.index] = w.log.trajectory(w.reason, w.step)
                if on_done is not None:
                    on_done()
        active = [w for w in active if w.reason is None]
        for w in active:
            if not w.broken:
                w.drift()
        while len(active) < n and (k := next(queue, None)) is not None:
            active.append(_NVTWalker(k, jobs[k], settings, ensemble))
    return out, evaluate  # type: ignore[return-value]


# -- any integrator: ASE's, one thread per walker ---------------------------------------------


class WalkerBatch:
    """Collects the force calls of the walkers' threads and evaluates them together."""

    def __init__(self, evaluate: BatchEvaluator, n_walkers: int):
        self.evaluate = evaluate
        self._members = n_walkers
        self._cond = threading.Condition()
        self._pending: dict[int, dict] = {}
        self._results: dict[int, Prediction | BaseException] = {}

    def request(self, key: int, graph: dict) -> Prediction:
        """Hand in one walker's graph; returns its prediction once the batch ran."""
        with self._cond:
            self._pending[key] = graph
            self._flush_if_full()
            while key not in self._results:
                self._cond.wait()
            out = self._results.pop(key)
        if isinstance(out, BaseException):
            raise out
        return out

    def leave(self) -> None:
        """A walker's thread has no more trajectories to run."""
        with self._cond:
            self._members -= 1
            self._flush_if_full()

    def _flush_if_full(self) -> None:
        if not self._pending or len(self._pending) < self._members:
            return
        keys = list(self._pending)
        graphs = [self._pending.pop(k) for k in keys]
        try:
            preds = self.evaluate(graphs)
        except Exception as exc:  # every waiting walker sees the error
            preds = [exc] * len(keys)
        self._results.update(zip(keys, preds, strict=True))
        self._cond.notify_all()


class WalkerCalculator(EnsembleCalculator):
    """`EnsembleCalculator` of one walker: its own neighbour list, the batch's evaluation."""

    def __init__(self, batch: WalkerBatch, ensemble: Ensemble, **kwargs):
        super().__init__(ensemble, **kwargs)
        self.batch = batch

    def _predict_graph(self, graph: dict, new_structure: bool) -> Prediction:
        return self.batch.request(id(self), graph)


def run_walkers(
    ensemble: Ensemble,
    jobs: Sequence[MDJob],
    settings: ExplorationSettings,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[Trajectory], BatchEvaluator]:
    """Run the MD `jobs` with ASE's integrators as up to `settings.walkers` threads whose
    force calls are batched; trajectories in job order. The first error of any walker is
    raised once every walker has stopped."""
    n = min(settings.walkers, len(jobs))
    evaluate = _evaluator(ensemble, jobs, n)
    batch = WalkerBatch(evaluate, n)
    out: list[Trajectory | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    queue = iter(range(len(jobs)))
    lock = threading.Lock()

    def walker() -> None:
        calc = WalkerCalculator(batch, ensemble)
        try:
            while not errors:
                with lock:
                    k = next(queue, None)
                if k is None:
                    return
                atoms, t, p, seed, parent_id = jobs[k]
                out[k] = run_md(atoms, calc, t, settings, p, seed, parent_id)
                if on_done is not None:
                    with lock:
                        on_done()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
        finally:
            batch.leave()

    threads = [threading.Thread(target=walker, name=f"walker-{i}") for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return out, evaluate  # type: ignore[return-value]


def run_trajectories(
    ensemble: Ensemble,
    jobs: Sequence[MDJob],
    settings: ExplorationSettings,
    on_done: Callable[[], None] | None = None,
) -> list[Trajectory]:
    """The MD `jobs` on the ensemble mean: batched walkers on the JAX backend when
    `settings.walkers` > 1 (numpy NVT walkers for Langevin and Bussi, ASE's integrators in
    threads otherwise), else one trajectory after the other."""
    batched = settings.walkers > 1 and len(jobs) > 1 and settings.steps > 0
    if ensemble.settings.backend == "jax" and batched:
        nvt = settings.thermostat in ("langevin", "bussi") and all(j[2] is None for j in jobs)
        return (run_nvt_walkers if nvt else run_walkers)(ensemble, jobs, settings, on_done)[0]
    calc = EnsembleCalculator(ensemble)
    trajs = []
    for atoms, t, p, seed, parent_id in jobs:
        trajs.append(run_md(atoms, calc, t, settings, p, seed, parent_id))
        if on_done is not None:
            on_done()
    return trajs
