#!/usr/bin/env python3
"""Regenerates the quick start's bundled data (train.jsonl, eval.jsonl): small synthetic instruction
conversations, deterministic from the seed below, so the quick start needs no download."""
import json
import random

rng = random.Random(20261128)
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
            ("India", "New Delhi"), ("China", "Beijing"), ("Brazil", "Brasilia"), ("Poland", "Warsaw")]
WORDS = ["garden", "river", "planet", "window", "silver", "market", "forest", "candle", "bridge",
         "winter", "rocket", "pencil", "island", "castle", "orange", "dragon", "mirror", "travel"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SYSTEM = "You are a concise, helpful assistant."


def arithmetic():
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", f"{a} - {b} = {a - b}."


def capital():
    c, k = rng.choice(CAPITALS)
    return f"What is the capital of {c}?", f"The capital of {c} is {k}."


def reverse():
    w = rng.choice(WORDS)
    return f"Reverse the word '{w}'.", f"The word '{w}' reversed is '{w[::-1]}'."


def count():
    w = rng.choice(WORDS)
    return f"How many letters are in the word '{w}'?", f"The word '{w}' has {len(w)} letters."


def sort_colours():
    cs = rng.sample(COLOURS, 3)
    return f"Sort these colours alphabetically: {', '.join(cs)}.", f"In alphabetical order: {', '.join(sorted(cs))}."


TASKS = [arithmetic, capital, reverse, count, sort_colours]


def record():
    turns = 1 if rng.random() < 0.8 else 2
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(turns):
        q, a = rng.choice(TASKS)()
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


for name, n in [("train.jsonl", 480), ("eval.jsonl", 48)]:
    with open(name, "w") as f:
        for _ in range(n):
            f.write(json.dumps(record()) + "\n")
