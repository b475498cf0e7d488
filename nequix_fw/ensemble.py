"""Batched ensemble evaluation of Nequix models, and an ASE `EnsembleCalculator`.

The fast path (``backend="jax"``):

- one neighbour list per structure, shared by all models (they must share cutoff and elements);
- models of the same architecture are evaluated together in one compiled call: their
  parameters are stacked and the model is `vmap`-ed over them (GPU) or mapped over them in
  sequence (`lax.map`, CPU: faster there than vmap's batched contractions);
- several structures per padded batch; batch sizes are rounded up to a small set of size buckets
  so that JAX compiles once per bucket, not once per structure;
- JAX's persistent compilation cache, so a second process does not compile again;
- a model with LLPR heads (`nequix_fw.llpr`, a ``.llpr.npz`` beside its checkpoint) counts as
  its K heads: one forward pass, the heads' deviations through its last layer.

The ensemble's predictions come in rows, one per member or head; spreads are over rows.

``backend="torch"`` (or mixed checkpoints you want evaluated by torch) runs nequix's own
`NequixCalculator` per model and structure: slower, but the same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.data import chemical_symbols
from ase.geometry import complete_cell
from ase.stress import full_3x3_to_voigt_6_stress
from matscipy.neighbours import neighbour_list
from nequix.data import atomic_numbers_to_indices, dict_to_graphstuple

from nequix_fw.descriptors import graph_geometry
from nequix_fw.errors import ModelError, StructureError
from nequix_fw.graphs import (
    bucket_size,
    build_graph,
    configure_compilation_cache,
    pack_batches,
    pad_batch,
)
from nequix_fw.llpr import LastLayerHeads, apply_heads, load_heads
from nequix_fw.models import NequixModel, load_model, resolve_model_path
from nequix_fw.settings import EnsembleSettings
from nequix_fw.structures import Frame, structure_id
from nequix_fw.uncertainty import ensemble_metrics

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """Per-row predictions for one structure (M rows: members or LLPR heads; N atoms)."""

    energies: np.ndarray  # (M,) eV
    forces: np.ndarray  # (M, N, 3) eV/Å
    stresses: np.ndarray | None  # (M, 6) Voigt, eV/Å³, ASE sign; None unless fully periodic

    @property
    def finite(self) -> np.ndarray:
        """(M,) whether each model's prediction is finite."""
        ok = np.isfinite(self.energies) & np.isfinite(self.forces).all(axis=(1, 2))
        if self.stresses is not None:
            ok &= np.isfinite(self.stresses).all(axis=1)
        return ok


@dataclass
class EnsembleRecord:
    """One evaluated structure: provenance, predictions, metrics and status."""

    frame: Frame
    id: str
    prediction: Prediction
    metrics: dict
    status: str  # "ok" | "failed"
    error: str | None = None
    #: `descriptors.geometry` of the structure, from the models' own neighbour graph (when
    #: their cutoff covers the descriptor's range), so that diverse selection need not
    #: build another neighbour list
    geometry: np.ndarray | None = None


def _apply_vmap(stacked, graph, static):
    return jax.vmap(lambda params: eqx.combine(params, static)(graph))(stacked)


def _apply_map(stacked, graph, static):
    return jax.lax.map(lambda params: eqx.combine(params, static)(graph), stacked)


class _StackedGroup:
    """Models of one architecture, parameters stacked along a leading model axis, with one
    compiled function per (mapping, XLA options) asked for."""

    def __init__(self, indices: list[int], modules: list):
        self.indices = indices
        params, self.static = eqx.partition(modules[0], eqx.is_array)
        treedef = jax.tree_util.tree_structure(params)
        # Same architecture means same leaves in the same order; e3nn's static parts compare by
        # identity, so all members are re-hung on the first member's tree structure.
        leaves = [jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_array)) for m in modules]
        self.stacked = jax.tree_util.tree_unflatten(
            treedef, [jnp.stack(xs) for xs in zip(*leaves, strict=True)]
        )
        self._fns: dict[str, Callable] = {}

    def __call__(self, graph, vmap: bool, xla_options: dict):
        key = repr((vmap, sorted(xla_options.items())))
        if key not in self._fns:
            apply = _apply_vmap if vmap else _apply_map
            self._fns[key] = jax.jit(
                partial(apply, static=self.static), compiler_options=dict(xla_options) or None
            )
        return self._fns[key](self.stacked, graph)


