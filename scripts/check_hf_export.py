#!/usr/bin/env python3
"""Checks that a model basin exported loads in Hugging Face transformers and computes what
basin computes.

    python3 scripts/check_hf_export.py EXPORTED_DIR lm/tests/fixtures/smollm2_logits.json

EXPORTED_DIR: `evaluate export --model SmolLM2...gguf --out DIR`. Loads it with
AutoModelForCausalLM / AutoTokenizer, compares the last-position logits on the fixture's
token ids with the fixture's float64 reference, renders a chat prompt with the exported
template and answers it greedily. Needs torch and transformers (CPU is enough).
"""
import json, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

def main(model_dir, fixture):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    worst = 0.0
    for case in json.load(open(fixture))["cases"]:
        with torch.no_grad():
            logits = model(torch.tensor([case["ids"]])).logits[0, -1].double()
        for key in ("top", "fixed"):
            for i, want in zip(case[f"{key}_ids"], case[f"{key}_logits"]):
                worst = max(worst, abs(logits[i].item() - want))
        assert int(logits.argmax()) == case["top_ids"][0]
    print(f"transformers logits vs float64 reference: max |diff| = {worst:.2e}")
    assert worst < 2e-4, worst
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"transformers greedy reply: {reply!r}")
    assert "Paris" in reply
    print("OK: transformers loads the export and agrees")

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
