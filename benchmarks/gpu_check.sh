#!/usr/bin/env bash
# One prepared command for a GPU machine (an H200 with jax 0.11.x preinstalled, Python 3.12, no
# network): checks correctness on the GPU, then times attention, linear and lora at GPU sizes.
# The whole script stays under 6 minutes: every step (the header and the summary too) runs under
# its own time limit, clamped to what is left of BUDGET seconds, and a step with too little left is
# skipped and says so. Nothing is lost when a step fails or times out: each step writes its own log
# section and JSON ($OUT/<step>.json; attention_gpu rewrites its JSON after every row), and the step
# table ($OUT/steps.txt) gets its line as soon as the step ends. The summary table is printed last.
# It runs this checkout's jaxla (PYTHONPATH below); the suites are modules of the package
# (jaxla/benchmarks/), run through 'jaxla bench'.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#   DRY_RUN=1 OUT=/tmp/dry bash benchmarks/gpu_check.sh   # every step, tiny shapes, any machine
#   LIST_STEPS=1 bash benchmarks/gpu_check.sh             # print each step's command, run nothing
#   ONLY="header tests" ...                                # run only the named steps
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Let XLA take memory as it needs rather than 75% up front, so peak-memory figures mean something.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
LIST_STEPS=${LIST_STEPS:-0}
ONLY=${ONLY:-}
BUDGET=${BUDGET:-345}  # seconds for everything; 6 minutes less a margin for start-up and teardown
LOG="$OUT/gpu_check.log"
STEPS="$OUT/steps.txt"
END=$((SECONDS + BUDGET))
QUICK=()
[ "$DRY_RUN" = 1 ] && QUICK=(--quick)
# Only the modules that hold GPU tests: one import error elsewhere cannot zero the run.
GPU_TESTS=(tests/test_pallas_attention.py)
if [ "$LIST_STEPS" != 1 ]; then
  : >"$LOG"
  : >"$STEPS"
fi

step() {  # step NAME SECONDS COMMAND...: bounded run, log everything, record rc and time at once
  local name=$1 limit=$2
  shift 2
  if [ "$LIST_STEPS" = 1 ]; then
    echo "$name|$limit|$*"
    return 0
  fi
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  local left=$((END - SECONDS - 5))  # keep 5 s for the summary line
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    printf '%-16s rc=%-7s %4ss  (no time left in the %ss budget)\n' "$name" skipped 0 "$BUDGET" \
      >>"$STEPS"
    echo "=== $name skipped: ${left}s left" >>"$LOG"
    return 0
  fi
  local t0=$SECONDS
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" >>"$LOG"
  # SIGTERM at the limit, SIGKILL 5 s later if the process ignores it (a hung GPU call can).
  timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="  (timed out)"
  printf '%-16s rc=%-7s %4ss%s\n' "$name" "$rc" "$((SECONDS - t0))" "$note" >>"$STEPS"
  echo "--- $name rc=$rc" >>"$LOG"
}

step header 15 bash -c "date -u; (nvidia-smi --query-gpu=name,memory.total,driver_version \
--format=csv || true) 2>&1 | head -5; $PY -c 'import jax, jaxlib; print(\"jax\", jax.__version__, \
\"jaxlib\", jaxlib.__version__, jax.devices())'"
# 1. Correctness on the GPU: the compiled-kernel tests (GQA, window, soft cap, segments, head dims
#    64-256, f16), then the kernel against the f32 reference inside the attention_gpu suite.
step tests 80 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"
# 2. Flash-attention kernel vs cuDNN and XLA (bf16, 16k tokens, N=16, H=128, T 1k..16k).
step attention_gpu 150 "$PY" -m jaxla bench attention_gpu "${QUICK[@]}" --json "$OUT/attention_gpu.json"
# 3. Suites at GPU sizes (each picks GPU shapes when the backend is not cpu). The attention suite
#    checks jaxla against jax.nn in f32: both at highest matmul precision, so TF32 rounding in one of
#    them is never reported as a failure.
step linear 30 "$PY" -m jaxla bench linear "${QUICK[@]}" --json "$OUT/linear.json"
step lora 30 "$PY" -m jaxla bench lora "${QUICK[@]}" --json "$OUT/lora.json"
step attention 25 env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m jaxla bench attention --quick \
  --json "$OUT/attention.json"
step summary 10 bash -c '"$0" -m jaxla bench summarize "$1" >"$1/summary.txt"' "$PY" "$OUT"

[ "$LIST_STEPS" = 1 ] && exit 0
echo
[ -f "$OUT/summary.txt" ] && cat "$OUT/summary.txt"
echo "=== steps (log: $LOG)"
cat "$STEPS"
