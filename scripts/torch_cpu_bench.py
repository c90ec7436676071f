"""PyTorch + transformers on the CPU, on the shapes of train/benches/step.rs with --cpu.

Writes a JSON of the keys the step bench reads with --torch:
  train_f32_b{B}_s{T}_tok_s        a training step (forward, loss on every token, backward,
                                   AdamW), tokens/s, mean of --iters steps after 2 untimed ones
  generate_f32_b{G}_new64_tok_s    greedy generation, G prompts of 64 tokens + 64 new tokens
The model is LlamaForCausalLM of SmolLM2-135M's shape with random weights (speed does not
depend on the weights). Only the benchmark uses torch: `just bench-cpu-torch` installs it in
a venv of its own.

usage: torch_cpu_bench.py OUT.json [--batch 4] [--seq 128] [--iters 3] [--gen-batch 8]
"""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--gen-batch", type=int, default=8)
    a = ap.parse_args()

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(cfg).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": a.batch,
        "seq": a.seq,
    }

    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    secs = (time.perf_counter() - t0) / a.iters
    out[f"train_f32_b{a.batch}_s{a.seq}_tok_s"] = a.batch * a.seq / secs
    print(json.dumps(out), flush=True)

    model.eval()
    for gb in [1, a.gen_batch]:
        prompt = torch.randint(0, cfg.vocab_size, (gb, 64))
        with torch.no_grad():

            def gen(n: int) -> None:
                model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )

            gen(4)
            t0 = time.perf_counter()
            gen(64)
            out[f"generate_f32_b{gb}_new64_tok_s"] = gb * 64 / (time.perf_counter() - t0)
        print(json.dumps(out), flush=True)

    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
