#!/usr/bin/env bash
# The GPU half of docs/benchmarks.md: every JAX number beside PyTorch's on the same GPU, in one go.
#
#   bash benchmarks/gpu.sh [STAGE ...]      # default: every stage, in the order below
#
# Runs from the repository root with the machine's own python3 (JAX with CUDA, Flax, optax, torch and
# torchvision installed; nothing is installed here). Each stage has its own time limit, so a slow one
# cannot starve the rest. Logs go to $OUT/log.txt, every bench's JSON to $OUT/results.jsonl (one line each).
set -u
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
RES=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BATCH=${BATCH:-128}
log() { echo "$@" | tee -a "$OUT/log.txt"; }

bench() {  # bench NAME LIMIT_S ARGS...: one python -m resnext_jax.benchmarks.step run
  local name=$1 limit=$2; shift 2
  log "## $name: python -m resnext_jax.benchmarks.step $*  (limit ${limit}s, $(date -u +%H:%M:%S))"
  timeout "$limit" $PY -m resnext_jax.benchmarks.step "$@" --json "$RES/$name.json" 2>&1 | grep -v "^W0000\|^I0000" \
    | tee -a "$OUT/log.txt" | tail -n 12
  [ -f "$RES/$name.json" ] && { tr -d '\n' < "$RES/$name.json"; echo; } >> "$OUT/results.jsonl"
}

stage() {
  case $1 in
    env)
      { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        $PY -c "import jax, flax, optax, torch, torchvision; print('jax', jax.__version__, jax.devices(), 'flax', \
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
      } 2>&1 | tee -a "$OUT/log.txt" ;;
    resnext_train)  # the target: bf16 train vs PyTorch AMP + channels_last
      bench resnext_train 150 --model resnext50_32x4d --mode train --dtype bfloat16 --batch "$BATCH" \
        --torch-channels-last --runs 10 --rounds 3 ;;
    conv)  # every grouped-conv implementation on ResNeXt-50's grouped shapes vs torch's cuDNN
      local args="--dtypes bfloat16 --impls xla,split,chunked,blockdiag,gemm --batch $BATCH --reps 20"
      log "## conv: python -m resnext_jax.benchmarks.conv $args"
      timeout 150 $PY -m resnext_jax.benchmarks.conv $args 2>&1 | grep -v "^W0000\|^I0000" | tee -a "$OUT/log.txt" ;;
    resnext_infer)
      bench resnext_infer 90 --model resnext50_32x4d --mode infer --dtype bfloat16 --batch "$BATCH" \
        --torch-channels-last --runs 10 --rounds 3 ;;
    resnet_train)
      bench resnet_train 90 --model resnet50 --mode train --dtype bfloat16 --batch "$BATCH" \
        --torch-channels-last --runs 10 --rounds 3 ;;
    regnet_train)
      bench regnet_train 240 --model regnet_y_1_6gf --mode train --dtype bfloat16 --batch "$BATCH" \
        --torch-channels-last --runs 10 --rounds 3 ;;
    resnext_split)  # 'auto' on GPU is 'xla': the whole model with 'split' instead, for contrast
      bench resnext_split 150 --model resnext50_32x4d --mode train --dtype bfloat16 --batch "$BATCH" \
        --conv-impl split --torch-channels-last --runs 10 --rounds 2 ;;
    resnext_blockdiag)  # every grouped conv as one block-diagonal dense conv (faster than cuDNN's on narrow groups)
      bench resnext_blockdiag 150 --model resnext50_32x4d --mode train --dtype bfloat16 --batch "$BATCH" \
        --conv-impl blockdiag --torch-channels-last --runs 10 --rounds 3 ;;
    resnext_f32)
      bench resnext_f32 120 --model resnext50_32x4d --mode train --dtype float32 --batch "$BATCH" \
        --runs 10 --rounds 2 ;;
    profile)
      bench resnext_profile 150 --model resnext50_32x4d --mode train --dtype bfloat16 --batch "$BATCH" \
        --no-torch --runs 5 --rounds 1 --profile /tmp/resnext_trace ;;
    tests)  # correctness on the GPU: every implementation against the float64 reference, BatchNorm's backward
      log "## tests: JAX_DEFAULT_MATMUL_PRECISION=highest pytest tests/test_grouped_conv.py tests/test_batch_norm.py"
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout 120 $PY -m pytest -q -x -p no:cacheprovider -m "not slow" \
        tests/test_grouped_conv.py tests/test_batch_norm.py 2>&1 | tail -n 15 | tee -a "$OUT/log.txt" ;;
    *) echo "unknown stage $1" >&2; return 2 ;;
  esac
}

STAGES=${*:-env resnext_train conv resnext_infer resnet_train regnet_train resnext_blockdiag resnext_split resnext_f32 profile tests}
for s in $STAGES; do stage "$s"; done
rm -rf "$RES"
