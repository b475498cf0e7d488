"""Typed settings for every stage, with their defaults in one place, loadable from YAML.

A settings file is a YAML mapping of sections: one per stage that has settings, named as the
stage (``explore``, ``select``, ``label``, ``train_ensemble``, ``validate``), plus ``ensemble``
(the ensemble engine that explore, run_ensemble and validate use) and ``campaign``, e.g.::

    ensemble:
      max_edges_per_batch: 8192
    select:
      lo: 0.08      # eV/Å
      hi: 0.40      # eV/Å
      max_selected: 50
      diverse: true
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, TypeVar, get_args

import yaml
from ase.data import atomic_numbers
from ase.formula import Formula
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from nequix_fw.errors import SettingsError

logger = logging.getLogger(__name__)


#: `json_schema_extra` of a setting typed str that holds a path (or db:NAME): made absolute
#: when a campaign is built, like the settings typed Path.
PATH = {"path": True}
#: The same for a path that may also be a name (a pretrained model): made absolute only when
#: such a file or directory exists.
PATH_OR_NAME = {"path": "or_name"}


def path_fields(cls: type[BaseModel]) -> dict[str, bool]:
    """The settings of `cls` that hold paths, {field: whether it may be a name instead}: those
    typed Path (or list of, or optional), and those marked `PATH` or `PATH_OR_NAME`."""

    def holds_path(annotation) -> bool:
        return annotation is Path or any(holds_path(a) for a in get_args(annotation))

    out = {}
    for name, info in cls.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        marker = extra.get("path")
        if marker or holds_path(info.annotation):
            out[name] = marker == "or_name"
    return out


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    #: Old field names, refused with the new name: {old: new}.
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_old_names(cls, values):
        if isinstance(values, dict):
            old = sorted(set(values) & set(cls.renamed))
            if old:
                raise ValueError(
                    "renamed: " + ", ".join(f"{o} is now {cls.renamed[o]}" for o in old)
                )
        return values


class EnsembleSettings(_Settings):
    """How the ensemble engine batches, pads and caches its work."""

    backend: Literal["jax", "torch"] = Field(
        "jax",
        description="Evaluation backend. 'jax' is the fast batched path (torch checkpoints are "
        "converted in memory); 'torch' evaluates each model with nequix's torch calculator.",
    )
    max_edges_per_batch: int | None = Field(
        None,
        ge=64,
        description="Target number of edges (neighbour pairs) in one padded batch. None: 8192 on "
        "CPU (bounds memory), 32768 on a GPU (fewer batches, fewer compilations).",
    )
    max_structures_per_batch: int = Field(
        64, ge=1, description="Most structures packed into one padded batch."
    )
    chunk_size: int = Field(
        512, ge=1, description="Structures held in memory at once (streaming chunk)."
    )
    compilation_cache_dir: Path | None = Field(
        Path("~/.cache/nequix_fw/jax"),
        description="JAX persistent compilation cache; None disables it.",
    )
    store_per_model: bool = Field(
        True, description="Write per-model energies, forces and stresses into the results."
    )
    results_format: Literal["columnar", "json"] = Field(
        "columnar",
        description="'columnar': the results JSON holds energies, stresses and uncertainties, "
        "and <name>.arrays.npz beside it the structures and forces (float32, as computed): "
        "about 8 KB per 100-atom structure with 4 models. 'json': everything in the one JSON "
        "(schema version 1, about 3x larger).",
    )
    member_mapping: Literal["auto", "vmap", "map"] = Field(
        "auto",
        description="How stacked members of one architecture run in their compiled call: "
        "'vmap' (in parallel), 'map' (one after another, lax.map). 'auto', as measured best: "
        "map on CPU (25-35 % faster there); on a GPU, map for batch evaluation (it compiles "
        "faster, and a cold start is mostly compilation) and vmap for MD (faster steps).",
    )
    xla_options: dict[str, int | float | bool | str] | None = Field(
        None,
        description="XLA compiler options of the ensemble's compiled call (JAX backend), e.g. "
        "{xla_gpu_autotune_level: 0}. None, as measured best: on a GPU, no GEMM autotuning for "
        "batch evaluation (half its compile time) and XLA's defaults for MD; none on CPU.",
    )
    skin_A: float = Field(
        0.5,
        ge=0,
        description="Neighbour-list skin (Å) of the EnsembleCalculator (MD, relaxations): the "
        "list is built at cutoff + skin and reused until an atom or the cell has moved enough "
        "that a pair could cross the cutoff. 0 rebuilds it at every call.",
    )


class SelectionSettings(_Settings):
    """DP-GEN-style trust levels on `max_force_dev` (eV/Å) and the caps on what is selected."""

    method: Literal["uncertainty", "random"] = Field(
        "uncertainty",
        description="'uncertainty': the candidates between the trust levels (by uncertainty, or "
        "diverse); 'random': max_selected picked uniformly from every structure that is not "
        "failed and not already labelled, seeded by `seed` (the control a campaign is measured "
        "against, at the same label budget).",
    )
    seed: int = Field(0, description="Seed of random selection (a campaign adds the iteration).")
    max_per_element: dict[str, int] = Field(
        {},
        description="Quotas: at most this many selected structures containing each element, "
        "e.g. {Au: 5}, so that one easy-to-break phase cannot take the whole budget.",
    )
    max_per_composition: int | None = Field(
        None, ge=1, description="At most this many selected structures per reduced formula."
    )
    lo: float | Literal["auto"] = Field(
        0.05,
        description="Lower trust level (eV/Å): below it, 'accurate'. 'auto': derived from the "
        "calibration of the last validation so that structures predicted to be under "
        "`target_force_error` are accurate (needs `target_force_error`).",
    )
    target_force_error: float | None = Field(
        None, gt=0, description="With lo: auto, the max force error (eV/Å) that is accurate enough."
    )
    hi: float | None = Field(
        None,
        ge=0,
        description="Upper trust level (eV/Å): at or above it, 'failed' (not sent to DFT). "
        "None: no upper level.",
    )
    relative_force_level: float | None = Field(
        None,
        gt=0,
        description="DP-GEN's use_relative: with a level ε (eV/Å), the trust levels apply to "
        "the relative force deviation max_i dev_i / (|F_i| + ε) (dimensionless; F_i the "
        "ensemble's mean force on atom i), so that atoms under large forces may deviate more. "
        "Needs per-model forces in the results (ensemble.store_per_model). None: absolute.",
    )
    stress_lo: float | None = Field(
        None,
        ge=0,
        description="Lower trust level on the stress deviation `stress_std` (GPa; periodic "
        "cells), DP-GEN's model_devi_v_trust_lo: at or above it a structure is a candidate "
        "even when its forces are in trust. None: stresses are not used.",
    )
    stress_hi: float | None = Field(
        None, ge=0, description="Upper trust level on `stress_std` (GPa): at or above, 'failed'."
    )
    max_selected: int | None = Field(
        None, ge=1, description="Most candidates selected per call (None: all)."
    )
    diverse: bool = Field(
        False,
        description="Pick by farthest-point sampling on a structural descriptor, starting from "
        "the most uncertain, instead of by uncertainty alone.",
    )
    diverse_weighting: Literal["none", "uncertainty"] = Field(
        "none",
        description="With `diverse`: 'none' picks the candidate farthest from the training set "
        "and the picks so far; 'uncertainty' the one of largest max_force_dev x that distance, "
        "so that the labels go to distinct structures that are also the most uncertain.",
    )
    descriptor: Literal["structure", "learned"] = Field(
        "structure",
        description="Descriptor of `diverse`: 'structure', composition + pair-distance "
        "histogram + volume per atom; 'learned', the first model's invariant per-atom features "
        "after its last layer, summed per element over the structure's atoms / n atoms.",
    )
    min_distance_A: float | None = Field(
        None,
        gt=0,
        description="Minimum interatomic distance (Å); closer pairs mark a structure 'failed'.",
    )
    format: Literal["vasp", "extxyz"] = Field(
        "vasp", description="File format of selected structures: POSCAR (<id>.vasp) or extxyz."
    )

    renamed = {"min_distance": "min_distance_A"}

    @model_validator(mode="after")
    def _check_levels(self) -> SelectionSettings:
        unknown = sorted(el for el in self.max_per_element if el not in atomic_numbers)
        if unknown:
            raise ValueError(f"max_per_element: unknown elements {unknown}")
        if any(n < 0 for n in self.max_per_element.values()):
            raise ValueError("max_per_element: quotas are >= 0")
        if self.stress_hi is not None and self.stress_lo is None:
            raise ValueError("stress_hi needs stress_lo (GPa)")
        if None not in (self.stress_lo, self.stress_hi) and self.stress_lo > self.stress_hi:
            raise ValueError(
                f"stress_lo ({self.stress_lo} GPa) must not exceed stress_hi ({self.stress_hi} GPa)"
            )
        if self.lo == "auto":
            if self.relative_force_level is not None:
                raise ValueError(
                    "lo: auto calibrates absolute force errors; it does not go "
                    "with relative_force_level"
                )
            if self.target_force_error is None:
                raise ValueError("lo: auto needs target_force_error (eV/Å)")
            return self
        if self.lo < 0:
            raise ValueError(f"lo must be >= 0 eV/Å, got {self.lo}")
        if self.hi is not None and self.lo > self.hi:
            raise ValueError(f"lo ({self.lo} eV/Å) must not exceed hi ({self.hi} eV/Å)")
        return self


class ArchitectureSettings(_Settings):
    """Nequix architecture for training from scratch (nequix's own hyperparameter names)."""

    cutoff: float = Field(5.0, gt=0, description="Neighbour cutoff (Å).")
    hidden_irreps: str = Field("32x0e + 16x1o + 8x2e", description="Hidden features (e3nn).")
    n_layers: int = Field(3, ge=1, description="Message-passing layers.")
    lmax: int = Field(2, ge=0, description="Highest spherical-harmonic degree of edges.")
    radial_basis_size: int = Field(8, ge=1, description="Radial (Bessel) basis functions.")
    radial_mlp_size: int = Field(32, ge=1, description="Width of the radial MLP.")
    radial_mlp_layers: int = Field(2, ge=1, description="Layers of the radial MLP.")
    radial_polynomial_p: float = Field(
        6.0, gt=0, description="Exponent p of the polynomial cutoff envelope."
    )
    mlp_init_scale: float = Field(4.0, gt=0, description="Initialisation scale of the MLPs.")
    index_weights: bool = Field(
        False, description="Per-element weights in the skip connection (nequix's option)."
    )
    layer_norm: bool = Field(True, description="RMS layer normalisation in each convolution.")


class TrainingSettings(_Settings):
    """How an ensemble is trained and how its members differ."""

    n_models: int = Field(4, ge=1, description="Ensemble members.")
    strategy: Literal["splits", "seeds", "bootstrap"] = Field(
        "splits",
        description="How members differ besides their init seed: 'splits' (own random "
        "train/validation split each), 'seeds' (same split, seed only), 'bootstrap' (own split "
        "and a bootstrap resample of its training part).",
    )
    seed: int = Field(0, description="Base seed; member k uses seed + k.")
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out share per member.")
    epochs: int = Field(100, ge=1, description="Training epochs per member (at most: patience).")
    batch_size: int = Field(4, ge=1, description="Structures per training batch.")
    learning_rate: float = Field(5e-3, gt=0, description="Peak learning rate.")
    warmup_epochs: float = Field(1.0, ge=0, description="Linear warm-up, then cosine decay.")
    min_learning_rate: float = Field(1e-5, ge=0, description="Learning rate at the decay's end.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip_norm: float = Field(10.0, gt=0, description="Gradients clipped to this norm.")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="0 disables the moving average.")
    energy_weight: float = Field(
        300.0,
        ge=0,
        description="Loss weight of energy per atom (eV/atom; forces in eV/Å). Measured on EMT "
        "alloys (79 structures): 1 left energies at 60 meV/atom, 300 reached 4.6 (benchmarks/"
        "README.md); forces carry far more loss than energies unless weighted up.",
    )
    force_weight: float = Field(10.0, ge=0, description="Loss weight of forces.")
    stress_weight: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        0.0,
        description="Loss weight of stress (eV/Å³, squared; needs stress labels). 'auto' (the "
        "fine-tuning default): `AUTO_STRESS_WEIGHT` when every training label carries a "
        "stress, otherwise 0.",
    )
    loss_type: Literal["huber", "mse", "mae"] = Field("mse", description="nequix's loss types.")
    patience: int | None = Field(
        20, ge=1, description="Stop after this many epochs without a better validation loss."
    )
    architecture: ArchitectureSettings = Field(
        default_factory=ArchitectureSettings,
        description="The architecture of members trained from scratch (see below).",
    )
    backend: Literal["jax", "torch"] = Field(
        "jax",
        description="Training backend: 'jax' (nequix's fastest) or 'torch' (NequixTorch; also "
        "writes .pt). Both write .nqx checkpoints for the ensemble engine.",
    )
    save_torch: bool = Field(
        True,
        description="Also write a .pt checkpoint (nequix's torch backend) beside each member's "
        ".nqx, as the original design's validate_models.py --models models_new/*.pt expects.",
    )
    n_workers: int = Field(1, ge=1, description="Members trained in parallel processes.")
    uncertainty: Literal["ensemble", "llpr"] = Field(
        "ensemble",
        description="Where the uncertainty comes from: 'ensemble' (the members' spread) or "
        "'llpr' (each member also gets last-layer prediction rigidity heads, "
        "`member_<k>.llpr.npz`, so one member is enough: n_models: 1). See the uncertainty "
        "guide for what each costs and when to use it.",
    )
    llpr_heads: int = Field(
        16,
        ge=2,
        description="LLPR: heads per member (an even number: posterior samples of the readout "
        "in antithetic pairs). Their cost is small against the model's (the gradients go "
        "through the last layer only).",
    )
    llpr_regularization: float | None = Field(
        None,
        gt=0,
        description="LLPR: the precision's regularisation relative to its mean eigenvalue; "
        "None fits it, with the scale, to the member's validation force errors.",
    )
    reinitialise: Literal["none", "readout", "last_layer"] = Field(
        "none",
        description="Fine-tuning: re-initialise each member's readout ('readout') or its last "
        "interaction layer and readout ('last_layer') from its own seed before training, so "
        "that members fine-tuned from one foundation model differ where it alone would not.",
    )
    freeze: Literal["none", "backbone"] | Annotated[int, Field(ge=0)] = Field(
        "none",
        description="Fine-tuning: what does not train. 'none' (everything trains), 'backbone' "
        "(only the readout and the per-element reference energies train), or k: the first k "
        "interaction layers (and the species embedding inside them) stay as the starting "
        "model has them, bit for bit; the rest trains.",
    )
    foundation_member: bool = Field(
        False,
        description="Fine-tuning: add the foundation model itself (its reference energies "
        "shifted to the data, otherwise frozen) as member n_models, a committee member that "
        "does not share the fine-tune's errors.",
    )
    compilation_cache_dir: Path | None = Field(
        Path("~/.cache/nequix_fw/jax"),
        description="JAX persistent compilation cache of the training step (JAX backend), so "
        "that each later training process (the next iteration's Firework, a parallel member) "
        "reuses the compilations of the first; by default the ensemble engine's. None disables "
        "it.",
    )

    @field_validator("llpr_heads")
    @classmethod
    def _even_heads(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"LLPR heads come in antithetic pairs: give an even number, not {v}")
        return v


#: The stress weight of ``stress_weight: auto`` when every label carries a stress: 0.3 GPa of
#: stress error then costs about what 0.1 eV/Å of force error does (stress in eV/Å³, squared,
#: beside the default force weight 10). Measured on CP2K silicon fine-tuned from nequix-mp-1
#: (workflows/cp2k_si.yaml, benchmarks/README.md): C11/C12/C44 within -3/+8/+1 % at 30000
#: against -9/+18/-5 % at 3000 and B0 24 % off without stress; and by benchmarks/finetuning.py.
AUTO_STRESS_WEIGHT = 30000.0

#: What fine-tuning a foundation model changes of the `TrainingSettings` defaults, for the
#: fields a user leaves unset:
#: - one member with LLPR heads: chosen by benchmarks/uncertainty.py (benchmarks/README.md):
#:   on EMT Cu-Au fine-tuned from nequix-mp-1, members that share the foundation's backbone
#:   ranked their held-out errors with a Spearman of about 0.6, one member's LLPR heads with
#:   about 0.9, at a quarter of the training and no less accuracy;
#: - a learning rate of 1e-3, not 5e-3, which pulls the foundation away from its curvature
#:   (CP2K silicon: B0 71 GPa at 5e-3, 96 at 1e-3 against CP2K's 89.7; benchmarks/finetuning.py);
#: - the labels' stresses in the loss (`AUTO_STRESS_WEIGHT`) whenever they all carry one.
#: Early stopping on the held-out split (`valid_fraction`, `patience`) is on for every training.
FINETUNE_DEFAULTS = {
    "uncertainty": "llpr",
    "n_models": 1,
    "learning_rate": 1e-3,
    "stress_weight": "auto",
}


def finetune_defaults(settings: TrainingSettings) -> tuple[TrainingSettings, dict]:
    """`settings` with `FINETUNE_DEFAULTS` for the fields not set explicitly, and those chosen."""
    chosen = {k: v for k, v in FINETUNE_DEFAULTS.items() if k not in settings.model_fields_set}
    return settings.model_copy(update=chosen), chosen


def resolve_stress_weight(settings: TrainingSettings, all_stressed: bool) -> TrainingSettings:
    """`settings` with ``stress_weight: auto`` made a number: `AUTO_STRESS_WEIGHT` when every
    training label carries a stress (`all_stressed`), otherwise 0."""
    if settings.stress_weight != "auto":
        return settings
    value = AUTO_STRESS_WEIGHT if all_stressed else 0.0
    return settings.model_copy(update={"stress_weight": value})


#: The labelling backends by name: the class that labels (a `LabellingBackend` declaring its
#: name and the settings below it reads), as 'module:Class', imported only when used. A new
#: backend is its module and one line here (its own settings, if any, go in LabellingSettings).
LABELLING_BACKENDS = {
    "ase": "nequix_fw.labelling.ase_calc:AseCalculatorBackend",
    "script": "nequix_fw.labelling.script:ScriptBackend",
    "vasp": "nequix_fw.labelling.vasp:VaspBackend",
    "cp2k": "nequix_fw.labelling.cp2k:Cp2kBackend",
}


class LabellingSettings(_Settings):
    """How selected structures get reference labels."""

    backend: str = Field(
        "ase",
        description="Labelling backend: 'ase' (any ASE calculator by name), 'script' (your "
        "command, run in each structure's directory on its POSCAR), 'vasp' or 'cp2k' (under "
        "custodian), or your own LabellingBackend as 'module:Class'.",
    )
    calculator: str = Field(
        "emt",
        description="ASE calculator: a short name (emt, lj) or 'module:Class' "
        "(e.g. 'ase.calculators.espresso:Espresso').",
    )
    calculator_params: dict = Field(default_factory=dict, description="Calculator keywords.")
    command: str | None = Field(
        None,
        description="Shell command of the 'script' backend, run in the structure's directory "
        "(POSCAR there); it leaves labels as labelled.extxyz, *.extxyz, vasprun.xml or OUTCAR.",
    )
    timeout_s: float | None = Field(None, gt=0, description="Wall-time limit per structure (s).")
    vasp_cmd: str = Field(
        "vasp_std", description="VASP command (with an mpirun prefix if needed), split on spaces."
    )
    vasp_inputs: Path | None = Field(
        None, description="Directory with the INCAR, KPOINTS and POTCAR to use (as launch_dft.sh)."
    )
    vasp_input_set: str | None = Field(
        None,
        description="Instead of vasp_inputs: a pymatgen VASP input set writing the inputs per "
        "structure, by class name in pymatgen.io.vasp.sets (e.g. 'MPStaticSet', "
        "'MatPESStaticSet') or 'module:Class'.",
    )
    vasp_input_set_params: dict = Field(
        default_factory=dict,
        description="Keywords of the input set, e.g. user_incar_settings, "
        "user_kpoints_settings ({reciprocal_density: 100}), user_potcar_functional (PBE_54).",
    )
    vasp_psp_dir: Path | None = Field(
        None,
        description="POTCAR library for input sets (pymatgen's PMG_VASP_PSP_DIR); None: the one "
        "configured for pymatgen (~/.config/.pmgrc.yaml or the environment).",
    )
    incar_overrides: dict = Field(default_factory=dict, description="INCAR tags to set on top.")
    handler_group: Literal["default", "strict", "md", "no_handler"] = Field(
        "default", description="custodian error handlers, grouped as in atomate."
    )
    max_errors: int = Field(5, ge=0, description="custodian corrections before giving up.")
    cp2k_cmd: str = Field("cp2k.psmp", description="CP2K command, split on spaces.")
    cp2k_template: Path | None = Field(
        None, description="CP2K input whose &CELL and &COORD are replaced per structure."
    )
    cp2k_input_set: str | None = Field(
        None,
        description="Instead of cp2k_template: a pymatgen CP2K input set generating the input "
        "per (periodic) structure, by class name in pymatgen.io.cp2k.sets (e.g. 'StaticSet') "
        "or 'module:Class'.",
    )
    cp2k_input_set_params: dict = Field(
        default_factory=dict,
        description="Keywords of the CP2K input set. On these machines name the basis and "
        "potential explicitly, e.g. basis_and_potential: {Si: {basis: DZVP-MOLOPT-SR-GTH, "
        "potential: GTH-PBE-q4}, basis_filenames: [BASIS_MOLOPT], potential_filename: "
        "GTH_POTENTIALS}, xc_functionals: [PBE], cutoff: 300 (Ry).",
    )
    cp2k_data_dir: Path = Field(
        Path("/usr/share/cp2k"), description="Basis sets and GTH potentials (CP2K_DATA_DIR)."
    )
    cp2k_cutoff_Ry: float = Field(
        400.0,
        gt=0,
        description="Default CP2K input (no template, no set): plane-wave cutoff "
        "of the finest grid (Ry; REL_CUTOFF 50 Ry).",
    )
    cp2k_kpoint_spacing: float = Field(
        0.3,
        gt=0,
        description="Default CP2K input: Monkhorst-Pack grid with at most this "
        "spacing between k-points (Å⁻¹, 2π included; VASP's KSPACING), Γ only for molecules.",
    )
    scratch_dir: Path | None = Field(None, description="custodian scratch directory.")
    gzip_output: bool = Field(False, description="gzip VASP outputs after the run.")
    min_distance_A: float | None = Field(
        0.7,
        gt=0,
        description="Structures with atoms closer than this (Å) are recorded as failed and never "
        "reach the calculator (0.7 Å: the exploration's own stop; H2 is 0.74 Å). None: no check.",
    )
    max_force: float = Field(
        100.0, gt=0, description="Labels with a force above this (eV/Å) are recorded as failed."
    )
    max_failed_fraction: float | None = Field(
        0.5,
        ge=0,
        le=1,
        description="A campaign iteration whose labelling failed for more than this share of "
        "its structures stops there, adding nothing (DP-GEN's ratio_failed). None: no limit.",
    )

    renamed = {"min_distance": "min_distance_A"}

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in LABELLING_BACKENDS and ":" not in value:
            raise ValueError(
                f"unknown labelling backend {value!r}; known: {', '.join(LABELLING_BACKENDS)} "
                "(or your own as module:Class)"
            )
        return value


class RandomPackingSettings(_Settings):
    """Random structures: a composition packed at random into a cubic cell at a density."""

    composition: str = Field(description="Chemical formula of one cell, e.g. 'Cu16Au16'.")
    density_g_cm3: float = Field(gt=0, description="Mass density (g/cm³) fixing the volume.")
    n_structures: int = Field(1, ge=1, description="How many random cells to make.")
    min_distance_A: float = Field(1.5, gt=0, description="Smallest allowed distance (Å).")

    @model_validator(mode="after")
    def _check(self) -> RandomPackingSettings:
        try:
            count = Formula(self.composition).count()
        except ValueError as exc:
            raise ValueError(f"composition {self.composition!r} is not a formula ({exc})") from None
        if not count or any(n <= 0 for n in count.values()):
            raise ValueError(f"composition {self.composition!r} holds no atoms")

        unknown = sorted(el for el in count if el not in atomic_numbers)
        if unknown:
            raise ValueError(f"composition {self.composition!r} names unknown elements {unknown}")
        return self


class ExplorationSettings(_Settings):
    """Candidate generation: ensemble-driven MD (schedule and stopping rules), distortions of
    the starting structures and random packings."""

    temperatures_K: list[float] = Field([300.0], min_length=1, description="Temperatures (K).")
    pressures_GPa: list[float] | None = Field(
        None, description="Pressures (GPa) for NPT; None: NVT only."
    )
    steps: int = Field(1000, ge=0, description="MD steps per trajectory (0: no MD).")
    timestep_fs: float = Field(2.0, gt=0, description="Time step (fs).")
    thermostat: Literal["langevin", "bussi", "nose_hoover"] = Field(
        "langevin", description="NVT thermostat (ASE's Langevin, Bussi, NoseHooverChainNVT)."
    )
    barostat: Literal["berendsen", "mtk", "mtk_isotropic"] = Field(
        "berendsen",
        description="NPT integrator: ASE's NPTBerendsen, MTKNPT (full cell) or IsotropicMTKNPT.",
    )
    friction_per_fs: float = Field(0.01, gt=0, description="Langevin friction (1/fs).")
    taut_fs: float = Field(
        100.0, gt=0, description="Thermostat time (fs): Bussi, Nosé-Hoover, Berendsen, MTK."
    )
    taup_fs: float = Field(1000.0, gt=0, description="Barostat time (fs): Berendsen, MTK.")
    compressibility_per_GPa: float = Field(0.01, gt=0, description="Berendsen compressibility.")
    check_every: int = Field(10, ge=1, description="Steps between uncertainty/physics checks.")
    sample_every: int = Field(50, ge=1, description="Steps between sampled frames.")
    stop_force_dev: float | None = Field(
        0.5,
        gt=0,
        description="Stop a trajectory when max_force_dev exceeds this (eV/Å): beyond it the "
        "ensemble mean drives the dynamics into nonsense. None: never stop on uncertainty.",
    )
    stop_min_distance_A: float = Field(
        0.7, gt=0, description="Stop a trajectory when atoms come closer than this (Å)."
    )
    max_temperature_factor: float = Field(
        5.0, gt=1, description="Stop when the temperature exceeds this multiple of the target."
    )
    max_energy_drift_eV_per_atom_ps: float | None = Field(
        None,
        gt=0,
        description="Bussi only: stop when the conserved energy (potential + kinetic - what the "
        "thermostat exchanged) has drifted by more than this (eV/atom per ps). None: no check.",
    )
    seeds: list[int] = Field([0], min_length=1, description="One trajectory per seed.")
    n_workers: int = Field(
        1, ge=1, description="Processes running trajectories in parallel (each loads the models)."
    )
    walkers: int = Field(
        64,
        ge=1,
        description="Trajectories advanced together in each process: every MD step of all of "
        "them is one compiled ensemble call (JAX backend; memory grows with walkers x atoms). "
        "1: one trajectory after the other.",
    )
    n_distortions: int = Field(
        0, ge=0, description="Distorted copies of each starting structure added to the pool."
    )
    rattle_A: float = Field(0.05, ge=0, description="Rattle amplitude of distorted copies (Å).")
    rattle_distribution: Literal["normal", "uniform"] = Field(
        "normal",
        description="'normal': Cartesian displacements with std rattle_A; 'uniform': a random "
        "direction and a length uniform in [0, rattle_A].",
    )
    strain_max: float = Field(
        0.0, ge=0, lt=1, description="Random symmetric strain, components in ±strain_max."
    )
    strain_volumetric: float = Field(
        0.0, ge=0, lt=1, description="Isotropic linear strain uniform in ±strain_volumetric."
    )
    strain_shear: float = Field(
        0.0, ge=0, lt=1, description="Shear (off-diagonal) strains uniform in ±strain_shear."
    )
    vacancies: int = Field(0, ge=0, description="Atoms removed at random from each copy.")
    substitutions: dict[str, str] = Field(
        {}, description="Element swaps for alloys, e.g. {'Cu': 'Au'}, applied to copies."
    )
    substitution_fraction: float = Field(
        0.0, ge=0, le=1, description="Fraction of each substituted element swapped per copy."
    )
    random_packing: list[RandomPackingSettings] = Field(
        [], description="Random structures added to the pool."
    )

    renamed = {"hi": "stop_force_dev", "min_distance": "stop_min_distance_A"}

    @model_validator(mode="after")
    def _check(self) -> ExplorationSettings:
        if any(t <= 0 for t in self.temperatures_K):
            raise ValueError(f"temperatures must be > 0 K, got {self.temperatures_K}")
        if self.sample_every % self.check_every:
            raise ValueError(
                f"sample_every ({self.sample_every}) must be a multiple of check_every "
                f"({self.check_every})"
            )
        bad = [e for pair in self.substitutions.items() for e in pair if e not in atomic_numbers]
        if bad:
            raise ValueError(f"substitutions name unknown elements {bad}")
        if self.substitutions and self.substitution_fraction == 0:
            raise ValueError("substitutions given but substitution_fraction is 0")
        if self.max_energy_drift_eV_per_atom_ps is not None and (
            self.thermostat != "bussi" or self.pressures_GPa
        ):
            raise ValueError(
                "max_energy_drift_eV_per_atom_ps needs the Bussi thermostat (NVT): "
                "only there is the conserved energy tracked"
            )
        return self


#: A campaign's stages, by their one name: the CLI command (with "_" for "-"), the Firework
#: (<campaign> <stage> <k>), the FireTask (CamelCase + Task) and the key of `resources`.
Stage = Literal[
    "explore", "run_ensemble", "select", "label", "update_dataset", "train_ensemble", "validate"
]
STAGES: tuple[str, ...] = get_args(Stage)


#: The sections that may change with the iteration (schedule), the phase and the system.
ScheduledSection = Literal["ensemble", "explore", "select", "label", "train_ensemble", "validate"]

#: Sections by their old names (read with a warning): {old: new}.
RENAMED_SECTIONS = {
    "exploration": "explore",
    "selection": "select",
    "labelling": "label",
    "training": "train_ensemble",
    "validation": "validate",
}


def renamed_sections(values, where: str):
    """`values` (a mapping of sections) with the old section names replaced by the new ones, each
    with a warning naming `where`; both names of one section are refused."""
    if not isinstance(values, dict) or not set(values) & set(RENAMED_SECTIONS):
        return values
    out = {}
    for name, section in values.items():
        new = RENAMED_SECTIONS.get(name)
        if new is None:
            out[name] = section
            continue
        if new in values:
            raise ValueError(
                f"{where}: sections {name!r} and {new!r} are one section "
                f"({name!r} is its old name): give {new!r} only"
            )
        logger.warning("%s: section %r is now %r (the old name is still read)", where, name, new)
        out[new] = section
    return out


#: Section values inside the campaign section (a schedule entry, a phase's or a system's
#: settings), old section names read as the new ones.
SectionValues = Annotated[
    dict[ScheduledSection, dict], BeforeValidator(lambda v: renamed_sections(v, "campaign"))
]


class FireworkResources(_Settings):
    """Worker and queue requests of one stage's Fireworks (FireWorks spec keys)."""

    category: str | None = Field(
        None, description="FireWorks _category: only workers of this category run it."
    )
    fworker: str | None = Field(
        None, description="FireWorks _fworker: only the worker of this name runs it."
    )
    queueadapter: dict[str, str | int | float | None] = Field(
        {},
        description="FireWorks _queueadapter: queue-adapter keys for this stage's jobs, e.g. "
        "{walltime: '04:00:00', nodes: 2, ntasks: 64, gres: 'gpu:1'}; applied by "
        "`qlaunch -r` (reservation mode).",
    )
    priority: int | None = Field(
        None, description="FireWorks _priority: ready Fireworks of higher priority run first."
    )

    def spec(self) -> dict:
        """The Firework spec entries."""
        keys = {
            "_category": self.category,
            "_fworker": self.fworker,
            "_queueadapter": self.queueadapter,
            "_priority": self.priority,
        }
        return {k: v for k, v in keys.items() if v is not None and v != {}}


class PhaseSettings(_Settings):
    """One exploration phase of a campaign (an entry of `campaign.phases`, dpgen2's stages): its
    settings and when it has converged, so that the campaign moves on to the next phase."""

    name: str | None = Field(None, description="Phase name (reports); default: its index.")
    settings: SectionValues = Field(
        {},
        description="Section values of this phase, over the sections and the schedule, e.g. "
        "{explore: {temperatures_K: [1200], steps: 5000}}.",
    )

    accurate_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Converged once at least this fraction of an iteration's "
        "candidates is accurate (max_force_dev < select.lo).",
    )
    iterations: int | None = Field(
        None, ge=1, description="Converged after this many iterations in the phase."
    )

    @model_validator(mode="after")
    def _check_condition(self) -> PhaseSettings:
        if self.accurate_fraction is None and self.iterations is None:
            raise ValueError("a phase needs accurate_fraction or iterations (when it converges)")
        return self


