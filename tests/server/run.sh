#!/usr/bin/env bash
# tests/server/run.sh — build what the server tests need, set up a private
# virtual environment under the build directory, and run the pytest suite of
# tests/server (REST API, official moondream client, albedo Python package,
# model download). Everything runs on 127.0.0.1; nothing reaches the internet
# except pip installing pytest, pillow and moondream (--no-deps) once.
#
#   tests/server/run.sh                 # all tests
#   tests/server/run.sh -k hub -x       # extra arguments go to pytest
#   ALBEDO_TEST_PIP=1 tests/server/run.sh   # also `pip install .` (scikit-build-core)
#                                           # and test that installed package
#
# Exits nonzero on any failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${ALBEDO_BUILD_DIR:-$ROOT/build}
cd "$ROOT"

if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    cmake -S "$ROOT" -B "$BUILD" -DALBEDO_TESTS=OFF
fi
cmake --build "$BUILD" --target albedo_cli albedo -j"$(nproc)"

VENV=$BUILD/test-venv
PY=$VENV/bin/python
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
if ! "$PY" -c "import pytest, PIL" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check pytest pillow
fi
if ! "$PY" -c "import moondream" 2>/dev/null; then
    # --no-deps: the cloud client needs only pillow; its kestrel dependency
    # is the local GPU engine, which these tests do not use.
    "$PY" -m pip install -q --disable-pip-version-check --no-deps moondream
fi

export ALBEDO_BIN=$BUILD/albedo
if [ "${ALBEDO_TEST_PIP:-0}" = 1 ]; then
    "$PY" -m pip install -q --disable-pip-version-check "$ROOT"
    export ALBEDO_TEST_INSTALLED=1
    unset ALBEDO_LIBRARY
else
    export ALBEDO_LIBRARY=$BUILD/libalbedo.so
    export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
fi
# Run from a neutral directory so that an installed package is not shadowed
# by the source tree.
cd "$ROOT/tests/server"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
