#!/usr/bin/env bash
# One prepared command for a GPU machine (an H200 with jax 0.11.x preinstalled, Python 3.12, no
# network): checks correctness on the GPU, then times attention, linear and lora at GPU sizes.
# Budget: under 8 minutes in all. Full log and JSON go to $OUT (a temp dir when unset); the summary
# table is printed last. It runs this checkout's jaxla (PYTHONPATH below); the suites are modules of
# the package (jaxla/benchmarks/), run through 'jaxla bench'.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Let XLA take memory as it needs rather than 75% up front, so peak-memory figures mean something.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.txt"
: >"$LOG"
: >"$STEPS"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log everything, record rc and time
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  printf '%-16s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STEPS"
  echo "--- $name rc=$rc" >>"$LOG"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'
} >>"$LOG" 2>&1

# 1. Correctness on the GPU: compiled-lowering tests and the attention/LoRA suites' GPU paths.
step tests 150 $PY -m pytest -q -x -m gpu -p no:cacheprovider tests
# 2. Flash-attention kernel vs cuDNN and XLA (bf16, 16k tokens, N=16, H=128, T 1k..16k).
step attention_gpu 200 $PY -m jaxla bench attention_gpu --json "$OUT/attention_gpu.json"
# 3. Suites at GPU sizes (each picks GPU shapes when the backend is not cpu).
step linear 45 $PY -m jaxla bench linear --json "$OUT/linear.json"
step lora 45 $PY -m jaxla bench lora --json "$OUT/lora.json"
step attention 30 $PY -m jaxla bench attention --quick --json "$OUT/attention.json"

{
  echo
  echo "=== steps"
  cat "$STEPS"
  $PY -m jaxla bench summarize "$OUT"
} 2>&1 | tee -a "$LOG"
