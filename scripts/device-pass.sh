#!/usr/bin/env bash
# Issue 21's GPU check, as one prepared script for a GPU machine (docs/performance.md has
# what it measured). Run on the machine from the checkout's root with $BIN holding what
# `scripts/stage-device.sh` staged here (the CUDA binaries of the step bench and of the
# five device tests, PyTorch's shape baseline, the library-path wrapper; .xz-compressed or
# not). Writes into $OUT:
#   1. every kernel and product of the written-out pass on the device, f32 and bf16, against
#      its CPU reference (`pass_ops`), the fused softmax and cross-entropy of the autograd
#      path against the CPU (`fused`: their launchers were reworked with the pass), then the
#      whole pass on the device against the CPU pass — tiny model, every family, the
#      SmolLM2 shape — and repeated bit for bit; in bf16 against the f32 CPU pass beside
#      candle's bf16 autograd (`pass_device`); decoding through the pass's layers against
#      the CPU decoder in f32 and beside candle's graph in bf16 (`decode_device`, issue 23);
#      20 steps of bf16 training against f32 (`bf16_device`);
#   2. the step bench on the SmolLM2-135M shape, 16 x 512: f32 and bf16 through the
#      written-out pass and through candle's autograd, beside PyTorch + transformers (f32 and
#      pure bf16, AdamW fused) in the same run: tokens/s and the ratios, forward/backward/
#      optimizer;
#   3. the same on the Llama-3.2-1B shape (configs/models/, random weights), 4 x 512;
#   4. greedy generation on the SmolLM2 shape, batch 1 and 64, 64 + 64 tokens: candle's
#      graph and the pass's layers (f32, bf16) beside PyTorch's `generate` (issue 23);
#   5. a per-kernel profile (ncu) of the written-out f32 pass on 4 layers, one step.
# Each part has a time limit, so that one stuck part leaves the others' figures. All of it
# may not fit one device call (600 s): `device-pass.sh tests` runs 1, `device-pass.sh bench`
# 2-5, no argument both.
set -uo pipefail
what="${1:-all}"
case "$what" in tests|bench|all) ;; *) echo "usage: device-pass.sh [tests|bench|all]" >&2; exit 2 ;; esac
BIN="${BIN:?set BIN to the folder scripts/stage-device.sh filled}"
OUT="${OUT:-out}"
mkdir -p "$OUT"
for f in "$BIN"/*.xz; do
  [ -e "$f" ] || continue
  python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' "$f" "${f%.xz}"
  chmod +x "${f%.xz}"
done
# The library-path wrapper puts the machine's CUDA libraries (torch's wheels) in reach
# when it was staged; without it the binaries run as they are.
run() {
  if [ -f "$BIN/gpu-libpath.sh" ]; then timeout "$1" bash "$BIN/gpu-libpath.sh" "${@:2}"
  else timeout "$1" "${@:2}"; fi
}
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/gpu.txt"

if [ "$what" != bench ]; then
run 120 "$BIN/pass_ops" --nocapture --test-threads 1 2>&1 | tee "$OUT/pass_ops.txt"
run 120 "$BIN/fused" --nocapture 2>&1 | tee "$OUT/fused.txt"
run 240 "$BIN/pass_device" --nocapture --test-threads 1 2>&1 | tee "$OUT/pass_device.txt"
run 180 "$BIN/decode_device" --nocapture 2>&1 | tee "$OUT/decode_device.txt"
run 180 "$BIN/bf16_device" --nocapture 2>&1 | tee "$OUT/bf16_device.txt"
fi
[ "$what" = tests ] && exit 0

python3 - <<'PY'
import json
# The step bench's built-in shape (SmolLM2-135M-Instruct's config.json sizes), for PyTorch.
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
           "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_act": "silu",
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
           "tie_word_embeddings": True}, open("/tmp/smollm2.json", "w"))
PY
torch_on() {  # name config train-spec [generate-batches] (PyTorch's side, when staged)
  [ -f "$BIN/torch_shape_baseline.py" ] || { echo "no torch_shape_baseline.py: no PyTorch column"; return; }
  timeout 300 python3 "$BIN/torch_shape_baseline.py" --config "$2" --train "$3" --generate "${4:-}" \
    --steps 5 --warm 2 --peak-tflops 989 --out "$OUT/torch-$1.json" 2>&1 | tee "$OUT/torch-$1.txt"
}
step_on() {  # name dtype args...
  run 300 "$BIN/step" --dtype "$2" --train-only --iters 5 --warm 2 --json "$OUT/step-$1-$2.json" \
    --torch "$OUT/torch-$1.json" "${@:3}" 2>&1 | tee "$OUT/step-$1-$2.txt"
}
torch_on smollm2 /tmp/smollm2.json f32:16x512,bf16:16x512
for dt in f32 f32-autograd bf16 bf16-autograd; do step_on smollm2 "$dt" --batch 16 --seq 512; done

torch_on smollm2-gen /tmp/smollm2.json "" 1,64
run 300 "$BIN/step" --gen-only --gen-batch 64 --json "$OUT/step-smollm2-gen.json" \
  --torch "$OUT/torch-smollm2-gen.json" 2>&1 | tee "$OUT/step-smollm2-gen.txt"

llama=configs/models/llama-3.2-1b-instruct.json
torch_on llama1b "$llama" f32:4x512,bf16:4x512
for dt in f32 f32-autograd bf16 bf16-autograd; do step_on llama1b "$dt" --model-config "$llama" --batch 4 --seq 512; done

if command -v ncu >/dev/null; then
  run 300 ncu --metrics gpu__time_duration.sum --print-summary per-kernel "$BIN/step" --dtype f32 \
    --train-only --layers 4 --warm 1 --iters 1 --batch 16 --seq 512 > "$OUT/ncu-f32.txt" 2>&1
  tail -60 "$OUT/ncu-f32.txt"
fi
