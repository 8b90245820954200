#!/usr/bin/env bash
# Install what albedo needs to build and test on Debian/Ubuntu (run as root
# or with sudo available). Packages already present are not fetched again.
set -euo pipefail
pkgs=(build-essential cmake pkg-config zlib1g-dev
      libjansson-dev libpcre2-dev libutf8proc-dev libjpeg-dev libpng-dev libwebp-dev libgif-dev
      libmicrohttpd-dev libcurl4-openssl-dev)
if [ "${1:-}" = "--test" ]; then
  # cross-compiling the ARM64 kernels and running them under emulation,
  # clang's sanitizers and libFuzzer
  pkgs+=(gcc-aarch64-linux-gnu qemu-user clang libclang-rt-14-dev clang-format)
fi
command -v python3 >/dev/null || pkgs+=(python3 python3-venv)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
