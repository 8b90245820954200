#!/usr/bin/env bash
# build-cuda.sh — configure and build the library with the CUDA backend
# (docs/CUDA.md) for every architecture in CMakeLists.txt's ALBEDO_CUDA block.
# CI runs it where nvcc exists; it needs no GPU. The GPU tests and benchmarks
# (build-cuda/test_ops_cuda, test_model_cuda, bench_decode, bench_e2e) run on a
# machine that has one: scripts/gpu-bundle.sh here, scripts/gpu-check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-cuda -DALBEDO_CUDA=ON -DALBEDO_TESTS=OFF
cmake --build build-cuda -j"${JOBS:-2}"
