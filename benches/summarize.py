#!/usr/bin/env python3
"""Summarises `benches/compare.sh` output: the ytrainer / PyTorch ratio per round and its median, per shape.

    python3 benches/summarize.py /tmp/compare.jsonl

A round is one pass of compare.sh's loop; within it each ytrainer line follows the PyTorch line it is compared
with, so the ratio is taken between runs a minute apart (the VM's speed drifts between rounds).
"""

import json
import statistics
import sys


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
    ratios, rss, nlirg, windowed, same_kernels = {}, {}, [], [], []
    last_torch, last_ce, last_torch_window = {}, None, None
    for r in rows:
        if "windowed" in r:
            if r["impl"] == "pytorch":
                last_torch_window = r["seed_way_s"]
            else:
                same_kernels.append(r["speedup"])
                if last_torch_window:
                    windowed.append(last_torch_window / r["ytrainer_s"])
            continue
        key = (r["shape"], r["mode"])
        if r["impl"] == "pytorch":
            last_torch[key] = r
        elif r.get("loss") == "nlirg":
            if last_ce:
                nlirg.append(r["tokens_per_s"] / last_ce - 1.0)
        else:
            t = last_torch.get(key)
            if t:
                ratios.setdefault(key, []).append(r["tokens_per_s"] / t["tokens_per_s"])
                rss.setdefault(key, []).append(r["peak_rss_mb"] / t["peak_rss_mb"])
            if key == ("tiny", "lora"):
                last_ce = r["tokens_per_s"]
    for key, v in ratios.items():
        print(
            f"{key[0]}/{key[1]}: tokens/s ratio per round {', '.join(f'{x:.2f}' for x in v)}; "
            f"median {statistics.median(v):.2f}x; peak RSS ratio median {statistics.median(rss[key]):.2f}x"
        )
    if nlirg:
        print(f"nlirg vs ce (tiny/lora, per round): {', '.join(f'{x:+.1%}' for x in nlirg)}")
    if windowed:
        print(
            f"windowed N=10 vs the seed's loop in PyTorch, per round: {', '.join(f'{x:.1f}' for x in windowed)}; "
            f"median {statistics.median(windowed):.1f}x"
        )
    if same_kernels:
        print(
            f"windowed N=10 vs the seed's way through ytrainer's kernels, per round: "
            f"{', '.join(f'{x:.1f}' for x in same_kernels)}; median {statistics.median(same_kernels):.1f}x"
        )


if __name__ == "__main__":
    main()
