#!/usr/bin/env python3
"""Writes a synthetic Dolly-like JSONL set of N records and a sources.toml that adds it, for
measuring `prepare run` on a large set (docs/performance.md has the figures):

    python3 scripts/synthetic_set.py 1000000 data/cache/synthetic/big.jsonl /tmp/big/sources.toml
    /usr/bin/time -v target/release/prepare run --config configs/prepare.toml \
        --set sources='"/tmp/big/sources.toml"' --set out='"/tmp/big/out"' --only synthetic
"""
import hashlib
import json
import os
import random
import sys

WORDS = ("the a model data safety learning rate batch weights average steps answer question "
         "city river music history science garden kitchen travel").split()


def words(n):
    return " ".join(random.choice(WORDS) for _ in range(n))


def main(n, out, sources):
    random.seed(0)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        for i in range(n):
            record = {
                "instruction": words(random.randint(6, 20)).capitalize() + f" ({i})?",
                "context": "" if i % 3 else words(random.randint(10, 40)),
                "response": words(random.randint(10, 60)).capitalize() + ".",
                "category": "open_qa",
            }
            f.write(json.dumps(record) + "\n")
    sha = hashlib.sha256(open(out, "rb").read()).hexdigest()
    rel = os.path.relpath(out, "data/cache")
    here = os.path.dirname(os.path.abspath(__file__))
    base = open(os.path.join(here, "..", "data", "sources.toml")).read()
    os.makedirs(os.path.dirname(os.path.abspath(sources)), exist_ok=True)
    with open(sources, "w") as f:
        f.write(base)
        f.write(f'\n[[asset]]\nname = "synthetic"\nrole = "instruct"\nfile = "{rel}"\n'
                f'sha256 = "{sha}"\nbytes = {os.path.getsize(out)}\nrecords = {n}\n'
                f'licence = "generated"\norigin = "scripts/synthetic_set.py"\n'
                f'[asset.read]\nformat = "jsonl"\nuser = ["instruction", "context"]\n'
                f'assistant = "response"\nlabel = ["category"]\n')


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
