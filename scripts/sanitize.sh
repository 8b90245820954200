#!/usr/bin/env bash
# sanitize.sh — the sanitizer pass CI runs (docs/FUZZING.md):
#   1. build-asan/: the library, CLI and tests with ASan+UBSan (clang), the
#      SIMD kernel files uninstrumented for ASan, and the whole ctest suite;
#      then build-asan-kernels/: the kernels instrumented too, and their own
#      tests (test_ops, test_image_kernels);
#   2. build-fuzz/: the fuzz targets (libFuzzer, ASan+UBSan), each replayed
#      over its committed corpus fuzz/corpus/<target>/ and saved crashes
#      fuzz/regressions/<target>/;
#   3. (only when asked: SANITIZE_STEPS=tsan, its own part of scripts/test.sh)
#      build-tsan/ (TSAN_BUILD_DIR): ThreadSanitizer over the threaded code —
#      the engine's scheduler (tests/test_engine.c) and the HTTP server
#      (tests/server: REST, errors, slow and vanishing clients, queue and
#      deadline, limits, shutdown, batching and cancellation). A data race
#      fails the run: test_engine and every server the tests start exit
#      nonzero (66) after a report. The SIMD kernel files are left
#      uninstrumented (CMakeLists.txt), which keeps this to a few minutes.
# Exits nonzero on the first failure. Works from a clean clone: installs
# clang, its sanitizer/libFuzzer runtimes and the build dependencies with
# apt-get when they are missing (as root, Debian 12).
#
#   scripts/sanitize.sh            # steps 1 and 2
#   SANITIZE_STEPS=fuzz scripts/sanitize.sh   # only the replay ("asan" for only ctest)
#   SANITIZE_STEPS=tsan scripts/sanitize.sh   # only the thread sanitizer
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
JOBS=${JOBS:-$(nproc)}
STEPS=${SANITIZE_STEPS:-"asan fuzz"}

apt_install() {
  echo "sanitize.sh: installing $*"
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# clang with its runtimes: libclang-rt-14-dev holds libFuzzer and the
# sanitizer libraries on Debian 12 (pulled in by the libclang-rt-dev metapackage).
command -v clang >/dev/null || apt_install clang
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; return (int)n * 0; }' \
  >"$probe/p.c"
if ! clang -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" 2>/dev/null; then
  apt_install libclang-rt-dev || apt_install "libclang-rt-$(clang -dumpversion | cut -d. -f1)-dev"
fi
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v pkg-config >/dev/null || missing+=(pkg-config)
for p in jansson:libjansson-dev libpcre2-8:libpcre2-dev libutf8proc:libutf8proc-dev libjpeg:libjpeg-dev \
         libpng:libpng-dev libwebp:libwebp-dev zlib:zlib1g-dev libcurl:libcurl4-openssl-dev \
         libmicrohttpd:libmicrohttpd-dev; do
  pkg-config --exists "${p%%:*}" 2>/dev/null || missing+=("${p#*:}")
done
[ -f /usr/include/gif_lib.h ] || missing+=(libgif-dev)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
command -v llvm-symbolizer >/dev/null || export ASAN_SYMBOLIZER_PATH=$(ls /usr/lib/llvm-*/bin/llvm-symbolizer 2>/dev/null | tail -1)

export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

if [[ " $STEPS " == *" asan "* ]]; then
  # The whole suite with the SIMD kernel files uninstrumented for ASan (UBSan
  # stays on everywhere): under ASan ~90% of the model tests' time went to the
  # kernels' checked vector loads (test_engine 302 s against 38 s). The
  # kernels' own tests, every kernel and ISA at odd sizes against poisoned
  # buffers, then run in build-asan-kernels/ with the kernels instrumented.
  echo "== ASan+UBSan build and ctest (build-asan/, SIMD kernels uninstrumented for ASan)"
  cmake -S . -B build-asan -DCMAKE_C_COMPILER=clang -DALBEDO_SANITIZE=ON -DALBEDO_SANITIZE_KERNELS=OFF \
    -DCMAKE_C_FLAGS=-g
  cmake --build build-asan -j"$JOBS"
  (cd build-asan && ctest --output-on-failure)
  echo "== ASan+UBSan over the kernels' tests, kernels instrumented (build-asan-kernels/)"
  cmake -S . -B build-asan-kernels -DCMAKE_C_COMPILER=clang -DALBEDO_SANITIZE=ON -DALBEDO_SANITIZE_KERNELS=ON \
    -DCMAKE_C_FLAGS=-g
  cmake --build build-asan-kernels -j"$JOBS" --target test_ops test_image_kernels
  (cd build-asan-kernels && ctest --output-on-failure -R '^(test_ops|test_image_kernels)$')
fi

if [[ " $STEPS " == *" fuzz "* ]]; then
  echo "== fuzz targets: replay of the committed corpus (build-fuzz/)"
  cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DALBEDO_FUZZ=ON -DALBEDO_TESTS=OFF
  cmake --build build-fuzz -j"$JOBS" --target albedo_fuzz
  (cd build-fuzz/fuzz && ctest -L fuzz --output-on-failure)
fi

if [[ " $STEPS " == *" tsan "* ]]; then
  tsan=${TSAN_BUILD_DIR:-build-tsan}
  [[ $tsan == /* ]] || tsan=$root/$tsan
  echo "== ThreadSanitizer: engine and server ($tsan/)"
  # second_deadlock_stack: both stacks of a lock-order report.
  export TSAN_OPTIONS=${TSAN_OPTIONS:-second_deadlock_stack=1}
  cmake -S . -B "$tsan" -DCMAKE_C_COMPILER=clang -DALBEDO_TSAN=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$tsan" -j"$JOBS" --target test_engine albedo_cli albedo
  # test_engine reads md2-small from ../shared, or from $tsan/md2-small-gen
  # (test_model writes it in the full suite; here the CLI regenerates it).
  if [ ! -f ../shared/fixtures/README.md ] && [ -z "${ALBEDO_SHARED:-}" ] &&
     [ ! -f "$tsan/md2-small-gen/model.safetensors" ]; then
    gunzip -c tests/data/tokenizer/gpt2.tokenizer.json.gz >"$tsan/gpt2.tokenizer.json"
    "$tsan/albedo" synth --preset md2-small --out "$tsan/md2-small-gen" --seed 20261127 \
      --tokenizer "$tsan/gpt2.tokenizer.json" >/dev/null
  fi
  (cd "$tsan" && tests/test_engine)
  # The server suites that need no Python package (a TSan libalbedo.so cannot
  # be loaded into an uninstrumented Python).
  ALBEDO_BUILD_DIR="$tsan" tests/server/run.sh test_rest.py test_errors.py test_limits.py test_batching.py
fi
echo "sanitize.sh: all passed"
