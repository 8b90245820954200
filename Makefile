# A thin wrapper over CMake for the sanitizer and fuzzing builds
# (docs/FUZZING.md). Each target configures its own build directory:
#
#   make sanitize                 build-asan/: ASan+UBSan (clang), ctest
#   make tsan                     build-tsan/: ThreadSanitizer (clang), ctest
#   make fuzz-replay              build-fuzz/: fuzz targets, replay fuzz/corpus (CI)
#   make fuzz FUZZ_SECONDS=600    build-fuzz/: fuzz every target in turn
#
# Variables: JOBS (parallel build jobs), FUZZ_SECONDS (per target),
# FUZZ_WORK (new corpus entries, crashes, logs; never the committed corpus),
# FUZZ_TARGETS (a subset, e.g. "fuzz_image fuzz_config"), FUZZ_FLAGS (extra
# libFuzzer flags, e.g. -fork=1 -ignore_crashes=1).

CLANG ?= clang
JOBS ?= 2
FUZZ_SECONDS ?= 600
FUZZ_WORK ?= build-fuzz/work
FUZZ_FLAGS ?=
CMAKE ?= cmake
CTEST ?= ctest

.PHONY: all sanitize tsan fuzz-build fuzz-replay fuzz

all:
	$(CMAKE) -S . -B build
	$(CMAKE) --build build -j$(JOBS)

sanitize:
	$(CMAKE) -S . -B build-asan -DCMAKE_C_COMPILER=$(CLANG) -DALBEDO_SANITIZE=ON -DCMAKE_C_FLAGS=-g
	$(CMAKE) --build build-asan -j$(JOBS)
	cd build-asan && $(CTEST) --output-on-failure

tsan:
	$(CMAKE) -S . -B build-tsan -DCMAKE_C_COMPILER=$(CLANG) -DALBEDO_TSAN=ON
	$(CMAKE) --build build-tsan -j$(JOBS)
	cd build-tsan && $(CTEST) --output-on-failure

fuzz-build:
	$(CMAKE) -S . -B build-fuzz -DCMAKE_C_COMPILER=$(CLANG) -DALBEDO_FUZZ=ON -DALBEDO_TESTS=OFF
	$(CMAKE) --build build-fuzz -j$(JOBS) --target albedo_fuzz

fuzz-replay: fuzz-build
	cd build-fuzz/fuzz && $(CTEST) -L fuzz --output-on-failure

fuzz: fuzz-build
	fuzz/run.sh fuzz build-fuzz/fuzz $(FUZZ_SECONDS) $(FUZZ_WORK) $(FUZZ_FLAGS)