class SystemSettings(_Settings):
    """One system of a multi-system campaign (`campaign.systems`, DP-GEN's sys_configs): its
    exploration starts, its own settings, label quota and convergence."""

    name: str = Field(description="System name (directories, records, reports).")
    initial_structures: Path = Field(
        description="Where this system's exploration starts (file or directory)."
    )
    candidate_pool: list[Path] = Field(
        [], description="Fixed candidates of this system, evaluated every iteration."
    )
    settings: SectionValues = Field(
        {},
        description="Section values of this system over the sections and the schedule, "
        "e.g. {explore: {temperatures_K: [1500]}, select: {lo: 0.1}}.",
    )

    max_selected: int | None = Field(
        None, ge=1, description="Label quota: at most this many selected per iteration."
    )
    accurate_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Converged (no longer explored) once at least this "
        "fraction of its candidates is accurate; default campaign.accurate_fraction.",
    )


def stages_as_phases(campaign):
    """A campaign section with `stages`, the old name of `phases`, read as `phases` (with a
    warning); both names at once are refused."""
    if not isinstance(campaign, dict) or "stages" not in campaign:
        return campaign
    if "phases" in campaign:
        raise ValueError(
            "campaign: stages and phases are one setting (stages is its old name): give phases"
        )
    logger.warning("campaign: stages is now phases (the old name is still read)")
    return {("phases" if k == "stages" else k): v for k, v in campaign.items()}


