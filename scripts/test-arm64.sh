#!/bin/sh
# test-arm64.sh — cross-compile the CPU op test and the image resize kernel
# test for aarch64 (NEON kernels) and run them under qemu user-mode emulation. Needs gcc-aarch64-linux-gnu and
# qemu-user (Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu qemu-user).
# The binary is static, so no aarch64 sysroot is needed at run time.
#
#   scripts/test-arm64.sh [build-dir]      (default: build-arm64)
#
# Exits nonzero if the build or any check fails.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$root/build-arm64"}
CC=${CC:-aarch64-linux-gnu-gcc}
QEMU=${QEMU:-qemu-aarch64}
command -v "$CC" >/dev/null || { echo "test-arm64: $CC not found" >&2; exit 2; }
command -v "$QEMU" >/dev/null || { echo "test-arm64: $QEMU not found" >&2; exit 2; }
mkdir -p "$out"
"$CC" -std=c11 -O2 -DALBEDO_ARM64=1 -static \
    -Wall -Wextra -Wpedantic -Wshadow -Wstrict-prototypes \
    -I"$root/include" -I"$root/src" -I"$root/tests" \
    -DALBEDO_SOURCE_DIR="\"$root\"" \
    "$root/src/cpu/ops_ref.c" "$root/src/cpu/ops_cpu.c" "$root/src/cpu/ops_generic.c" "$root/src/cpu/ops_neon.c" \
    "$root/src/cpu/threadpool.c" "$root/src/error.c" "$root/tests/test_ops.c" \
    -lm -lpthread -o "$out/test_ops"
"$QEMU" "$out/test_ops"
"$CC" -std=c11 -O2 -DALBEDO_ARM64=1 -DKERNELS_ONLY=1 -static \
    -Wall -Wextra -Wpedantic -Wshadow -Wstrict-prototypes \
    -I"$root/include" -I"$root/src" -I"$root/tests" \
    -DALBEDO_SOURCE_DIR="\"$root\"" \
    "$root/src/cpu/resample.c" "$root/src/cpu/resample_neon.c" "$root/tests/test_image_kernels.c" \
    -o "$out/test_image_kernels"
"$QEMU" "$out/test_image_kernels"
