#!/usr/bin/env python3
"""Builds the forgetting benchmark's data (stdlib only, deterministic in --seed).

Domain (learn): FOLDOC term -> definition instruction pairs from ../shared/assets/corpora/domain_computing_foldoc.txt.
  train.jsonl       --train pairs, a --noise fraction of them with corrupted answers (label noise: another term's
                    definition, a truncated answer, or random general-English words)
  train_noisy.jsonl / train_clean.jsonl  the corrupted / clean pairs of train.jsonl apart (noise fit is measured on them)
  learn_eval.jsonl  --eval held-out clean pairs (terms not in train.jsonl): the domain loss
Retain (general English, held out): paragraphs of Shakespeare, fortunes and Wikipedia text.
  retain.txt        --retain-chars characters, blank-line separated paragraphs: the general loss

Usage (from the repository root):
  python3 examples/forgetting/make_data.py --noise 0.2
"""
import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def foldoc_entries(path):
    """(term, definition) pairs: a term at column 0, its definition as the indented lines that follow."""
    entries, term, body = [], None, []

    def flush():
        if term and body:
            text = " ".join(" ".join(body).split())
            text = re.sub(r"\{([^{}]*?)(?: \([^{}]*\))?\}", r"\1", text)  # {link (url)} -> link
            text = re.sub(r"<[^<>]*>\s*", "", text)  # <category> tags
            text = re.sub(r"\(\d{4}-\d{2}-\d{2}\)", "", text).strip()
            entries.append((term, text))

    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            if body:
                flush()
                term, body = None, []
            continue
        if line[0].isspace():
            if term:
                body.append(line.strip())
        elif not body:
            term = term or line.strip()
        else:
            flush()
            term, body = line.strip(), []
    flush()
    return entries


def words(text, n, max_words):
    w = text.split()
    return " ".join(w[:max_words]) + ("" if len(w) <= max_words else " ...")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=str(HERE / "../../../shared/assets/corpora"))
    ap.add_argument("--out", default=str(HERE / "data"))
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.2, help="fraction of training answers corrupted")
    ap.add_argument("--max-words", type=int, default=60, help="definitions are cut to this many words")
    ap.add_argument("--retain-chars", type=int, default=24000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    corpora = Path(a.assets)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    entries = [
        (t, d)
        for t, d in foldoc_entries(corpora / "domain_computing_foldoc.txt")
        if not t.startswith("00-") and 12 <= len(d.split()) and len(t) < 40
    ]
    rng.shuffle(entries)
    need = a.train + a.eval
    if len(entries) < need:
        raise SystemExit(f"only {len(entries)} usable FOLDOC entries, need {need}")
    train, held = entries[: a.train], entries[a.train : need]

    general = []
    for name in ["general_en_shakespeare_gutenberg.txt", "general_en_fortunes.txt", "general_en_wiki_demo.txt"]:
        paras = [
            " ".join(p.split())
            for p in re.split(r"\n\s*\n", (corpora / name).read_text(encoding="utf-8", errors="replace"))
        ]
        general.append([p[:1200].rsplit(" ", 1)[0] for p in paras if len(p) >= 200])
    # Noise vocabulary: words of the general-English text.
    vocab = " ".join(p for g in general for p in g[:100]).split()

    def pair(term, answer):
        return {
            "messages": [
                {"role": "user", "content": f"In computing, what does \"{term}\" mean?"},
                {"role": "assistant", "content": answer},
            ]
        }

    n_noisy = round(a.noise * len(train))
    noisy = set(rng.sample(range(len(train)), n_noisy))
    kinds = {"shuffled": 0, "truncated": 0, "random": 0}
    # The corrupted and the clean training pairs are also written apart (same records, same order) so that a
    # trained model's loss on each can be measured: "noise fit" is the mean loss on train_noisy.jsonl.
    noisy_out, clean_out = [], []
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for i, (term, d) in enumerate(train):
            answer = words(d, 0, a.max_words)
            if i in noisy:
                kind = rng.choice(sorted(kinds))
                kinds[kind] += 1
                if kind == "shuffled":
                    answer = words(train[(i + 1 + rng.randrange(len(train) - 1)) % len(train)][1], 0, a.max_words)
                elif kind == "truncated":
                    answer = " ".join(answer.split()[: rng.randint(1, 3)])
                else:
                    answer = " ".join(rng.choice(vocab) for _ in range(rng.randint(12, 40)))
            line = json.dumps(pair(term, answer), ensure_ascii=False) + "\n"
            f.write(line)
            (noisy_out if i in noisy else clean_out).append(line)
    (out / "train_noisy.jsonl").write_text("".join(noisy_out), encoding="utf-8")
    (out / "train_clean.jsonl").write_text("".join(clean_out), encoding="utf-8")
    with open(out / "learn_eval.jsonl", "w", encoding="utf-8") as f:
        for term, d in held:
            f.write(json.dumps(pair(term, words(d, 0, a.max_words)), ensure_ascii=False) + "\n")

    # Retain: round-robin over the three sources, from the far end of each (away from anything else used).
    retain, total, k = [], 0, 0
    pools = [list(reversed(g)) for g in general]
    while total < a.retain_chars and any(pools):
        pool = pools[k % len(pools)]
        k += 1
        if pool:
            p = pool.pop(rng.randrange(min(len(pool), 50)))
            retain.append(p)
            total += len(p)
    (out / "retain.txt").write_text("\n\n".join(retain) + "\n", encoding="utf-8")
    print(
        f"wrote {out}: train.jsonl {len(train)} pairs ({n_noisy} corrupted: {kinds}), "
        f"learn_eval.jsonl {len(held)} clean held-out pairs, retain.txt {len(retain)} paragraphs ({total} chars)"
    )


if __name__ == "__main__":
    main()
