#!/usr/bin/env bash
# check-format.sh — every tracked C, CUDA and header file formatted as
# .clang-format says (clang-format 14, as Debian 12 ships it; other versions
# break some lines differently). Prints the files that differ and exits 1.
#   scripts/check-format.sh          check
#   scripts/check-format.sh --fix    rewrite them in place
set -uo pipefail
cd "$(dirname "$0")/.."
cf=$(command -v clang-format-14 || command -v clang-format) || { echo "check-format: clang-format is missing"; exit 1; }
files=$(git ls-files '*.c' '*.h' '*.cu' '*.cuh' ':!:third_party/*')
if [ "${1:-}" = "--fix" ]; then
  echo "$files" | xargs "$cf" -i --style=file
  exit 0
fi
bad=0
for f in $files; do
  if ! "$cf" --style=file "$f" | cmp -s - "$f"; then
    echo "not formatted: $f"
    bad=$((bad + 1))
  fi
done
echo "check-format: $(echo "$files" | wc -l) files, $bad not formatted"
[ "$bad" -eq 0 ]
