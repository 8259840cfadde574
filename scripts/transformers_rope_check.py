#!/usr/bin/env python3
"""Reads exported config.json files with the installed transformers and prints the RoPE base it sees.

Usage: python3 scripts/transformers_rope_check.py DIR [DIR ...] [--expect THETA]

Run it under transformers 4.x and 5.x (only `pip install transformers` is needed: configs load without torch).
transformers 4.x reads only the top-level `rope_theta` and silently falls back to its class default (10000)
without it; ytrainer writes both spellings so every version sees the model's own base. Exits 1 when a value
differs from --expect.
"""
import sys

import transformers
from transformers import AutoConfig


def main(argv):
    expect = None
    if "--expect" in argv:
        i = argv.index("--expect")
        expect = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    bad = 0
    for d in argv:
        c = AutoConfig.from_pretrained(d)
        theta = getattr(c, "rope_theta", None)
        params = getattr(c, "rope_parameters", None)
        if theta is None and isinstance(params, dict):
            theta = params.get("rope_theta")
        ok = expect is None or theta == expect
        bad += not ok
        print(f"transformers {transformers.__version__}: {d}: rope_theta = {theta}{'' if ok else f' (expected {expect})'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
