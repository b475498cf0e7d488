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
import time
from collections.abc import Callable, Sequence
from functools import partial
from itertools import islice

import jax
import jraph
import numpy as np
from ase import Atoms, units
from ase.geometry import complete_cell
from ase.md.velocitydistribution import thermalize_momenta
from matscipy.neighbours import neighbour_list

from nequix_fw.ensemble import Ensemble, EnsembleCalculator, Prediction
from nequix_fw.exploration.md import FrameLog, Trajectory, energy_drift, run_md, stop_reason
from nequix_fw.graphs import bucket_size
from nequix_fw.settings import ExplorationSettings
from nequix_fw.structures import min_distance
from nequix_fw.uncertainty import atomic_force_deviation

MDJob = tuple  # (atoms, temperature_K, pressure_GPa | None, seed, parent_id)


class BatchEvaluator:
    """Ensemble calls over up to `n_walkers` graphs at fixed capacities.

    `n_walkers` + 1 graphs and the atoms of the `n_walkers` largest structures (`max_atoms`)
    + 1; the edge capacity is `max_atoms` times the most edges per atom seen, with
    `edge_headroom`, so a walker replaced by a larger start of similar density still fits; it
    only grows (and recompiles) when a batch exceeds it. `seconds` is the time spent in the
    ensemble's calls, padding included.
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
        self.seconds = 0.0

    def fit_edges(self, n_edge: int, edges_per_atom: float) -> int:
        """The edge capacity for a batch of `n_edge` edges (grown when needed)."""
        if n_edge > self.edge_capacity:
            need = max(n_edge, edges_per_atom * self.max_atoms) * self.edge_headroom
            self.edge_capacity = bucket_size(math.ceil(need), 64)
            self.capacity_changes += 1
        return self.edge_capacity

    def __call__(self, graphs: list[dict]) -> list[Prediction]:
        t0 = time.perf_counter()
        n_edge = sum(int(g["n_edge"][0]) for g in graphs)
        density = max(int(g["n_edge"][0]) / int(g["n_node"][0]) for g in graphs)
        capacity = self.fit_edges(n_edge, density)
        out = self.ensemble.predict_graphs(graphs, self.n_graph, self.n_node, capacity)
        self._count(len(graphs), t0)
        return out

    def dispatch(self, graph: jraph.GraphsTuple) -> list:
        """Start the ensemble's call on a padded batch (asynchronous)."""
        t0 = time.perf_counter()
        out = self.ensemble.dispatch(graph, md=True)
        self.seconds += time.perf_counter() - t0
        return out

    def collect(self, dispatched: list, n_walkers: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-model energies (M, n_walkers) and forces (M, atoms, 3) of a dispatched batch."""
        t0 = time.perf_counter()
        energies, forces, _ = self.ensemble.collect(dispatched)
        self._count(n_walkers, t0)
        return energies[:, :n_walkers], forces

    def _count(self, n_walkers: int, t0: float) -> None:
        self.calls += 1
        self.walker_steps += n_walkers
        self.seconds += time.perf_counter() - t0


def _evaluator(ensemble: Ensemble, jobs: Sequence[MDJob], n: int) -> BatchEvaluator:
    largest = sorted((len(job[0]) for job in jobs), reverse=True)[:n]
    return BatchEvaluator(ensemble, n, sum(largest))


# -- NVT walkers in numpy, in lockstep --------------------------------------------------------


class _NVTWalker:
    """One NVT trajectory of a batched run: its random stream, thermostat constants,
    neighbour list (cutoff + skin, rebuilt when an atom has moved skin/2), checks and frames.
    Its positions and momenta live in the lockstep's arrays."""

    def __init__(self, index: int, job: MDJob, settings: ExplorationSettings, ensemble: Ensemble):
        atoms, temperature_K, _, seed, parent_id = job
        ensemble.check_covered(atoms, f"structure {parent_id}")
        self.index, self.settings, self.temperature_K = index, settings, temperature_K
        self.rng = np.random.default_rng(seed)
        self.atoms = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        thermalize_momenta(self.atoms, temperature_K, rng=self.rng)
        self.n = len(atoms)
        self.masses = self.atoms.get_masses()[:, None]
        self.species = np.array([ensemble._atom_indices[z] for z in atoms.numbers], np.int32)
        self.cell = complete_cell(atoms.cell)
        dt = settings.timestep_fs * units.fs
        kt = units.kB * temperature_K
        if settings.thermostat == "langevin":  # ase.md.langevin.Langevin.updatevars
            fr = settings.friction_per_fs / units.fs
            sigma = np.sqrt(2 * kt * fr / self.masses)
            self.c3 = np.sqrt(dt) * sigma / 2.0 - dt**1.5 * fr * sigma / 8.0
            self.c5 = dt**1.5 * sigma / (2 * np.sqrt(3))
            self.c4 = fr / 2.0 * self.c5
            self.dof = 3 * self.n - 3  # FixCom removes the centre-of-mass motion
        else:  # ase.md.bussi.Bussi
            self.dof = 3 * self.n
            self.exp_term = math.exp(-dt / (settings.taut_fs * units.fs))
            self.target_kinetic_energy = 0.5 * kt * self.dof
            self.transferred_energy = 0.0
        self.log = FrameLog(settings, parent_id, temperature_K, None, seed)
        self.step = 0
        self.started = False  # forces at the starting positions received
        self.energy = 0.0
        self.broken = False  # non-finite results: frozen until the next check stops it
        self.reason: str | None = None  # set when the trajectory ends
        self.pairs: tuple[np.ndarray, ...] | None = None  # i, j, shifts, shift vectors (Å)

    def build_pairs(self, positions: np.ndarray, cutoff: float) -> None:
        i, j, shifts = neighbour_list(
            "ijS", positions=positions, cell=self.cell, pbc=self.atoms.pbc, cutoff=cutoff
        )
        self.pairs = (
            i.astype(np.int64),
            j.astype(np.int64),
            shifts.astype(np.float32),
            shifts.astype(np.float64) @ self.cell,
        )
        self.built_at = positions.copy()

    def bussi_alpha(self, kinetic_energy: float) -> float:
        """ase.md.bussi.Bussi.calculate_alpha (Eq. A7), drawing from this walker's stream; the
        energy the thermostat exchanges is tracked as Bussi.scale_velocities does."""
        scaling = (1 - self.exp_term) * self.target_kinetic_energy / kinetic_energy / self.dof
        r1 = self.rng.standard_normal()
        rest = 2.0 * self.rng.standard_gamma(0.5 * (self.dof - 1))
        alpha = math.sqrt(
            self.exp_term + scaling * (rest + r1**2) + 2 * r1 * math.sqrt(self.exp_term * scaling)
        )
        self.transferred_energy += (alpha**2 - 1.0) * kinetic_energy
        return alpha

    def check(self, positions, momenta, forces, member_forces, min_dist) -> None:
        """`run_md`'s check of this walker at its current step."""
        dev = float(atomic_force_deviation(member_forces).max())
        kinetic = 0.5 * np.vdot(momenta, momenta / self.masses)
        temperature = 2 * kinetic / (self.dof * units.kB)
        drift = None
        if self.settings.thermostat == "bussi":
            h = self.energy + kinetic - self.transferred_energy
            drift = energy_drift(h, self.h0, self.n, self.step * self.settings.timestep_fs)
        reason = stop_reason(
            self.settings,
            self.temperature_K,
            self.energy,
            forces,
            dev,
            min_dist,
            temperature,
            drift,
        )
        self.atoms.positions = positions
        self.log.checked(self.step, reason, self.atoms, dev, drift)
        if reason != "completed" or self.step >= self.settings.steps:
            self.reason = reason


class _Lockstep:
    """The running walkers' positions, momenta and forces in concatenated arrays (each walker a
    contiguous range), advanced together with ASE's equations written for arrays."""

    def __init__(
        self,
        walkers: list[_NVTWalker],
        old: _Lockstep | None,
        settings,
        cutoff,
        skin,
        filter_pairs: bool,
    ):
        self.walkers = walkers
        self.settings, self.cutoff, self.skin = settings, cutoff, skin
        self.filter_pairs = filter_pairs
        self.dt = settings.timestep_fs * units.fs
        counts = np.array([w.n for w in walkers])
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.owner = np.repeat(np.arange(len(walkers)), counts)
        kept = {}
        for w, a, b in old.ranges() if old is not None else ():
            kept[id(w)] = (old.x[a:b], old.p[a:b], old.f[a:b])
        parts = [
            kept.get(id(w)) or (w.atoms.positions.copy(), w.atoms.get_momenta(), np.zeros((w.n, 3)))
            for w in walkers
        ]
        self.x = np.concatenate([q[0] for q in parts])
        self.p = np.concatenate([q[1] for q in parts])
        self.f = np.concatenate([q[2] for q in parts])
        self.m = np.concatenate([w.masses for w in walkers])
        self.species = np.concatenate([w.species for w in walkers])
        self.langevin = settings.thermostat == "langevin"
        if self.langevin:
            fr = settings.friction_per_fs / units.fs
            self.c1 = self.dt / 2.0 - self.dt * self.dt * fr / 8.0
            self.c2 = self.dt * fr / 2 - self.dt * self.dt * fr * fr / 8.0
            self.c3 = np.concatenate([w.c3 for w in walkers])
            self.c4 = np.concatenate([w.c4 for w in walkers])
            self.c5 = np.concatenate([w.c5 for w in walkers])
        self._pairs: tuple[np.ndarray, ...] | None = None

    def ranges(self):
        for w, a in zip(self.walkers, self.starts, strict=True):
            yield w, a, a + w.n

    def _segment_sum(self, values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(values, self.starts, axis=0)

    def _stepping(self) -> np.ndarray:
        """(atoms, 1) whether each atom's walker takes steps (started, results finite)."""
        return np.repeat(
            [w.started and not w.broken for w in self.walkers], [w.n for w in self.walkers]
        )[:, None]

    def drift(self) -> None:
        """Every started, unbroken walker up to its force call: thermostat, half kick, drift."""
        moving = self._stepping()
        x, m = self.x.copy(), self.m
        if self.langevin:  # ase.md.langevin.Langevin.step with FixCom.adjust_positions
            xi, eta = np.zeros_like(x), np.zeros_like(x)
            for w, a, b in self.ranges():
                if w.started and not w.broken:
                    xi[a:b] = w.rng.standard_normal(size=(w.n, 3))
                    eta[a:b] = w.rng.standard_normal(size=(w.n, 3))
            rnd_pos = self.c5 * eta
            self.rnd_vel = self.c3 * xi - self.c4 * eta
            v = self.p / m
            v += self.c1 * self.f / m - self.c2 * v + self.rnd_vel
            new = x + self.dt * v + rnd_pos
            mass = self._segment_sum(m)
            new += ((self._segment_sum(m * x) - self._segment_sum(m * new)) / mass)[self.owner]
            self.v = (new - x - rnd_pos) / self.dt
            self.x = np.where(moving, new, x)
        else:  # ase.md.bussi.Bussi.scale_velocities, then VelocityVerlet.step
            kinetic = 0.5 * self._segment_sum((self.p * self.p / m).sum(axis=1))
            alpha = np.array(
                [
                    w.bussi_alpha(k) if w.started and not w.broken else 1.0
                    for w, k in zip(self.walkers, kinetic, strict=True)
                ]
            )
            p = alpha[self.owner, None] * self.p + 0.5 * self.dt * self.f
            self.p = np.where(moving, p, self.p)
            self.x = np.where(moving, x + self.dt * self.p / m, x)

    def graph(self, evaluate: BatchEvaluator) -> jraph.GraphsTuple:
        """The padded batch of all walkers' graphs at the evaluator's capacities.

        With `filter_pairs` only the pairs within the cutoff become edges (recomputed each
        step in numpy: on CPU the model's work dominates); without, every pair within cutoff +
        skin does, so the edges change only when a walker rebuilds its list. That gives the
        same energies and forces, since nequix's radial envelope is exactly zero beyond the
        cutoff, and moves the host's per-step work to the device (a GPU's choice).
        """

        cut = self.cutoff + self.skin
        rebuilt = self._pairs is None
        for w, a, b in self.ranges():
            moved = (
                0.0
                if w.pairs is None
                else np.sqrt(((self.x[a:b] - w.built_at) ** 2).sum(axis=1).max())
            )
            if w.pairs is None or self.skin <= 0 or self.cutoff + 2 * moved > cut:
                w.build_pairs(self.x[a:b], cut)
                rebuilt = True
        if rebuilt:
            pairs = [w.pairs for w in self.walkers]
            self._pairs = (
                np.concatenate([q[0] + a for q, a in zip(pairs, self.starts, strict=True)]),
                np.concatenate([q[1] + a for q, a in zip(pairs, self.starts, strict=True)]),
                np.concatenate([q[2] for q in pairs]),
                np.concatenate([q[3] for q in pairs]) if self.filter_pairs else None,
                np.repeat(np.arange(len(pairs)), [len(q[0]) for q in pairs]),
            )
        if rebuilt or self.filter_pairs:
            i, j, shifts, vectors, owner = self._pairs
            if self.filter_pairs:
                d = self.x[j] - self.x[i] + vectors
                keep = np.einsum("ij,ij->i", d, d) < self.cutoff**2
                i, j, shifts, owner = i[keep], j[keep], shifts[keep], owner[keep]
            self._edges = self._pad_edges(evaluate, i, j, shifts, owner)
        n_node, n_edge, senders, receivers, edge_shifts, cells = self._edges
        positions = np.zeros((evaluate.n_node, 3), np.float32)
        positions[: len(self.x)] = self.x
        species = np.zeros(evaluate.n_node, np.int32)
        species[: len(self.x)] = self.species
        return jraph.GraphsTuple(
            n_node=n_node,
            n_edge=n_edge,
            nodes={"species": species, "positions": positions, "forces": None},
            edges={"shifts": edge_shifts},
            senders=senders,
            receivers=receivers,
            globals={"cell": cells, "energy": None, "stress": None},
        )

    def _pad_edges(self, evaluate, i, j, shifts, owner) -> tuple[np.ndarray, ...]:
        n_edge = np.bincount(owner, minlength=len(self.walkers))
        n_atoms, counts = len(self.x), [w.n for w in self.walkers]
        capacity = evaluate.fit_edges(len(i), float((n_edge / counts).max()))
        extra = evaluate.n_graph - len(self.walkers) - 1
        nodes = np.concatenate([counts, [evaluate.n_node - n_atoms], [0] * extra])
        edges = np.concatenate([n_edge, [capacity - len(i)], [0] * extra])
        senders = np.full(capacity, n_atoms, np.int32)
        receivers = np.full(capacity, n_atoms, np.int32)
        senders[: len(i)], receivers[: len(i)] = j, i
        edge_shifts = np.zeros((capacity, 3), np.float32)
        edge_shifts[: len(i)] = shifts
        cells = np.zeros((evaluate.n_graph, 3, 3), np.float32)
        cells[: len(self.walkers)] = [w.cell for w in self.walkers]
        return (
            nodes.astype(np.int32),
            edges.astype(np.int32),
            senders,
            receivers,
            edge_shifts,
            cells,
        )

    def receive(self, energies: np.ndarray, member_forces: np.ndarray) -> None:
        """Forces at the new positions: finish each walker's step and check it every
        `check_every` steps."""
        n_atoms = len(self.x)
        forces = member_forces[:, :n_atoms].mean(axis=0)
        finishing = self._stepping()
        if self.langevin:  # the second half of Langevin.step, then FixCom.adjust_momenta
            v = self.v + self.c1 * forces / self.m - self.c2 * self.v + self.rnd_vel
            p = v * self.m
            p -= self.m * (self._segment_sum(p) / self._segment_sum(self.m))[self.owner]
        else:
            p = self.p + 0.5 * self.dt * forces
        self.p = np.where(finishing, p, self.p)
        for k, (w, a, b) in enumerate(self.ranges()):
            if not w.broken:
                w.energy = float(energies[:, k].mean())
                self.f[a:b] = forces[a:b]
                w.broken = not (np.isfinite(forces[a:b]).all() and np.isfinite(w.energy))
            if not w.started:
                w.started = True
                w.h0 = w.energy + 0.5 * np.vdot(self.p[a:b], self.p[a:b] / self.m[a:b])
                continue
            w.step += 1
            if w.step % self.settings.check_every == 0:
                min_dist = partial(self._min_distance, w, self.x[a:b])
                w.check(self.x[a:b], self.p[a:b], self.f[a:b], member_forces[:, a:b], min_dist)

    def _min_distance(self, w: _NVTWalker, x: np.ndarray) -> float:
        if self.settings.stop_min_distance_A >= self.cutoff:
            return min_distance(Atoms(w.atoms.numbers, x, cell=w.cell, pbc=w.atoms.pbc))
        i, j, _, vectors = w.pairs
        d = x[j] - x[i] + vectors
        return float(np.sqrt(np.einsum("ij,ij->i", d, d).min())) if len(d) else math.inf


def run_nvt_walkers(
    ensemble: Ensemble,
    jobs: Sequence[MDJob],
    settings: ExplorationSettings,
    on_done: Callable[[], None] | None = None,
    filter_pairs: bool | None = None,
) -> tuple[list[Trajectory], BatchEvaluator]:
    """Run NVT `jobs` (Langevin or Bussi) as up to `settings.walkers` walkers advanced in
    lockstep; trajectories in job order. `filter_pairs` (default: on CPU only): see
    `_Lockstep.graph`.

    From 8 walkers on, the walkers form two halves that take turns: while the ensemble
    evaluates one half (asynchronously, on the GPU), the other half's integration and graph
    are done in numpy, so the host's work hides behind the device's.
    """
    if settings.thermostat not in ("langevin", "bussi") or any(j[2] is not None for j in jobs):
        raise ValueError("run_nvt_walkers runs NVT Langevin or Bussi jobs only")
    if filter_pairs is None:
        filter_pairs = jax.default_backend() == "cpu"
    n = min(settings.walkers, len(jobs))
    sizes = [n] if n < 8 else [n - n // 2, n // 2]
    evaluate = _evaluator(ensemble, jobs, sizes[0])
    out: list[Trajectory | None] = [None] * len(jobs)
    queue = iter(range(len(jobs)))
    walkers = [
        [_NVTWalker(k, jobs[k], settings, ensemble) for k in islice(queue, size)] for size in sizes
    ]
    states: list[_Lockstep | None] = [None] * len(sizes)
    pending: list[list | None] = [None] * len(sizes)

    def advance(g: int) -> None:  # integrate group g up to its force call, and dispatch it
        if walkers[g]:
            if states[g] is None or states[g].walkers is not walkers[g]:
                states[g] = _Lockstep(
                    walkers[g],
                    states[g],
                    settings,
                    ensemble.cutoff,
                    ensemble.settings.skin_A,
                    filter_pairs,
                )
            states[g].drift()
            pending[g] = evaluate.dispatch(states[g].graph(evaluate))

    for g in range(len(sizes)):
        advance(g)
    while any(p is not None for p in pending):
        for g, size in enumerate(sizes):
            if pending[g] is None:
                continue
            energies, forces = evaluate.collect(pending[g], len(walkers[g]))
            pending[g] = None
            states[g].receive(energies, forces)
            done = [w for w in walkers[g] if w.reason is not None]
            if done:
                for w in done:
                    out[w.index] = w.log.trajectory(w.reason, w.step)
                    if on_done is not None:
                        on_done()
                walkers[g] = [w for w in walkers[g] if w.reason is None]
                while len(walkers[g]) < size and (k := next(queue, None)) is not None:
                    walkers[g].append(_NVTWalker(k, jobs[k], settings, ensemble))
            advance(g)
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
