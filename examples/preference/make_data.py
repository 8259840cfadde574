#!/usr/bin/env python3
"""Regenerates the preference example's bundled data (pairs.jsonl, eval-pairs.jsonl): synthetic preference pairs
on the quick start's tasks, the correct answer `chosen` and a plausible wrong one `rejected`, deterministic from
the seed below, so the example needs no download."""
import json
import random

rng = random.Random(20261203)
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
            ("India", "New Delhi"), ("China", "Beijing"), ("Brazil", "Brasilia"), ("Poland", "Warsaw")]
WORDS = ["garden", "river", "planet", "window", "silver", "market", "forest", "candle", "bridge",
         "winter", "rocket", "pencil", "island", "castle", "orange", "dragon", "mirror", "travel"]


def arithmetic():
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    wrong = a + b + rng.choice([-2, -1, 1, 2, 10])
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."


def capital():
    (c, k), (_, other) = rng.sample(CAPITALS, 2)
    return f"What is the capital of {c}?", f"The capital of {c} is {k}.", f"The capital of {c} is {other}."


def count():
    w = rng.choice(WORDS)
    wrong = len(w) + rng.choice([-1, 1, 2])
    return (f"How many letters are in the word '{w}'?", f"The word '{w}' has {len(w)} letters.",
            f"The word '{w}' has {wrong} letters.")


TASKS = [arithmetic, capital, count]

for name, n in [("pairs.jsonl", 96), ("eval-pairs.jsonl", 16)]:
    with open(name, "w") as f:
        for _ in range(n):
            prompt, chosen, rejected = rng.choice(TASKS)()
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