class CampaignSettings(_Settings):
    """An active-learning campaign run by FireWorks: its data, its directory, when it stops."""

    name: str = Field("campaign", description="Campaign name (workflow and Firework names).")
    directory: Path = Field(
        description="Campaign directory: iter_000/, iter_001/, ... and campaign.json (made "
        "absolute when the workflow is built)."
    )
    initial_structures: Path = Field(
        description="Structures (file or directory) labelled in iteration 0, and the starting "
        "points of exploration."
    )
    candidate_pool: list[Path] = Field(
        [], description="Extra candidates evaluated in every iteration besides exploration."
    )
    testset: list[Path] = Field([], description="Labelled validation data (files/dirs).")
    dataset: str | None = Field(
        None,
        description="The training set: a directory or a store dataset db:NAME. None: db:<name> "
        "in the database of the LaunchPad that runs the campaign.",
        json_schema_extra=PATH,
    )
    launchpad: Path | None = Field(
        None, description="LaunchPad file of the store (db:NAME datasets)."
    )
    max_iterations: int = Field(5, ge=0, description="Iterations after the initial one.")
    min_selected: int = Field(
        1, ge=1, description="Stop when an iteration selects fewer structures than this."
    )
    target_force_rmse: float | None = Field(
        None,
        gt=0,
        description="Stop once the ensemble mean's validation force RMSE (eV/Å) is "
        "at or below this (needs a testset).",
    )
    md_stable_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Stop once at least this fraction of the validation's MD "
        "stability runs stays physical (needs validate.md_stability); with target_force_rmse "
        "too, both must hold.",
    )
    property_tolerances: dict[
        Literal[
            "v0_percent",
            "bulk_modulus_percent",
            "vacancy_formation_eV",
            "elastic_percent",
            "phonon_percent",
        ],
        float,
    ] = Field(
        {},
        description="Stop once the structural checks agree with validate.reference within "
        "these: |V0 error| (%), |B0 error| (%), |vacancy formation energy error| (eV), the "
        "largest |elastic constant error| (%, validate.elastic), the largest |phonon "
        "frequency error| (%, validate.phonons; both recorded with their sign), e.g. "
        "{v0_percent: 1, bulk_modulus_percent: 5, elastic_percent: 10}; with the other "
        "targets, all must hold.",
    )
    accurate_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Stop once at least this fraction of an iteration's "
        "candidates is accurate (max_force_dev < select.lo; DP-GEN's convergence measure).",
    )
    finetune_from: str | list[str] | None = Field(
        None,
        description="Iteration 0 fine-tunes this model (path or pretrained name), or these "
        "(a heterogeneous committee: member k from model k mod n); None: from scratch. Later "
        "iterations warm-start from the previous ensemble.",
        json_schema_extra=PATH_OR_NAME,
    )
    explore: bool = Field(True, description="Explore (MD, distortions) in every iteration.")
    property_exploration: int = Field(
        16,
        ge=0,
        description="Property-driven exploration: candidates added to the next iteration's "
        "evaluation for each property check of the validation that missed its "
        "property_tolerances (volume-scaled cells for V0/B0, strained cells for the elastic "
        "constants, displaced supercells for the phonons; see nequix_fw.exploration."
        "properties). 0: off. With systems, they join the first system explored in the "
        "iteration (its trust levels and quota).",
    )
    property_labels: int = Field(
        6,
        ge=0,
        description="Of the candidates a missed property check added, the selection takes this "
        "many (the most uncertain) first, within select.max_selected, whatever their "
        "uncertainty: an ensemble fine-tuned from one model can agree on a property it gets "
        "wrong, and the missed check is the evidence. What uncertainty then leaves of "
        "max_selected goes to those cells too. 0: uncertainty alone decides. The default is "
        "measured (benchmarks/properties.py): EMT Cu from scratch converged V0, B0 and the "
        "elastic constants in 2 iterations with 6, and not in 6 with 2.",
    )
    label_group_size: int | None = Field(
        None,
        ge=1,
        description="Structures per labelling Firework (DP-GEN's fp_group_size): "
        "the groups run as parallel Fireworks (jobs); None: one Firework labels them all.",
    )
    resources: dict[Stage, FireworkResources] = Field(
        {},
        description="Where and how each stage's Fireworks run, by stage: explore, run_ensemble, "
        "select, label, update_dataset, train_ensemble, validate.",
    )
    schedule: dict[int, SectionValues] = Field(
        {},
        description="Stage settings that change with the iteration: {k: {section: {key: "
        "value}}} applies from iteration k on, over the sections and earlier entries, e.g. "
        "hotter and longer MD later: {3: {explore: {temperatures_K: [900], steps: 5000}}}.",
    )

    systems: list[SystemSettings] = Field(
        [],
        description="Several systems in one campaign: each explored from its own starts with "
        "its own settings, trust levels and quota, selected and reported on its own, and no "
        "longer explored once converged (accurate fraction reached, or fewer than "
        "min_selected selected); the campaign stops when every system has converged. "
        "initial_structures are still what iteration 0 labels (all systems'). With phases, each "
        "system goes through them on its own.",
    )
    phases: list[PhaseSettings] = Field(
        [],
        description="Exploration phases (dpgen2's stages; `stages`, the old name, is still "
        "read): iterations from 1 on run the first phase until it converges (its "
        "accurate_fraction, its iterations, or fewer than min_selected selected), then the "
        "next; the campaign stops when the last converges. Replaces the campaign-wide "
        "accurate_fraction and min_selected stops.",
    )

    @model_validator(mode="before")
    @classmethod
    def _read_stages_as_phases(cls, values):
        return stages_as_phases(values)

    @model_validator(mode="before")
    @classmethod
    def _refuse_old_stage_names(cls, values):
        old = {"dataset": "update_dataset", "train": "train_ensemble"}
        resources = values.get("resources") if isinstance(values, dict) else None
        found = sorted(set(resources or {}) & set(old))
        if found:
            raise ValueError(
                "resources: renamed stages: "
                + ", ".join(f"{o} is now {old[o]}" for o in found)
                + " (select no longer covers "
                "run_ensemble, which has its own Firework)"
            )
        return values

    @model_validator(mode="after")
    def _check_schedule(self):
        if any(k < 0 for k in self.schedule):
            raise ValueError("schedule: iterations are >= 0")
        names = [system.name for system in self.systems]
        if len(set(names)) != len(names):
            raise ValueError(f"systems: names must differ ({', '.join(names)})")
        per_system = {"explore", "select"}
        other = sorted({name for ph in self.phases for name in ph.settings} - per_system)
        if self.systems and other:
            raise ValueError(
                f"with systems, each system goes through the phases on its own, "
                f"so a phase sets explore and select only, not "
                f"{', '.join(other)} (use schedule)"
            )
        for name, tolerance in self.property_tolerances.items():
            if not (math.isfinite(tolerance) and tolerance > 0):
                raise ValueError(
                    f"property_tolerances: {name} must be a finite number > 0, got {tolerance}"
                )
        return self


