#!/usr/bin/env bash
# gpu-engine.sh — the engine on the GPU in one go, from a bundled CUDA build
# directory (scripts/gpu-bundle.sh, then copy the programs, libalbedo.so* and
# devlibs/ into one folder):
#
#   1. test_ops_cuda      every kernel (paged rope / attention included)
#   2. test_model_cuda    sessions and engine tickets against the CPU f32 path
#   3. albedo bench chartqa --backend cuda   (BATCHES, MODES, IMAGES, WARMUP:
#      its --warmup, 8 by default; REPEAT times; MODEL md2 or md3; WEIGHTS:
#      its --weights, e.g. fp8 for Moondream 3's experts), and on the CPU
#      (CPU_BATCHES, CPU_MODES, CPU_IMAGES)
#   (SANITIZE=1 adds compute-sanitizer memcheck over test_ops_cuda --small;
#    DECODE=1 bench_decode, E2E=1 bench_e2e (sessions); SKIP_TESTS=1 skips
#    the two tests.)
#
#   scripts/gpu-engine.sh DIR
#
# Logs go to $OUT (or DIR/gpu-engine/). The full-size synthetic model is
# written once to $ALBEDO_CACHE/synthetic-md2 (default /tmp/albedo-cache).
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-build-g1-run}
LOG=${OUT:-$B/gpu-engine}
mkdir -p "$LOG"
export LD_LIBRARY_PATH="$PWD/$B:$PWD/$B/devlibs:${LD_LIBRARY_PATH:-}"
if [ -d /usr/local/cuda/lib64 ]; then export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/usr/local/cuda/lib64"; fi
export ALBEDO_SRC="$PWD" ALBEDO_WORK="${ALBEDO_WORK:-/tmp/albedo-gpu-check}" ALBEDO_CACHE="${ALBEDO_CACHE:-/tmp/albedo-cache}"
mkdir -p "$ALBEDO_WORK" "$ALBEDO_CACHE"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | tee "$LOG/gpu.log"
fail=0
STEP_SHOW_FAILS=1
. scripts/gpu-lib.sh
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    [ "${SKIP_OPS:-0}" = 1 ] || step ops 3 "$B/test_ops_cuda"
    [ "${SKIP_OPS:-0}" = 1 ] || grep -E "paged" "$LOG/ops.log" | head -n 40
    step model 8 "$B/test_model_cuda"
    grep -E "engine batch" "$LOG/model.log"
fi
if [ "${SANITIZE:-0}" = 1 ]; then
    step memcheck 4 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/test_ops_cuda" --small
fi
if [ "${DECODE:-0}" = 1 ]; then
    step decode 22 "$B/bench_decode" 100
fi
if [ "${E2E:-0}" = 1 ]; then
    step e2e 26 "$B/bench_e2e" --image tests/data/images/rocket.jpg
fi
# The GPT-2 BPE vocabulary (like Moondream's) gives the prompts their real
# length; BYTE_TOKENIZER=1 keeps the synthetic byte-level one (~3x longer).
TOK=()
if [ "${BYTE_TOKENIZER:-0}" != 1 ]; then
    gunzip -c tests/data/tokenizer/gpt2.tokenizer.json.gz >"$ALBEDO_CACHE/gpt2.tokenizer.json"
    TOK=(--tokenizer "$ALBEDO_CACHE/gpt2.tokenizer.json")
fi
if [ -n "${BATCHES:-}" ]; then
    for r in $(seq 1 "${REPEAT:-1}"); do
        step "chartqa$r" 12 "$B/albedo" bench chartqa --synthetic "${MODEL:-md2}" "${TOK[@]}" --backend cuda \
            --batch "$BATCHES" --mode "${MODES:-direct,cot}" --images "${IMAGES:-32}" --warmup "${WARMUP:-8}" \
            ${WEIGHTS:+--weights "$WEIGHTS"}
    done
fi
if [ -n "${CPU_BATCHES:-}" ]; then # the CPU path of the same build, for the record
    step chartqa-cpu 8 timeout "${CPU_TIMEOUT:-180}" "$B/albedo" bench chartqa --synthetic md2 "${TOK[@]}" \
        --batch "$CPU_BATCHES" --mode "${CPU_MODES:-direct}" --images "${CPU_IMAGES:-2}"
fi
echo "gpu-engine: $([ $fail -eq 0 ] && echo all passed || echo FAILURES)"
exit $fail
