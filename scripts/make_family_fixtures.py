#!/usr/bin/env python3
"""Regenerates lm/tests/fixtures/families/: one tiny random model per family, saved by
transformers itself, with the logits and greedy tokens transformers computes for it.

    python3 scripts/make_family_fixtures.py        # needs torch + transformers (CPU)

Each model uses the vocabulary of basin's tiny tokenizer (259 ids: 3 specials + 256
bytes), so a test can add `basin_lm::tiny`'s tokenizer files and open it as a whole model.
Weights are drawn wider than transformers' default (std 0.3, biases and norm weights
random too) so that every tensor changes the logits and greedy decoding has no near-ties.

Per family, `<name>/` holds what `save_pretrained` wrote (config.json,
model.safetensors, generation_config.json) and `expected.json`:
  cases: [{ids, last_logits (all 259), probe_ids, probe_logits [position][probe]}]
  greedy: {prompt, tokens (16, transformers' generate, do_sample=False)}
  margin: the smallest gap between the best and second-best logit along the greedy path.
"""
import json
import os
import sys

import torch
import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM)

OUT = os.path.join(os.path.dirname(__file__), "..", "lm", "tests", "fixtures", "families")
VOCAB = 259
COMMON = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, bos_token_id=None, eos_token_id=None, pad_token_id=None,
              initializer_range=0.3)

FAMILIES = {
    # Llama 3.x: grouped-query attention, tied embeddings, llama3 RoPE scaling whose band
    # limits fall between the wavelengths of head size 8 (two kept, one blended, one slowed).
    "llama3": (LlamaConfig, LlamaForCausalLM, dict(
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
        max_position_embeddings=256,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=1024))),
    # Llama with every bias (attention_bias, mlp_bias) and linear scaling, its config.json
    # rewritten in transformers 4.x's form (top-level rope_theta and rope_scaling).
    "llama-bias-4x": (LlamaConfig, LlamaForCausalLM, dict(
        num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        max_position_embeddings=128,
        rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))),
    # Qwen2: q/k/v biases, tied embeddings.
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    # Phi-3: fused qkv_proj and gate_up_proj, untied, a sliding window of 48.
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(
        num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=64,
        original_max_position_embeddings=64, sliding_window=48)),
    # Mistral: a head size that is not hidden / heads (8 · 4 = 32 ≠ 16), a window of 40.
    "mistral": (MistralConfig, MistralForCausalLM, dict(
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
        max_position_embeddings=128, sliding_window=40)),
}

CASES = [[1, 72, 101, 108, 108, 111], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52],
         [200, 3, 258, 17]]
PROBES = [0, 1, 2, 3, 50, 100, 150, 200, 258]
PROMPT = [1, 87, 104, 97, 116, 32, 105, 115]


def to_4x(path):
    """Rewrites config.json in transformers 4.x's form."""
    with open(path) as f:
        c = json.load(f)
    p = c.pop("rope_parameters")
    c["rope_theta"] = p.pop("rope_theta")
    c["rope_scaling"] = p if p.get("rope_type") != "default" else None
    with open(path, "w") as f:
        json.dump(c, f, indent=2)


def main():
    torch.manual_seed(0)
    for name, (config_cls, model_cls, extra) in FAMILIES.items():
        config = config_cls(**COMMON, **extra)
        model = model_cls(config).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.normal_(0.0, 0.3)
                elif "norm" in pname:
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d)
        if name.endswith("-4x"):
            to_4x(os.path.join(d, "config.json"))
        # What transformers computes for the files as saved.
        model = model_cls.from_pretrained(d, dtype=torch.float32).eval()
        cases = []
        with torch.no_grad():
            for ids in CASES:
                logits = model(torch.tensor([ids])).logits[0]
                cases.append(dict(ids=ids, last_logits=logits[-1].tolist(), probe_ids=PROBES,
                                  probe_logits=logits[:, PROBES].tolist()))
            out = model.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            tokens = out[0, len(PROMPT):].tolist()
            seq = PROMPT + tokens
            logits = model(torch.tensor([seq])).logits[0, len(PROMPT) - 1:-1]
            top2 = logits.topk(2, dim=-1).values
            margin = float((top2[:, 0] - top2[:, 1]).min())
        assert margin > 1e-3, f"{name}: greedy margin {margin} too small for a stable test"
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(dict(transformers=transformers.__version__, torch=torch.__version__,
                           cases=cases, greedy=dict(prompt=PROMPT, tokens=tokens),
                           margin=margin), f)
        size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
        print(f"{name}: {model_cls.__name__}, {size / 1024:.0f} KiB, greedy margin {margin:.3f}")


if __name__ == "__main__":
    sys.exit(main())
