"""JAX's persistent compilation cache: a second process finds the first one's compilations."""

import json
import os
import subprocess
import sys

import ase.io
from helpers import TINY_ARCH, make_cells

SCRIPT = """
import json, sys
from pathlib import Path
from jax import monitoring
hits = []
monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
)
from nequix_fw.evaluation import run_ensemble
from nequix_fw.settings import EnsembleSettings
models, structures, out, cache = sys.argv[1:5]
settings = EnsembleSettings(compilation_cache_dir=Path(cache))
run_ensemble(models.split(","), [structures], out, settings, progress=False)
print(json.dumps({"hits": len(hits)}))
"""


def test_second_process_reuses_compilations(model_paths, tmp_path):
    ase.io.write(tmp_path / "s.extxyz", make_cells(8, seed=4))
    cache = tmp_path / "jax-cache"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(i):
        args = [
            ",".join(map(str, model_paths)),
            tmp_path / "s.extxyz",
            tmp_path / f"r{i}.json",
            cache,
        ]
        r = subprocess.run(
            [sys.executable, "-c", SCRIPT, *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])["hits"]

    assert run(1) == 0
    entries = sorted(p.name for p in cache.iterdir())
    assert entries  # the engine's compilations were written
    assert run(2) >= 1
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing compiled anew
    first, second = (json.loads((tmp_path / f"r{i}.json").read_text()) for i in (1, 2))
    assert [s["energies"] for s in first["structures"]] == [
        s["energies"] for s in second["structures"]
    ]


TRAIN = """
import json, sys
from pathlib import Path
from jax import monitoring
hits = []
monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
)
from nequix_fw.settings import TrainingSettings
from nequix_fw.training import train_ensemble
data, out, cache, arch = sys.argv[1:5]
settings = TrainingSettings(n_models=1, epochs=1, batch_size=4, architecture=json.loads(arch),
                            compilation_cache_dir=Path(cache))
metas = train_ensemble([data], out, settings, progress=False)
print(json.dumps({"hits": len(hits), "loss": metas[0]["final_train_loss"]}))
"""


def test_second_training_process_reuses_the_training_step(emt_data, tmp_path):
    """Each iteration's training is a new process (its own Firework): with the cache, the
    training step compiled by the first is found by the next, and the training is the same."""
    cache = tmp_path / "jax-cache"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(i):
        args = [emt_data["train"], tmp_path / f"m{i}", cache, json.dumps(TINY_ARCH)]
        r = subprocess.run(
            [sys.executable, "-c", TRAIN, *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = run(1)
    assert first["hits"] == 0 and any(cache.iterdir())  # the training step was written
    second = run(2)
    assert second["hits"] >= 1 and second["loss"] == first["loss"]
