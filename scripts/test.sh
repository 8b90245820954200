#!/usr/bin/env bash
# The whole test suite, as CI runs it: build with warnings as errors, the C
# tests (ops, tokenizer, images, model stages and cases, bad input), the CLI
# end-to-end cases, the server and Python package, the ARM64 kernels under
# qemu, the sanitizer builds and the fuzz corpus replay, the thread sanitizer
# over the engine and the server, a 60-second soak of the server, and
# formatting.
# Prints "N passed, N failed" per part and exits nonzero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
scripts/deps.sh --test || exit 1
jobs=$(nproc)
failed=0
part() { # name command...
  local name=$1; shift
  echo "=== $name"
  local t0=$SECONDS
  if "$@"; then echo "--- $name: ok ($((SECONDS - t0)) s)"; else echo "--- $name: FAILED ($((SECONDS - t0)) s)"; failed=$((failed + 1)); fi
}
build() {
  cmake -S . -B build-ci -DCMAKE_BUILD_TYPE=Release -DALBEDO_WERROR=ON >/dev/null &&
  cmake --build build-ci -j"$jobs" 2>&1 | grep -E "error|warning|Error" ; test "${PIPESTATUS[0]}" -eq 0
}
part build build || { echo "build failed"; exit 1; }
part "C tests" ctest --test-dir build-ci --output-on-failure
part "CLI cases" python3 tests/cli/test_cli.py build-ci
[ -x tests/server/run.sh ] && part "server and Python package" env ALBEDO_BUILD_DIR="$root/build-ci" ALBEDO_TEST_PIP=1 tests/server/run.sh
[ -x scripts/test-arm64.sh ] && part "ARM64 NEON under qemu" scripts/test-arm64.sh
[ -x scripts/sanitize.sh ] && part "sanitizers and fuzz replay" scripts/sanitize.sh
[ -x scripts/sanitize.sh ] && part "thread sanitizer: engine and server" env SANITIZE_STEPS=tsan scripts/sanitize.sh
[ -f tests/soak/soak.py ] && part "soak (60 s, loopback)" python3 tests/soak/soak.py --build build-ci --seconds 60
[ -x scripts/check-format.sh ] && part "formatting" scripts/check-format.sh
[ -x scripts/build-cuda.sh ] && command -v nvcc >/dev/null && part "CUDA build" scripts/build-cuda.sh
if [ "$failed" -ne 0 ]; then echo "$failed part(s) failed"; exit 1; fi
echo "all parts passed"
