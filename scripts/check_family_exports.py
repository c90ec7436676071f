#!/usr/bin/env python3
"""Checks that transformers loads basin's exports of the family fixtures as the same class
and computes the same logits as it did for the files it saved itself.

    python3 scripts/check_family_exports.py EXPORTS_DIR

EXPORTS_DIR holds one export per fixture, named as the fixture. The test
`transformers_loads_every_export_as_its_own_class` (lm/tests/families.rs) writes them and
runs this with $BASIN_HF_PYTHON, which `just test` sets.

Needs torch and transformers (CPU is enough); the fixtures come from
scripts/make_family_fixtures.py.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "lm", "tests", "fixtures", "families")


def main(exports):
    for name in sorted(os.listdir(exports)):
        original = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, name))
        model = AutoModelForCausalLM.from_pretrained(os.path.join(exports, name),
                                                     dtype=torch.float32).eval()
        assert type(model) is type(original), (name, type(model), type(original))
        expected = json.load(open(os.path.join(FIXTURES, name, "expected.json")))
        worst = 0.0
        with torch.no_grad():
            for case in expected["cases"]:
                logits = model(torch.tensor([case["ids"]])).logits[0]
                worst = max(worst, (logits[-1] - torch.tensor(case["last_logits"])).abs().max().item())
        print(f"{name}: {type(model).__name__}, max |logit - fixture| = {worst:.1e}")
        assert worst < 1e-5, worst
    print("OK: transformers loads every export as its own class with the same logits")


if __name__ == "__main__":
    main(sys.argv[1])
