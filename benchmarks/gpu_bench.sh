#!/usr/bin/env bash
# The GPU benchmark set of issue 15, in one run on a machine lent by the device tool (or any
# GPU machine): batched walkers (bench_exploration.py) and the ensemble engine's cold start
# (bench_ensemble.py) under the XLA options worth comparing. Results go to $OUT (or ./gpu_out).
#
# The machine needs what nequix-fw imports: where pip cannot reach an index, carry wheels in .whl
# (nequix, ase, jraph, matscipy, pydantic, pydantic_core, annotated-types, typing-inspection,
# e3nn-jax) and the model in .models/nequix-mp-1.nqx.
# Usage: bash benchmarks/gpu_bench.sh [--quick]   (--quick: a CPU dry run of the same steps)
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
    WALKERS="1 8 64 256"; STEPS=30; N=40; T_WALK=260; T_COLD=70
fi
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$OUT/device.txt"
$PY -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$OUT/device.txt"
start=$(date +%s)
timeout $T_WALK $PY benchmarks/bench_exploration.py --tables walkers --walkers $WALKERS \
    --walker-steps $STEPS 2>&1 | grep -v Warning | tee "$OUT/walkers.txt"
echo "walkers: $(( $(date +%s) - start )) s"
cold() {  # name, then bench_ensemble options
    local name=$1; shift
    local t0=$(date +%s)
    timeout $T_COLD $PY benchmarks/bench_ensemble.py --model "$MODEL" --n $N --only engine \
        --cold-only "$@" 2>&1 | grep -v Warning | tail -3 | tee "$OUT/cold_$name.txt"
    echo "$name: $(( $(date +%s) - t0 )) s in all"
}
cold default
cold autotune0 --xla-option xla_gpu_autotune_level=0
cold map_autotune0 --member-mapping map --xla-option xla_gpu_autotune_level=0
cold autotune0_effort --xla-option xla_gpu_autotune_level=0 \
    --xla-option exec_time_optimization_effort=-1.0
echo "total: $(( $(date +%s) - start )) s"
