#!/usr/bin/env bash
# Stages what scripts/device-pass.sh needs on a GPU machine into DIR (default .device/,
# ignored by git; a device run carries it): the CUDA step bench and the three device-test
# binaries from `scripts/build-cuda.sh`, xz-compressed (the PTX inside is text: ~48 MB
# become ~7), and PyTorch's shape baseline and the library-path wrapper from
# ${SHARED_TOOLS:-../shared/tools}.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.device}"
target="${CARGO_TARGET_DIR:-target}/release"
tools="${SHARED_TOOLS:-../shared/tools}"
mkdir -p "$dir"
newest() { ls -t "$target"/deps/"$1"-* 2>/dev/null | grep -v '\.d$' | head -1; }
for name in step pass_ops fused pass_device; do
  bin=$(newest "$name")
  [ -n "$bin" ] || { echo "no $name binary under $target/deps: run scripts/build-cuda.sh" >&2; exit 1; }
  xz -9 -T0 -c "$bin" > "$dir/$name.xz"
done
install -m 0644 "$tools/torch_shape_baseline.py" "$dir/"
install -m 0755 "$tools/gpu-libpath.sh" "$dir/"
ls -la "$dir"
du -sh "$dir"
