#!/usr/bin/env bash
# The GPU benchmark set of issue 15, in one run on a machine lent by the device tool (or any
# GPU machine): batched walkers (bench_exploration.py) and the ensemble engine's cold start
# (bench_ensemble.py) under the XLA options worth comparing. Results go to $OUT (or ./gpu_out).
#
# The machine needs what nequix-fw imports: where pip cannot reach an index, carry wheels in .whl
# (nequix, ase, jraph, matscipy, pydantic, pydantic_core, annotated-types, typing-inspection,
# e3nn-jax) and the model in .models/nequix-mp-1.nqx.
# Usage: bash benchmarks/gpu_bench.sh [--quick]   (--quick: a CPU dry run of the same steps)
# Other engine settings to compare: bench_ensemble.py and bench_exploration.py take
# --member-mapping and --xla-option.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
MODEL=${MODEL:-.models/nequix-mp-1.nqx}
if [ "${1:-}" = "--quick" ]; then
    WALKERS="1 2"; STEPS=5; N=3; T_WALK=600; T_COLD=300
else
    WALKERS="1 8 64 256"; STEPS=30; N=40; T_WALK=150; T_COLD=50
fi
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$OUT/device.txt"
$PY -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$OUT/device.txt"
start=$(date +%s)
# batched walkers with the default engine settings (vmap, XLA defaults for MD)
timeout $T_WALK $PY benchmarks/bench_exploration.py --tables walkers --walker-steps $STEPS \
    --walkers $WALKERS 2>&1 | grep -v Warning | tee "$OUT/walkers.txt"
echo "walkers: $(( $(date +%s) - start )) s"
# the engine's cold start with its default settings (map, no GEMM autotuning for evaluation)
timeout $T_COLD $PY benchmarks/bench_ensemble.py --model "$MODEL" --n $N --only engine \
    --cold-only 2>&1 | grep -v Warning | tail -3 | tee "$OUT/cold.txt"
echo "total: $(( $(date +%s) - start )) s"
