#!/usr/bin/env bash
# Stages what scripts/device-pass.sh needs on a GPU machine into DIR (default .device/,
# ignored by git; a device run carries it): the CUDA step bench and the five device-test
# binaries from `scripts/build-cuda.sh`, xz-compressed (the PTX inside is text: ~48 MB
# become ~7), and, where ${SHARED_TOOLS:-../shared/tools} has them, PyTorch's shape
# baseline and the library-path wrapper.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.device}"
target="${CARGO_TARGET_DIR:-target}/release"
tools="${SHARED_TOOLS:-../shared/tools}"
mkdir -p "$dir"
newest() { ls -t "$target"/deps/"$1"-* 2>/dev/null | grep -v '\.d$' | head -1; }
for name in step pass_ops fused pass_device decode_device bf16_device; do
  bin=$(newest "$name")
  [ -n "$bin" ] || { echo "no $name binary under $target/deps: run scripts/build-cuda.sh" >&2; exit 1; }
  xz -9 -T0 -c "$bin" > "$dir/$name.xz"
done
# The tools are optional: without them device-pass.sh runs the binaries as they are (their
# CUDA libraries on the library path already) and prints no PyTorch column.
for tool in torch_shape_baseline.py gpu-libpath.sh; do
  if [ -f "$tools/$tool" ]; then
    install -m 0755 "$tools/$tool" "$dir/"
  else
    echo "note: no $tools/$tool (SHARED_TOOLS): staged without it" >&2
  fi
done
ls -la "$dir"
du -sh "$dir"
