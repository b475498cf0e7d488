"""Nequix checkpoints: load `.nqx` (JAX) / `.pt` (torch) files or pretrained names, report metadata.

Loading, saving and JAX<->torch conversion are nequix's own functions; this module adds checks,
clear errors, metadata (sha256, elements, cutoff, parameter count) and atomic writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax
from ase.data import chemical_symbols
from nequix.calculator import NequixCalculator
from nequix.model import Nequix
from nequix.model import save_model as save_jax

from nequix_fw.errors import ModelError
from nequix_fw.structures import atomic_path

Backend = Literal["jax", "torch"]

#: Config keys nequix needs to rebuild a model from a checkpoint.
REQUIRED_CONFIG_KEYS = (
    "atomic_numbers",
    "cutoff",
    "hidden_irreps",
    "lmax",
    "n_layers",
    "radial_basis_size",
    "radial_mlp_size",
    "radial_mlp_layers",
    "radial_polynomial_p",
    "mlp_init_scale",
    "index_weights",
    "layer_norm",
    "shift",
    "scale",
    "avg_n_neighbors",
)


def pretrained_dir() -> Path:
    """nequix's cache of pretrained checkpoints (`~/.cache/nequix/models/`)."""
    return Path("~/.cache/nequix/models").expanduser()


def known_pretrained() -> list[str]:
    return sorted(NequixCalculator.URLS)


@dataclass
class ModelInfo:
    """What a user needs to know about one loaded model."""

    name: str
    path: str
    sha256: str
    backend: Backend
    elements: list[str]
    cutoff: float
    n_params: int
    architecture: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NequixModel:
    """A loaded checkpoint: nequix module (JAX `Nequix` or torch `NequixTorch`) plus config."""

    info: ModelInfo
    config: dict
    module: Any

    @property
    def atomic_numbers(self) -> list[int]:
        return sorted(int(z) for z in self.config["atomic_numbers"])

    @property
    def cutoff(self) -> float:
        return float(self.config["cutoff"])

    def jax_module(self):
        """The JAX module (a torch checkpoint is converted in memory with nequix's converter)."""
        if self.info.backend == "jax":
            return self.module
        from nequix.torch_impl.utils import convert_model_torch_to_jax  # noqa: PLC0415

        return convert_model_torch_to_jax(self.module, self.config, False)[0]

    def torch_module(self):
        """The torch module (a JAX checkpoint is converted in memory with nequix's converter)."""
        if self.info.backend == "torch":
            return self.module
        from nequix.torch_impl.utils import convert_model_jax_to_torch  # noqa: PLC0415

        return convert_model_jax_to_torch(self.module, self.config, False)[0]

    def calculator(self, backend: Backend = "jax"):
        """nequix's own ASE `NequixCalculator` for this checkpoint, on `backend`."""

        path = Path(self.info.path)
        if backend != self.info.backend:
            # nequix converts next to the checkpoint under a fixed name; convert into our cache.
            suffix = ".nqx" if backend == "jax" else ".pt"
            path = converted_cache_dir() / f"{self.info.sha256}{suffix}"
            if not path.exists():
                module = self.jax_module() if backend == "jax" else self.torch_module()
                save_model(path, module, self.config)
        return NequixCalculator(model_path=str(path), backend=backend, use_kernel=False)


def converted_cache_dir() -> Path:
    return Path("~/.cache/nequix_fw/converted").expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model_path(spec: str | Path) -> tuple[str, Path]:
    """(name, path) for a checkpoint path or a pretrained name found in nequix's cache."""
    path = Path(spec).expanduser()
    if path.suffix in (".nqx", ".pt") or path.exists() or os.sep in str(spec):
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        return path.stem, path
    name = str(spec)
    cache = pretrained_dir()
    for suffix in (".nqx", ".pt"):
        if (cache / f"{name}{suffix}").is_file():
            return name, cache / f"{name}{suffix}"
    if name in known_pretrained():
        raise ModelError(
            f"pretrained model {name} is not in {cache} and cannot be downloaded here: "
            f"copy {name}.nqx into {cache} (or pass the checkpoint's path)"
        )
    raise ModelError(
        f"{name}: neither a model file nor a known pretrained name "
        f"(known: {', '.join(known_pretrained())})"
    )


