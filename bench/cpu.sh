#!/usr/bin/env bash
# CPU stage benchmark beside llama.cpp's figures (spec/performance.md §3):
# one 378×378 crop through the vision encoder, 730 positions of prefill,
# decode at depth 740, on the full Moondream 2 shapes with random weights
# (written once by `albedo synth`). Each configuration runs REPEATS times
# inside `albedo bench` (median) and the table prints the median of ROUNDS
# such runs.
#   bench/cpu.sh [BUILD_DIR] [THREADS]     env: ROUNDS=3 REPEATS=3 WEIGHTS="bf16"
set -euo pipefail
build=${1:-build}
threads=${2:-2}
rounds=${ROUNDS:-3}
repeats=${REPEATS:-3}
weights=${WEIGHTS:-bf16}
albedo="$build/albedo"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; threads $threads"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); model: synthetic Moondream 2 (full shapes, random bf16 weights)"
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
printf '\n| weights | precision | vision crop ms | prefill 730 tok/s | decode d740 tok/s |\n|---|---|---:|---:|---:|\n'
for w in $weights; do
  for p in f32 bf16; do
    v=(); f=(); d=()
    for r in $(seq "$rounds"); do
      extra=()
      [ "$w" != bf16 ] && extra=(--weights "$w")
      out=$("$albedo" bench --synthetic md2 --threads "$threads" --repeats "$repeats" --precision "$p" "${extra[@]}" --json)
      v+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["vision_crop_ms"])')")
      f+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["prefill730_tok_s"])')")
      d+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_d740_tok_s"])')")
    done
    printf '| %s | %s | %s | %s | %s |\n' "$w" "$p" "$(printf '%s\n' "${v[@]}" | median)" \
      "$(printf '%s\n' "${f[@]}" | median)" "$(printf '%s\n' "${d[@]}" | median)"
  done
done
printf '| llama.cpp F16 (spec §3) | F16 | 7200 | 132.5 | 15.0 |\n'
printf '| llama.cpp Q8_0 | | | 104.4 | 17.7 |\n| llama.cpp Q4_0 | | | 181.2 | 27.2 |\n'
