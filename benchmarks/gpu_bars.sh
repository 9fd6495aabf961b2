#!/usr/bin/env bash
# Issue #5's GPU bars in one prepared run, sized for a lent GPU's short lease (about
# 9 minutes in all; each step has its own time limit and a failing step does not stop
# the next). Run from the repository root with a Python that has jax (CUDA), flax,
# optax, torch and timm:
#
#   OUT=/tmp/gpu bash benchmarks/gpu_bars.sh          # on the GPU machine
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_bars.sh  # a tiny model, any machine
#
# Writes into $OUT: machine.txt, volo.json / volo.txt (JAX fp32 and bf16 against timm
# eager, AMP and torch.compile, inference and train step), impl_<name>.json (the whole
# model with each outlook implementation, bf16), outlook_tests.txt (the implementations,
# the Pallas kernel compiled, against the reference) and ops.json (bench_ops).
set -u
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results/gpu_$(date +%Y%m%d_%H%M)}
BATCH=${BATCH:-64}
REPS=${REPS:-10}
MODEL=${MODEL:-volo_d1_224}
OVERRIDES=${OVERRIDES:-'{}'}
BACKENDS=${BACKENDS:-jax_bf16,jax_fp32,torch_amp,torch_eager,torch_compile}
OPS_ARGS=(--batch "$BATCH")
if [[ ${SMOKE:-0} == 1 ]]; then
    BATCH=2 REPS=1 OVERRIDES='{"layers": [1, 1, 1, 1]}' BACKENDS=jax_bf16,torch_eager
    OPS_ARGS=(--batch 2 --size 8 --reps 1 --warmup 0)
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$SECONDS

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "[gpu_bars] $name (limit ${limit}s, $((SECONDS - started))s so far)"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "[gpu_bars] $name: exit $rc"
    tail -n 25 "$OUT/$name.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c 'import jax, flax, torch, timm; print("jax", jax.__version__, jax.devices());
print("flax", flax.__version__, "torch", torch.__version__, "timm", timm.__version__)' 2>&1
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

# 1. The bars: JAX against timm, same batch and weights, one process per backend.
step volo 330 "$PY" -m benchmarks.bench_volo --model "$MODEL" --overrides "$OVERRIDES" \
    --batch "$BATCH" --reps "$REPS" --warmup 3 --modes infer,train --backends "$BACKENDS" \
    --timeout 150 --json "$OUT/volo.json"

# 2. Which outlook implementation is fastest here (the whole model, bf16).
for impl in planes pallas; do
    step "impl_$impl" 60 "$PY" -m benchmarks.bench_volo --model "$MODEL" \
        --overrides "$("$PY" -c "import json,sys; d=json.loads(sys.argv[1]); d['outlook_impl']='$impl'; print(json.dumps(d))" "$OVERRIDES")" \
        --batch "$BATCH" --reps "$REPS" --warmup 2 --modes infer,train --backends jax_bf16 \
        --timeout 55 --json "$OUT/impl_$impl.json"
done

# 3. Every implementation (the Pallas kernel compiled, not interpreted) against the
#    unfold + scatter-add reference, forward and gradients.
step outlook_tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_outlook.py

# 4. Outlook attention alone, every implementation and timm's.
step ops 60 "$PY" -m benchmarks.bench_ops "${OPS_ARGS[@]}" --json "$OUT/ops.json"

echo "[gpu_bars] done in $((SECONDS - started))s; results in $OUT"
