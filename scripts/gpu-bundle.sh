#!/usr/bin/env bash
# gpu-bundle.sh — make a CUDA build directory runnable on a bare GPU machine
# (scripts/gpu-check.sh there): copies the shared libraries that its GPU
# test and benchmark programs and the albedo CLI load, other than the C/C++ runtime and CUDA's
# own (which such a machine has), into BUILD/devlibs under their sonames.
#   scripts/gpu-bundle.sh [BUILD_DIR]      (default build-cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build-cuda}
mkdir -p "$B/devlibs"
for prog in test_ops_cuda test_model_cuda test_md3_cuda bench_decode bench_moe bench_e2e albedo bench_image; do
    if [ ! -x "$B/$prog" ]; then
        # the CLI (albedo bench chartqa) and bench_image (the host's decode + crops) are optional
        [ "$prog" = albedo ] || [ "$prog" = bench_image ] && continue
        echo "gpu-bundle: $B/$prog is missing (build it first)" >&2
        exit 1
    fi
    ldd "$B/$prog" | awk '$3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r soname path; do
    case "$soname" in
    libc.so* | libm.so* | libstdc++* | libgcc_s* | libpthread* | libdl.so* | librt.so* | ld-linux* | libcuda* | libcublas*) ;;
    *) cp -L "$path" "$B/devlibs/$soname" ;;
    esac
done
ls "$B/devlibs"
