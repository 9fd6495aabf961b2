#!/usr/bin/env bash
# The GPU measurements in one prepared run, sized for 10 minutes on one GPU (the whole
# script stops starting steps after $TOTAL seconds, 560 by default, and cuts the last
# one short; each step has its own time limit, a failing step does not stop the next,
# and stdout carries each step's exit status and the tail of its log).
# Run from the repository root with a Python that has jax (CUDA), flax, optax, torch and
# timm:
#
#   OUT=/tmp/gpu bash benchmarks/gpu_bars.sh            # on the GPU machine
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_bars.sh  # tiny shapes, any machine
#
# Steps, most wanted first, each logging to $OUT/<step>.txt:
#   1. ops_<impl>.json: outlook attention at VOLO-D1's outlooker shape (batch 128, 28x28x192,
#      6 heads, K=3, s=2, bf16), one fresh process per implementation (reference, slices,
#      planes, pallas): the aggregate from the weights, softmax + aggregate from the
#      logits, and the Flax layer, forward and forward+backward, with the device's
#      peak_bytes_in_use (per process, so per implementation), XLA's memory plan and the
#      largest difference from a float32 reference (the Pallas kernel compiled, not
#      interpreted);
#   2. volo_train.json: the whole volo_d1_224 train step, JAX bf16 against timm AMP eager
#      and torch.compile with the same autocast, batch 128 (BACKENDS=...,torch_compile
#      adds float32 torch.compile);
#   3. ops_torch.json: timm's OutlookAttention and the F.unfold / F.fold aggregate, bf16;
#   4. volo_infer.json: inference, the same backends;
#   5. impl_<impl>.json: the whole train step in bf16 with outlook planes (the GPU
#      default is pallas, timed in step 2), and attn_xla.json with XLA's self-attention
#      instead of cuDNN's flash attention (the GPU default from Ampere on): the A/Bs
#      behind the GPU's 'auto', if time remains.
# machine.txt records the GPU, the driver and the library versions.
set -u
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results/gpu_$(date +%Y%m%d_%H%M)}
SCALE=${SCALE:-1}  # multiplies every time limit (SMOKE=1: SCALE_SMOKE, default 3)
BATCH=${BATCH:-128}
REPS=${REPS:-10}
MODEL=${MODEL:-volo_d1_224}
OVERRIDES=${OVERRIDES:-'{}'}
BACKENDS=${BACKENDS:-jax_bf16,torch_amp,torch_compile_amp}
IMPLS=${IMPLS:-reference slices planes pallas}
OPS_ARGS=(--batch "$BATCH" --dtype bfloat16 --reps 20 --warmup 3)
OPS_ONLY='outlook_aggregate|OutlookAttention layer'
WHOLE_MODEL_IMPLS=${WHOLE_MODEL_IMPLS:-planes}
if [[ ${SMOKE:-0} == 1 ]]; then  # every step, fewer rows and workers
    BATCH=2 REPS=1 BACKENDS=jax_bf16,torch_eager
    OVERRIDES='{"layers": [1, 1, 1, 1], "img_size": 64}'
    SCALE=${SCALE_SMOKE:-3}
    OPS_ARGS=(--batch 2 --size 8 --dim 12 --heads 2 --dtype bfloat16 --reps 1 --warmup 0)
    OPS_ONLY='softmax\+outlook_aggregate' WHOLE_MODEL_IMPLS=planes
fi
TOTAL=${TOTAL:-$((560 * SCALE))}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
started=$SECONDS

s() {  # s SECONDS: a time limit, scaled
    echo $(($1 * SCALE))
}

step() {  # step NAME SECONDS COMMAND...: COMMAND under a time limit (at most what is left)
    local name=$1 limit=$2 left=$((TOTAL - (SECONDS - started)))
    shift 2
    if ((left < 20)); then
        echo "[gpu_bars] $name: skipped, ${left}s left of ${TOTAL}s"
        return
    fi
    ((limit > left)) && limit=$left
    echo "[gpu_bars] $name (limit ${limit}s, $((SECONDS - started))s so far)"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "[gpu_bars] $name: exit $rc$( ((rc == 124)) && echo ' (time limit)')"
    tail -n 20 "$OUT/$name.txt"
}

with_override() {  # with_override FIELD VALUE: OVERRIDES with FIELD set
    "$PY" -c 'import json, sys; d = json.loads(sys.argv[1]); d[sys.argv[2]] = sys.argv[3]
print(json.dumps(d))' "$OVERRIDES" "$1" "$2"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c 'import jax, flax, torch, timm; print("jax", jax.__version__, jax.devices());
print("flax", flax.__version__, "torch", torch.__version__, "timm", timm.__version__)' 2>&1
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

# 1. Every outlook implementation alone, one process each (peak memory per implementation).
# A worker that runs out of time still reports the rows it finished.
for impl in $IMPLS; do
    step "ops_$impl" "$(s 55)" "$PY" -m benchmarks.bench_ops "${OPS_ARGS[@]}" --frameworks jax \
        --impls "$impl" --only "$OPS_ONLY" --timeout "$(s 45)" \
        --json "$OUT/ops_$impl.json"
done

# 2. The train-step bars: JAX bf16 against timm AMP and torch.compile, same batch and weights.
#    One worker per backend, each at most 140 s (compile included: torch.compile's is the
#    longest); the log has each worker's result as it ends, should the step run out.
step volo_train "$(s 330)" "$PY" -m benchmarks.bench_volo --model "$MODEL" \
    --overrides "$OVERRIDES" --batch "$BATCH" --reps "$REPS" --warmup 3 --modes train \
    --backends "$BACKENDS" --timeout "$(s 140)" --json "$OUT/volo_train.json"

# 3. timm's layer and the torch aggregate at the same shape.
step ops_torch "$(s 45)" "$PY" -m benchmarks.bench_ops "${OPS_ARGS[@]}" --frameworks torch \
    --only 'timm|F.unfold/fold' --timeout "$(s 35)" --json "$OUT/ops_torch.json"

# 4. Inference, the same backends.
step volo_infer "$(s 210)" "$PY" -m benchmarks.bench_volo --model "$MODEL" \
    --overrides "$OVERRIDES" --batch "$BATCH" --reps "$REPS" --warmup 3 --modes infer \
    --backends "$BACKENDS" --timeout "$(s 65)" --json "$OUT/volo_infer.json"

# 5. The whole train step with the other choices: outlook implementations (the default
#    here is pallas) and XLA's self-attention (the default here is cuDNN's).
for impl in $WHOLE_MODEL_IMPLS; do
    step "impl_$impl" "$(s 80)" "$PY" -m benchmarks.bench_volo --model "$MODEL" \
        --overrides "$(with_override outlook_impl "$impl")" --batch "$BATCH" --reps "$REPS" \
        --warmup 2 --modes train --backends jax_bf16 --timeout "$(s 60)" \
        --json "$OUT/impl_$impl.json"
done
step attn_xla "$(s 80)" "$PY" -m benchmarks.bench_volo --model "$MODEL" \
    --overrides "$(with_override attention_impl xla)" --batch "$BATCH" --reps "$REPS" \
    --warmup 2 --modes train --backends jax_bf16 --timeout "$(s 60)" \
    --json "$OUT/attn_xla.json"

echo "[gpu_bars] done in $((SECONDS - started))s; results in $OUT"
