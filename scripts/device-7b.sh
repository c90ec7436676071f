#!/usr/bin/env bash
# Issue 22's GPU check, as one prepared script for a GPU machine (docs/performance.md has
# what it measured). Needs the CUDA binaries of `just build-cuda` in $BIN (train, step,
# and the kernels' `multi` test binary as multi: `just build-cuda` does not build it; with the
# same environment, `cargo test --release -p basin-kernels --features cuda --test multi
# --no-run` prints its path), and writes into $OUT:
#   1. the optimizer kernels on the device against the CPU, the pure-bf16 state included
#      (`multi`: bit for bit);
#   2. the memory plan of a 7B-shape micro-batch (`train --plan`, against the free memory);
#   3. PyTorch's pure bf16 step on the same shape, when ../shared/tools/torch_shape_baseline.py
#      was copied beside this checkout's root;
#   4. the step bench on the 7B shape in pure bf16 (random weights): tokens/s, TFLOP/s,
#      MFU, and the memory in use after the steps (compare with 2.), beside 3.
# LAYERS keeps fewer layers where the card is smaller (an H100 holds about 16 of the 32).
set -uo pipefail
BIN="${BIN:?set BIN to the folder of the CUDA binaries}"
OUT="${OUT:-out}"
LAYERS="${LAYERS:-32}"
mkdir -p "$OUT"
shape=configs/models/llama-2-7b-chat.json
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/gpu.txt"

"$BIN/multi" --nocapture 2>&1 | tee "$OUT/multi.txt"

pure=(--set dtype=bf16 --set state.weights=pair --set state.moments=bf16 --set state.ema=pair
  --set state.theta0=host --set ema.enabled=true)
shape_file=$(python3 - "$shape" "$LAYERS" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["num_hidden_layers"] = int(sys.argv[2])
json.dump(c, open("/tmp/shape.json", "w")); print("/tmp/shape.json")
PY
)
"$BIN/train" --config configs/smoke.toml --set model="$shape_file" --set device=cuda \
  "${pure[@]}" --set batch_size=4 --set micro_batch=4 --set max_seq_len=512 --plan \
  2>&1 | tee "$OUT/plan.txt"

if [ -f torch_shape_baseline.py ]; then
  python3 torch_shape_baseline.py --config "$shape_file" --train bf16:4x512 --generate "" \
    --steps 3 --warm 1 --peak-tflops 989 --out "$OUT/torch.json" 2>&1 | tee "$OUT/torch.txt"
fi

"$BIN/step" --model-config "$shape_file" --dtype bf16-pure --batch 4 --seq 512 --train-only \
  --iters 3 --warm 1 --json "$OUT/step.json" --torch "$OUT/torch.json" 2>&1 | tee "$OUT/step.txt"