def _read_config(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            line = f.readline(1 << 20)
        config = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError):
        raise ModelError(
            f"{path}: not a Nequix checkpoint (no JSON config on its first line)"
        ) from None
    missing = [k for k in REQUIRED_CONFIG_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        raise ModelError(f"{path}: not a Nequix checkpoint (config lacks {', '.join(missing)})")
    return config


def load_model(spec: str | Path) -> NequixModel:
    """Load a Nequix checkpoint (`.nqx` JAX, `.pt` torch) or a pretrained name on CPU/GPU."""
    name, path = resolve_model_path(spec)
    config = _read_config(path)
    backend: Backend = "torch" if path.suffix == ".pt" else "jax"
    try:
        if backend == "jax":
            module = _load_jax(path, config)
            # trainable parameters: the per-element reference energies are a fixed prior
            n_params = sum(x.size for x in _leaves(eqx.filter(module, eqx.is_array)))
            n_params -= module.atom_energies.size
        else:
            from nequix.torch_impl.model import load_model as load_torch  # noqa: PLC0415

            module, config = load_torch(str(path), False)
            module.eval()
            n_params = sum(p.numel() for p in module.parameters())
    except ModelError:
        raise
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: truncated or corrupted checkpoint ({cause[:200]})") from None
    atomic_numbers = sorted(int(z) for z in config["atomic_numbers"])
    info = ModelInfo(
        name=name,
        path=str(path.resolve()),
        sha256=sha256_file(path),
        backend=backend,
        elements=[chemical_symbols[z] for z in atomic_numbers],
        cutoff=float(config["cutoff"]),
        n_params=int(n_params),
        architecture={k: config[k] for k in REQUIRED_CONFIG_KEYS if k != "atomic_numbers"},
    )
    return NequixModel(info=info, config=config, module=module)


def _load_jax(path: Path, config: dict):
    """nequix's `load_model`, but the skeleton is built with `eqx.filter_eval_shape` (no random
    initialisation to throw away: about 3x faster, more on a GPU), then filled from the file."""

    like = eqx.filter_eval_shape(
        Nequix,
        key=jax.random.key(0),
        n_species=len(config["atomic_numbers"]),
        **{k: config[k] for k in REQUIRED_CONFIG_KEYS if k != "atomic_numbers"},
    )
    with open(path, "rb") as f:
        f.readline()
        return eqx.tree_deserialise_leaves(f, like)


def _leaves(tree) -> list:
    return jax.tree_util.tree_leaves(tree)


def new_model(
    atomic_numbers: list[int],
    *,
    seed: int = 0,
    cutoff: float = 5.0,
    hidden_irreps: str = "16x0e + 8x1o",
    n_layers: int = 2,
    lmax: int = 2,
    radial_basis_size: int = 8,
    radial_mlp_size: int = 16,
    radial_mlp_layers: int = 2,
    radial_polynomial_p: float = 6.0,
    mlp_init_scale: float = 4.0,
    index_weights: bool = False,
    layer_norm: bool = True,
    shift: float = 0.0,
    scale: float = 1.0,
    avg_n_neighbors: float = 20.0,
    atom_energies: dict[int, float] | None = None,
) -> tuple[Any, dict]:
    """A randomly initialised JAX Nequix model and its nequix config (small by default)."""

    zs = sorted(int(z) for z in atomic_numbers)
    e0 = {z: float((atom_energies or {}).get(z, 0.0)) for z in zs}
    config = {
        "atomic_numbers": zs,
        "cutoff": cutoff,
        "hidden_irreps": hidden_irreps,
        "lmax": lmax,
        "n_layers": n_layers,
        "radial_basis_size": radial_basis_size,
        "radial_mlp_size": radial_mlp_size,
        "radial_mlp_layers": radial_mlp_layers,
        "radial_polynomial_p": radial_polynomial_p,
        "mlp_init_scale": mlp_init_scale,
        "index_weights": index_weights,
        "layer_norm": layer_norm,
        "shift": shift,
        "scale": scale,
        "avg_n_neighbors": avg_n_neighbors,
        "atom_energies": {str(z): e for z, e in e0.items()},
        "seed": seed,
    }
    module = Nequix(
        key=jax.random.key(seed),
        n_species=len(zs),
        **{k: config[k] for k in REQUIRED_CONFIG_KEYS if k != "atomic_numbers"},
        atom_energies=[e0[z] for z in zs],
    )
    return module, config


def save_model(path: str | Path, module: Any, config: dict) -> Path:
    """Write a checkpoint atomically with nequix's writer: `.nqx` (JAX) or `.pt` (torch).

    A module of the other backend is converted with nequix's converter first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    is_torch_module = type(module).__module__.startswith("nequix.torch_impl")
    with atomic_path(path) as tmp:
        if path.suffix == ".nqx":
            if is_torch_module:
                from nequix.torch_impl.utils import convert_model_torch_to_jax  # noqa: PLC0415

                module = convert_model_torch_to_jax(module, config, False)[0]
            save_jax(str(tmp), module, config)
        elif path.suffix == ".pt":
            from nequix.torch_impl.model import save_model as save_torch  # noqa: PLC0415

            if not is_torch_module:
                from nequix.torch_impl.utils import convert_model_jax_to_torch  # noqa: PLC0415

                module = convert_model_jax_to_torch(module, config, False)[0]
            save_torch(str(tmp), module, config)
        else:
            raise ModelError(f"{path}: model files end in .nqx (JAX) or .pt (torch)")
    return path


def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Convert a checkpoint between `.nqx` and `.pt` (the backend follows `dst`'s suffix)."""
    model = load_model(src)
    return save_model(dst, model.module, model.config)