class _HeadsGroup:
    """One model with LLPR heads: its K heads' predictions from one compiled call."""

    def __init__(self, indices: list[int], module, heads: LastLayerHeads):
        self.indices = indices
        self.params, self.static = eqx.partition(module, eqx.is_array)
        self.deviations = jnp.asarray(heads.deviations, dtype=jnp.float32)
        self._fn = jax.jit(
            lambda params, deviations, graph: apply_heads(
                eqx.combine(params, self.static), deviations, graph
            )
        )

    def __call__(self, graph, vmap: bool, xla_options: dict):
        return self._fn(self.params, self.deviations, graph)


def _architecture_key(model: NequixModel, module) -> str:
    shapes = [x.shape for x in jax.tree_util.tree_leaves(eqx.filter(module, eqx.is_array))]
    return repr((sorted(model.info.architecture.items()), model.atomic_numbers, shapes))


class Ensemble:
    """N Nequix models sharing elements and cutoff, evaluated together."""

    def __init__(
        self,
        models: Sequence[NequixModel],
        settings: EnsembleSettings | None = None,
        heads: Sequence[LastLayerHeads | None] | None = None,
    ):
        if not models:
            raise ModelError("no models given")
        self.models = list(models)
        self.settings = settings or EnsembleSettings()
        self.heads = list(heads) if heads is not None else [None] * len(self.models)
        #: the model of each prediction row (a member, or one of its LLPR heads)
        self.row_model = [
            i for i, h in enumerate(self.heads) for _ in range(1 if h is None else h.n_heads)
        ]
        first = self.models[0]
        for m in self.models[1:]:
            if m.atomic_numbers != first.atomic_numbers:
                a, b = set(first.atomic_numbers), set(m.atomic_numbers)
                diff = sorted(a ^ b)
                raise ModelError(
                    f"models {first.info.path} and {m.info.path} cover different elements "
                    f"(differ in {', '.join(chemical_symbols[z] for z in diff)})"
                )
            if m.cutoff != first.cutoff:
                raise ModelError(
                    f"models {first.info.path} and {m.info.path} have different cutoffs "
                    f"({first.cutoff} Å vs {m.cutoff} Å)"
                )
        self.atomic_numbers = first.atomic_numbers
        self.cutoff = first.cutoff
        self._atom_indices = atomic_numbers_to_indices(self.atomic_numbers)
        if self.settings.backend == "jax":
            configure_compilation_cache(self.settings.compilation_cache_dir)
            on_cpu = jax.default_backend() == "cpu"
            self.max_edges_per_batch = self.settings.max_edges_per_batch or (
                8192 if on_cpu else 32768
            )
            mapping, options = self.settings.member_mapping, self.settings.xla_options
            # (vmap, XLA options) for batch evaluation and for MD: see EnsembleSettings
            self._compiled = {
                md: (
                    mapping == "vmap" or (mapping == "auto" and md and not on_cpu),
                    options
                    if options is not None
                    else {}
                    if on_cpu or md
                    else {"xla_gpu_autotune_level": 0},
                )
                for md in (False, True)
            }
            modules = [m.jax_module() for m in self.models]
            groups: dict[object, list[int]] = {}
            self._groups: list = []
            for i, module in enumerate(modules):
                if self.heads[i] is not None:
                    self._groups.append(_HeadsGroup(self.model_rows(i), module, self.heads[i]))
                else:
                    groups.setdefault(_architecture_key(self.models[i], module), []).append(i)
            self._groups += [
                _StackedGroup([self.model_rows(i)[0] for i in idx], [modules[i] for i in idx])
                for idx in groups.values()
            ]
        else:
            if any(h is not None for h in self.heads):
                raise ModelError(
                    "LLPR heads are evaluated by the JAX backend: set ensemble.backend: jax"
                )
            self._calculators = [m.calculator(backend="torch") for m in self.models]

    @classmethod
    def from_specs(
        cls, specs: Sequence[str | Path], settings: EnsembleSettings | None = None
    ) -> Ensemble:
        """Load models from paths or pretrained names (a file given twice is read once), with
        the LLPR heads found beside them."""
        loaded: dict[Path, NequixModel] = {}
        models = []
        for spec in specs:
            path = resolve_model_path(spec)[1].resolve()
            if path not in loaded:
                loaded[path] = load_model(spec)
            models.append(loaded[path])
        return cls(models, settings, [load_heads(m) for m in models])

    def __len__(self) -> int:
        """Prediction rows: members, each model with LLPR heads counting as its heads."""
        return len(self.row_model)

    def model_rows(self, i: int) -> list[int]:
        """The prediction rows of model `i`."""
        return [r for r, m in enumerate(self.row_model) if m == i]

    @property
    def uncertainty_method(self) -> str:
        """'ensemble' (members' spread), 'llpr' (one model's heads), or 'ensemble+llpr'."""
        with_heads = sum(h is not None for h in self.heads)
        if not with_heads:
            return "ensemble"
        return "llpr" if with_heads == len(self.models) == 1 else "ensemble+llpr"

    def model_infos(self) -> list[dict]:
        """Each model's metadata, with its LLPR heads' where it has them."""
        out = []
        for m, h in zip(self.models, self.heads, strict=True):
            info = m.info.to_dict()
            if h is not None:
                info["llpr"] = h.info()
            out.append(info)
        return out

    def check_distinct(self) -> None:
        """Refuse members that are copies of one model (the same file or the same weights):
        copies agree everywhere, so their spread would call every structure accurate."""
        seen: dict[str, str] = {}
        for m in self.models:
            if m.info.sha256 in seen:
                raise ModelError(
                    f"models {seen[m.info.sha256]} and {m.info.path} are the same model "
                    f"(sha256 {m.info.sha256[:12]}): copies have no spread, so every structure "
                    "would look accurate; give different models"
                )
            seen[m.info.sha256] = m.info.path

    @property
    def n_architectures(self) -> int:
        return len(self._groups) if self.settings.backend == "jax" else len(self.models)

    @property
    def elements(self) -> list[str]:
        return [chemical_symbols[z] for z in self.atomic_numbers]

    def check_covered(self, atoms: Atoms, where: str) -> None:
        """Raise `StructureError` if `atoms` holds elements the models do not cover."""
        missing = sorted(set(int(z) for z in atoms.numbers) - set(self.atomic_numbers))
        if missing:
            names = ", ".join(chemical_symbols[z] for z in missing)
            raise StructureError(
                f"{where}: contains {names}, which the models do not cover "
                f"(they cover {len(self.atomic_numbers)} elements: "
                f"{_summarise(self.elements)}). Remove it or use other models."
            )

    # -- evaluation ---------------------------------------------------------------------------

    def predict(
        self, structures: Sequence[Atoms], on_batch: Callable[[int], None] | None = None
    ) -> list[Prediction]:
        """Per-model energies, forces and stresses for each structure.

        `on_batch(n)` is called after each batch with the number of structures it held.
        """
        return self._predict_with_graphs(structures, on_batch)[0]

    def _predict_with_graphs(
        self, structures: Sequence[Atoms], on_batch: Callable[[int], None] | None = None
    ) -> tuple[list[Prediction], list[dict] | None]:
        """`predict`, and the neighbour graphs it built (None with the torch backend, whose
        calculators build their own)."""
        if not structures:
            return [], []
        if self.settings.backend == "torch":
            preds = []
            for a in structures:
                preds.append(self._predict_torch(a))
                if on_batch is not None:
                    on_batch(1)
            return preds, None
        graphs = [build_graph(a, self._atom_indices, self.cutoff) for a in structures]
        batches = (
            [[0]]
            if len(graphs) == 1
            else pack_batches(
                [int(g["n_edge"][0]) for g in graphs],
                self.max_edges_per_batch,
                self.settings.max_structures_per_batch,
            )
        )
        out: list[Prediction | None] = [None] * len(structures)
        for batch in batches:
            for i, pred in zip(batch, self._predict_batch([graphs[i] for i in batch]), strict=True):
                if not structures[i].pbc.all():
                    pred.stresses = None
                out[i] = pred
            if on_batch is not None:
                on_batch(len(batch))
        return out, graphs  # type: ignore[return-value]

    def predict_graphs(
        self, graphs: list[dict], n_graph: int, n_node: int, n_edge: int
    ) -> list[Prediction]:
        """Predictions for prebuilt graphs padded to fixed capacities (`n_graph` structures
        with one spare, `n_node` atoms with one spare, `n_edge` edges): one compilation for
        every call with the same capacities, whatever the graphs. Stresses are for fully
        periodic cells only; callers drop them for the others."""
        return self._predict_batch(graphs, n_edge, n_graph, n_node, md=True)

    def _predict_batch(
        self,
        graphs: list[dict],
        n_edge: int | None = None,
        n_graph: int | None = None,
        n_node: int | None = None,
        md: bool = False,
    ) -> list[Prediction]:
        if n_graph is None:
            n_graph = 2 if len(graphs) == 1 else self.settings.max_structures_per_batch + 1
        padded = pad_batch([dict_to_graphstuple(g) for g in graphs], n_graph, n_edge, n_node)
        energies, forces, stress = self.collect(self.dispatch(padded, md))
        preds = []
        start = 0
        for k, g in enumerate(graphs):
            n = int(g["n_node"][0])
            preds.append(
                Prediction(
                    energies=energies[:, k].copy(),
                    forces=forces[:, start : start + n].copy(),
                    stresses=np.stack([full_3x3_to_voigt_6_stress(s) for s in stress[:, k]]),
                )
            )
            start += n
        return preds

    def dispatch(self, padded, md: bool) -> list:
        """Start the evaluation of a padded nequix `GraphsTuple` of G graphs and N nodes and
        return at once (JAX runs it asynchronously); `collect` waits for the results. `md`:
        compiled as for MD (many calls of one shape) rather than for batch evaluation."""
        vmap, options = self._compiled[md]
        return [(group.indices, group(padded, vmap, options)) for group in self._groups]

    def collect(self, dispatched: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-row energies (M, G) in eV, forces (M, N, 3) in eV/Å and 3x3 stresses
        (M, G, 3, 3) in eV/Å³ of a `dispatch` (M rows: see `row_model`)."""
        m = len(self.row_model)
        _, (e, f, _) = dispatched[0]
        energies = np.zeros((m, e.shape[-1]))
        forces = np.zeros((m, f.shape[-2], 3))
        stress = np.zeros((m, e.shape[-1], 3, 3))
        for indices, (e, f, s) in dispatched:
            energies[indices] = np.asarray(e)
            forces[indices] = np.asarray(f)
            stress[indices] = np.asarray(s)
        return energies, forces, stress

    def _predict_torch(self, atoms: Atoms) -> Prediction:
        energies, forces, stresses = [], [], []
        for calc in self._calculators:
            calc.reset()
            calc.calculate(atoms.copy(), ["energy", "forces"], all_changes)
            energies.append(calc.results["energy"])
            forces.append(calc.results["forces"][: len(atoms)])
            stresses.append(calc.results.get("stress"))
        has_stress = atoms.pbc.all() and all(s is not None for s in stresses)
        return Prediction(
            energies=np.array(energies, dtype=np.float64),
            forces=np.array(forces, dtype=np.float64),
            stresses=np.array(stresses, dtype=np.float64) if has_stress else None,
        )

    def evaluate(
        self, frames: Iterable[Frame], on_batch: Callable[[int], None] | None = None
    ) -> Iterator[EnsembleRecord]:
        """Stream records for `frames` in input order, holding one chunk in memory at a time."""
        chunk: list[Frame] = []
        for frame in frames:
            self.check_covered(frame.atoms, f"{frame.source} frame {frame.frame}")
            chunk.append(frame)
            if len(chunk) >= self.settings.chunk_size:
                yield from self._evaluate_chunk(chunk, on_batch)
                chunk = []
        if chunk:
            yield from self._evaluate_chunk(chunk, on_batch)

    def _evaluate_chunk(self, frames: list[Frame], on_batch=None) -> Iterator[EnsembleRecord]:
        structures = [f.atoms for f in frames]
        preds, graphs = self._predict_with_graphs(structures, on_batch)
        geometries = [None] * len(frames)
        if graphs is not None:
            pairs = zip(structures, graphs, strict=True)
            geometries = [graph_geometry(a, g, self.cutoff) for a, g in pairs]
        names = [self.models[m].info.name for m in self.row_model]
        for frame, pred, geo in zip(frames, preds, geometries, strict=True):
            finite = pred.finite
            if finite.all():
                metrics = ensemble_metrics(pred.energies, pred.forces, pred.stresses)
                status, error = "ok", None
            else:
                bad = list(dict.fromkeys(names[i] for i in np.flatnonzero(~finite)))
                metrics = {k: None for k in ensemble_metrics([0.0], np.zeros((1, 1, 3)), None)}
                status, error = "failed", f"non-finite prediction from {', '.join(bad)}"
            yield EnsembleRecord(
                frame=frame,
                id=structure_id(frame.atoms),
                prediction=pred,
                metrics=metrics,
                status=status,
                error=error,
                geometry=geo,
            )


def _summarise(items: list[str], limit: int = 12) -> str:
    if len(items) <= limit:
        return " ".join(items)
    return " ".join(items[:limit]) + f" ... ({len(items) - limit} more)"


class NeighbourCache:
    """A neighbour list built at cutoff + skin and reused while no pair can cross the cutoff.

    Between rebuilds only the distances of the listed pairs are recomputed. The list stays
    valid while ``cutoff + 2 d <= (cutoff + skin) (1 - e)``, with ``d`` the largest atomic
    displacement (in fractional coordinates, measured in the current cell) and ``e`` the
    spectral norm of the cell's deformation since the build, so NPT cells are handled too.
    """

    def __init__(self, cutoff: float, skin: float):
        self.cutoff, self.skin = float(cutoff), float(skin)
        self.builds = 0
        self._key = None

    def graph(self, atoms: Atoms, atom_indices: dict[int, int]) -> dict:
        """nequix's graph dict for `atoms` (same edges as `build_graph`)."""
        cell = complete_cell(atoms.cell)
        if self.skin <= 0 or not self._valid(atoms, cell):
            self._build(atoms, cell, atom_indices)
        d = atoms.positions[self._j] - atoms.positions[self._i] + self._shifts @ cell
        keep = np.einsum("ij,ij->i", d, d) < self.cutoff**2
        return {
            "n_node": np.array([len(atoms)], dtype=np.int32),
            "n_edge": np.array([int(keep.sum())], dtype=np.int32),
            "senders": self._j[keep],
            "receivers": self._i[keep],
            "species": self._species,
            "positions": atoms.positions.astype(np.float32),
            "shifts": self._shifts[keep].astype(np.float32),
            "cell": cell.astype(np.float32),
        }

    def _build(self, atoms: Atoms, cell: np.ndarray, atom_indices: dict[int, int]) -> None:
        i, j, shifts = neighbour_list(
            "ijS",
            positions=atoms.positions,
            cell=cell,
            pbc=atoms.pbc,
            cutoff=self.cutoff + self.skin,
        )
        self._i, self._j = i.astype(np.int32), j.astype(np.int32)
        self._shifts = shifts.astype(np.float64)
        self._species = np.array([atom_indices[z] for z in atoms.numbers], dtype=np.int32)
        self._key = (atoms.numbers.tobytes(), atoms.pbc.tobytes())
        self._cell = cell.copy()
        self._scaled = np.linalg.solve(cell.T, atoms.positions.T).T
        self._positions = atoms.positions.copy()
        self.builds += 1

    def _valid(self, atoms: Atoms, cell: np.ndarray) -> bool:
        if self._key != (atoms.numbers.tobytes(), atoms.pbc.tobytes()):
            return False
        if np.array_equal(cell, self._cell):  # fixed cell (NVT): Cartesian displacements
            moved = np.sqrt(((atoms.positions - self._positions) ** 2).sum(axis=1).max())
            return self.cutoff + 2 * moved <= self.cutoff + self.skin
        strain = np.linalg.norm(np.linalg.solve(self._cell, cell) - np.eye(3), ord=2)
        scaled = np.linalg.solve(cell.T, atoms.positions.T).T
        moved = np.sqrt((((scaled - self._scaled) @ cell) ** 2).sum(axis=1)).max()
        return self.cutoff + 2 * moved <= (self.cutoff + self.skin) * (1 - strain)


class EnsembleCalculator(Calculator):
    """ASE calculator returning the ensemble mean (energy, forces, stress) plus uncertainty.

    ``results`` also holds ``energies`` (per model, eV), ``max_force_dev``, ``mean_force_dev``
    (eV/Å), ``energy_std_per_atom`` (eV/atom) and ``stress_std`` (GPa, periodic cells only).
    On the JAX path the neighbour list is reused with a skin (`EnsembleSettings.skin_A`) and
    the graph is padded to a fixed edge capacity (10 % headroom, grown only when exceeded), so
    an MD run compiles once.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]
    edge_headroom = 1.1

    def __init__(self, ensemble: Ensemble, **kwargs):
        super().__init__(**kwargs)
        self.ensemble = ensemble
        self.neighbours = NeighbourCache(ensemble.cutoff, ensemble.settings.skin_A)
        self.edge_capacity = 0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.ensemble.check_covered(self.atoms, "structure")
        if self.ensemble.settings.backend == "jax":
            graph = self.neighbours.graph(self.atoms, self.ensemble._atom_indices)
            pred = self._predict_graph(graph, "numbers" in system_changes)
            if not self.atoms.pbc.all():
                pred.stresses = None
        else:
            pred = self.ensemble.predict([self.atoms])[0]
        energy = float(pred.energies.mean())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": pred.forces.mean(axis=0),
            "energies": pred.energies,
            **ensemble_metrics(pred.energies, pred.forces, pred.stresses),
        }
        if pred.stresses is not None:
            self.results["stress"] = pred.stresses.mean(axis=0)

    def _predict_graph(self, graph: dict, new_structure: bool) -> Prediction:
        n_edge = int(graph["n_edge"][0])
        if n_edge > self.edge_capacity or new_structure:
            self.edge_capacity = bucket_size(math.ceil(n_edge * self.edge_headroom), 64)
        n_node = bucket_size(len(self.atoms) + 1, 16)
        return self.ensemble.predict_graphs([graph], 2, n_node, self.edge_capacity)[0]
