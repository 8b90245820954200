#!/usr/bin/env bash
# gpu-check.sh — every GPU test and benchmark of the CUDA backend in one go,
# on a machine with an NVIDIA GPU (docs/CUDA.md), from a CUDA build:
#
#   1. test_ops_cuda     every kernel against the CPU reference
#   2. test_model_cuda   Moondream 2 end to end through backend "cuda" against
#                        the CPU float32 path and the fixtures (bf16 tolerances)
#      test_md3_cuda     the same for Moondream 3 (md3-small: tau, experts)
#   3. bench_decode      the kernels at Moondream 2's full shapes (graphs)
#   4. bench_e2e         the full model through the API: start-up, cold and
#                        warm direct query, decode tok/s, ChartQA-like batch 1
#   5. bench_moe         Moondream 3's expert MLP at full shapes (every tile shape)
#   6. bench_image       the host's part of a cold image (decode, resizes,
#                        crops) at 1, 2 and all threads, when it was built
#   (DECODE_REPS, E2E_REPEATS, MOE_REPS set the benchmarks' repeats (100, 20,
#   20); FP8=1 adds bench_e2e with the fp8 KV cache (--kv-dtype fp8);
#   CEILINGS=1 adds what the libraries reach at the same shapes: bench_ceilings
#   (cuBLASLt's heuristic against its fastest candidate, FP8 forms) and
#   bench/cuda/torch_ceilings.py (PyTorch's attention backends, TunableOp);
#   SANITIZE=1 adds compute-sanitizer memcheck over test_ops_cuda --small and
#   test_md3_cuda; MD3=1 writes the full-size synthetic Moondream 3, 18 GB, to
#   $ALBEDO_CACHE/synthetic-md3 with the albedo CLI and runs bench_e2e on it.)
#
#   scripts/gpu-check.sh [BUILD_DIR]     (default build-cuda)
#
# Each step's output goes to $OUT/<step>.log (or BUILD_DIR/gpu-check/); the
# tail of each is printed with its exit status; the script exits nonzero if
# any step failed. BUILD_DIR/devlibs (scripts/gpu-bundle.sh) joins the library
# path when present. The full-size synthetic model is written once to
# $ALBEDO_CACHE/synthetic-md2 (default /tmp/albedo-cache).
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-build-cuda}
LOG=${OUT:-$B/gpu-check}
mkdir -p "$LOG"
if [ -d "$B/devlibs" ]; then export LD_LIBRARY_PATH="$PWD/$B/devlibs:${LD_LIBRARY_PATH:-}"; fi
if [ -d /usr/local/cuda/lib64 ]; then export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64"; fi
export ALBEDO_SRC="$PWD" ALBEDO_WORK="${ALBEDO_WORK:-/tmp/albedo-gpu-check}" ALBEDO_CACHE="${ALBEDO_CACHE:-/tmp/albedo-cache}"
mkdir -p "$ALBEDO_WORK" "$ALBEDO_CACHE"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$LOG/gpu.log"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo +changes)"

fail=0
. scripts/gpu-lib.sh
step ops 4 "$B/test_ops_cuda"
step model 12 "$B/test_model_cuda"
step md3 8 "$B/test_md3_cuda"
step decode 20 "$B/bench_decode" "${DECODE_REPS:-100}"
step e2e 24 "$B/bench_e2e" --image tests/data/images/rocket.jpg --repeats "${E2E_REPEATS:-20}"
if [ "${FP8:-0}" = 1 ]; then
    step e2e_fp8 24 "$B/bench_e2e" --image tests/data/images/rocket.jpg --repeats "${E2E_REPEATS:-20}" --kv-dtype fp8
fi
step moe 16 "$B/bench_moe" "${MOE_REPS:-20}"
[ -x "$B/bench_image" ] && step image 24 "$B/bench_image"
if [ "${CEILINGS:-0}" = 1 ]; then
    step ceilings 60 "$B/bench_ceilings"
    step torch_ceilings 30 python3 bench/cuda/torch_ceilings.py
fi
if [ "${MD3:-0}" = 1 ]; then
    M3="$ALBEDO_CACHE/synthetic-md3"
    [ -f "$M3/tokenizer.json" ] || step synth_md3 1 "$B/albedo" synth --preset md3 --out "$M3" --seed 1
    step e2e_md3 30 "$B/bench_e2e" --model "$M3" --image tests/data/images/rocket.jpg --repeats 10
fi
if [ "${SANITIZE:-0}" = 1 ]; then
    step memcheck 4 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/test_ops_cuda" --small
    step memcheck_md3 4 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/test_md3_cuda"
fi
echo "gpu-check: $([ $fail -eq 0 ] && echo all passed || echo FAILURES)"
exit $fail
