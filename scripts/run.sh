#!/usr/bin/env bash
# One command from nothing to a Moondream answer: install the build
# dependencies, build albedo, download Moondream 2 on first use (Hugging Face
# cache layout, reused by later runs) and caption an image.
#   scripts/run.sh [IMAGE] [albedo options...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DALBEDO_TESTS=OFF >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
image="${1:-tests/data/images/chelsea.jpg}"
shift || true
exec build/albedo caption "$image" --model "${ALBEDO_MODEL:-moondream2}" "$@"
