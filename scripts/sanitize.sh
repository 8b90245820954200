#!/usr/bin/env bash
# sanitize.sh — the sanitizer pass CI runs (docs/FUZZING.md):
#   1. build-asan/: the library, CLI and tests with ASan+UBSan (clang), and
#      the whole ctest suite;
#   2. build-fuzz/: the fuzz targets (libFuzzer, ASan+UBSan), each replayed
#      over its committed corpus fuzz/corpus/<target>/ and saved crashes
#      fuzz/regressions/<target>/.
# Exits nonzero on the first failure. Works from a clean clone: installs
# clang, its sanitizer/libFuzzer runtimes and the build dependencies with
# apt-get when they are missing (as root, Debian 12).
#
#   scripts/sanitize.sh            # both steps
#   SANITIZE_STEPS=fuzz scripts/sanitize.sh   # only the replay ("asan" for only ctest)
set -euo pipefail
cd "$(dirname "$0")/.."
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
  echo "== ASan+UBSan build and ctest (build-asan/)"
  cmake -S . -B build-asan -DCMAKE_C_COMPILER=clang -DALBEDO_SANITIZE=ON -DCMAKE_C_FLAGS=-g
  cmake --build build-asan -j"$JOBS"
  (cd build-asan && ctest --output-on-failure)
fi

if [[ " $STEPS " == *" fuzz "* ]]; then
  echo "== fuzz targets: replay of the committed corpus (build-fuzz/)"
  cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DALBEDO_FUZZ=ON -DALBEDO_TESTS=OFF
  cmake --build build-fuzz -j"$JOBS" --target albedo_fuzz
  (cd build-fuzz/fuzz && ctest -L fuzz --output-on-failure)
fi
echo "sanitize.sh: all passed"