#: `validate.reference` of a campaign whose own `label` backend labels the E-V reference set.
LABEL_REFERENCE = "label"


class ValidationSettings(_Settings):
    """Validation besides the errors: structural checks against a reference calculator, and MD
    stability of the ensemble mean (NVT, Bussi thermostat, from the held-out structures)."""

    reference: str | None = Field(
        None,
        description="Reference ASE calculator of the structural checks (E-V curve: V0 and B0 by "
        "Birch-Murnaghan; relaxation; vacancy formation energy of elemental cells): a name "
        "(emt, lj, ...) or 'module:Class'. In a campaign, 'label': the campaign's own "
        "label backend (VASP, CP2K, ...) labels an E-V set of `structure` once (7 volumes, "
        "-6 to +6 %), stored as the dataset <dataset>_reference_ev, and the E-V check compares "
        "with it. None: no structural checks.",
    )
    reference_params: dict = Field(
        default_factory=dict, description="Keywords of the reference calculator."
    )
    reference_data: list[str] = Field(
        [],
        description="Labelled E-V data instead of a calculator (files, directories or "
        "db:NAME; one composition at >= 5 volumes, e.g. from `nequix-fw ev-set`): the E-V check "
        "compares with it.",
        json_schema_extra=PATH,
    )
    structure: Path | None = Field(
        None, description="Structure of the structural checks (default: the first test one)."
    )
    elastic: bool = Field(
        False,
        description="Elastic constants of `structure` against the reference (its calculator, "
        "or in a campaign with reference 'label' the campaign's labels): by finite strain (±1 % "
        "on each Voigt component, clamped ions; 12 reference calculations, 4 for a cubic crystal "
        "along x, y, z), C11, C12 and C44 of a cubic crystal, else every sizeable C_ij (GPa).",
    )
    phonons: bool = Field(
        False,
        description="Phonon frequencies of `structure` at high-symmetry points against the "
        "reference (as for `elastic`), by phonopy's finite displacements (0.01 Å) on "
        "`phonon_supercell` (needs the 'phonons' extra; THz).",
    )
    phonon_supercell: list[int] = Field(
        [2, 2, 2], min_length=3, max_length=3, description="Supercell of the phonon check."
    )
    phonon_qpoints: dict[str, list[float]] | None = Field(
        None,
        description="q-points of the phonon check by name, in the reciprocal basis of "
        "phonopy's primitive cell. None: Γ and the high-symmetry points of a cubic lattice "
        "(F: X, L; I: H, N; P: X, M, R), Γ alone for other lattices.",
    )

    md_stability: bool = Field(False, description="Run the MD stability check.")
    md_temperature_K: float = Field(1000.0, gt=0, description="Temperature of the runs (K).")
    md_steps: int = Field(500, ge=1, description="Steps per run.")
    md_timestep_fs: float = Field(2.0, gt=0, description="Time step (fs).")
    md_n_runs: int = Field(4, ge=1, description="Runs, from the first test structures.")
    md_check_every: int = Field(10, ge=1, description="Steps between checks.")
    md_min_distance_A: float = Field(
        0.7, gt=0, description="Atoms closer than this (Å): the structure collapsed."
    )
    md_max_temperature_factor: float = Field(
        3.0, gt=1, description="A temperature above this multiple of the target: a runaway."
    )
    md_max_energy_drift_eV_per_atom_ps: float = Field(
        0.05,
        gt=0,
        description="Largest drift of the conserved energy (potential + kinetic - what the "
        "thermostat exchanged), eV/atom per ps.",
    )

    @field_validator("phonon_supercell")
    @classmethod
    def _positive_supercell(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError(f"every entry must be a positive integer, got {v}")
        return v

    @field_validator("phonon_qpoints")
    @classmethod
    def _three_vectors(cls, v: dict[str, list[float]] | None):
        for name, q in (v or {}).items():
            if len(q) != 3 or not all(math.isfinite(x) for x in q):
                raise ValueError(f"{name} must be a 3-vector of finite numbers, got {q}")
        return v

    @field_validator("reference")
    @classmethod
    def _renamed_reference(cls, reference):
        if reference == "labelling":
            logger.warning(
                "validate.reference 'labelling' is now %r (the old name is still read)",
                LABEL_REFERENCE,
            )
            return LABEL_REFERENCE
        return reference

    @model_validator(mode="after")
    def _one_reference(self):
        if self.reference not in (None, LABEL_REFERENCE) and self.reference_data:
            raise ValueError(
                "reference (a calculator) and reference_data (labelled E-V data) "
                "exclude each other: give one"
            )
        return self


S = TypeVar("S", bound=_Settings)

SECTIONS: dict[str, type[_Settings]] = {
    "ensemble": EnsembleSettings,
    "explore": ExplorationSettings,
    "select": SelectionSettings,
    "label": LabellingSettings,
    "train_ensemble": TrainingSettings,
    "validate": ValidationSettings,
    "campaign": CampaignSettings,
}


#: A value filled from the FireWorks worker's env at run time (atomate's env_chk): ``>>key<<``.
PLACEHOLDER = re.compile(r"^>>(\w+)<<$")


def env_chk(value, env: dict | None, where: str):
    """`value`, or the worker's ``env[key]`` when it is a ``>>key<<`` placeholder (atomate's
    env_chk); `where` names the setting in the error when the worker has no such key."""
    m = PLACEHOLDER.match(value) if isinstance(value, str) else None
    if m is None:
        return value
    key = m.group(1)
    if key not in (env or {}):
        raise SettingsError(
            f"{where} is {value!r}, a FireWorks worker placeholder, but the worker env has no "
            f"{key!r}: set env: {{{key}: ...}} in my_fworker.yaml (CLI: --fworker FILE)"
        )
    return env[key]


def fill_placeholders(values: dict, env: dict | None, where: str) -> dict:
    """`values` (one section's) with every ``>>key<<`` value replaced by the worker's
    ``env[key]``; with `env` None (building a workflow, where no worker is known yet) the
    placeholders are left out, so that the rest is checked with the defaults in their place."""
    return {
        name: env_chk(value, env, f"{where}.{name}")
        for name, value in values.items()
        if env is not None or not (isinstance(value, str) and PLACEHOLDER.match(value))
    }


def make_settings(cls: type[S], **values) -> S:
    """Build settings, turning validation problems into one readable `SettingsError`."""
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or cls.__name__}: "
            + err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        )
        raise SettingsError(f"invalid {cls.__name__}: {problems}") from None


