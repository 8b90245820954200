#!/usr/bin/env bash
# build-cuda.sh — configure and build the library with the CUDA backend
# (docs/CUDA.md) for every architecture in CMakeLists.txt's ALBEDO_CUDA block.
# CI runs it where nvcc exists; it needs no GPU (the GPU tests and the
# benchmark, build-cuda/test_ops_cuda and build-cuda/bench_decode, run on a
# machine that has one).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-cuda -DALBEDO_CUDA=ON -DALBEDO_TESTS=OFF
cmake --build build-cuda -j"${JOBS:-2}"