def read_sections(path: str | Path | None) -> dict:
    """The raw sections of a settings file (checked names), {} without a file."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of sections {sorted(SECTIONS)}")
    return {k: dict(v or {}) for k, v in check_sections(data, str(path)).items()}


def check_sections(sections: dict, where: str) -> dict:
    """`sections` with old section names replaced (see `renamed_sections`); unknown ones are
    refused, naming `where` (a file, a FireTask)."""
    try:
        sections = renamed_sections(sections, where)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SettingsError(
            f"{where}: unknown section(s) {sorted(unknown)}; known: {sorted(SECTIONS)}"
        )
    return sections


def section_name(cls: type[_Settings]) -> str:
    """The name of the settings section of `cls` (its key in a settings file)."""
    return next(name for name, c in SECTIONS.items() if c is cls)


def section_settings(cls: type[S], values: dict, env: dict | None, where: str | None = None) -> S:
    """Settings `cls` from a section's `values`, ``>>key<<`` placeholders filled from the
    worker's `env` (None: left out, see `fill_placeholders`); errors name `where` (default:
    the section)."""
    return make_settings(cls, **fill_placeholders(values, env, where or section_name(cls)))


def load_settings(path: str | Path | None, cls: type[S], **overrides) -> S:
    """Read the section of `cls` from a YAML file (if given) and apply non-None `overrides`."""
    values = read_sections(path).get(section_name(cls), {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return make_settings(cls, **values)
