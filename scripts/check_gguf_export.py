"""Checks a GGUF file written by `ytrainer export` with llama.cpp's own Python package (`pip install gguf`).

    python3 scripts/check_gguf_export.py EXPORTED.gguf [--source SOURCE.gguf] [--lora]

- The file parses with `gguf.GGUFReader` (header, metadata, tensor directory, alignment).
- A model file carries the keys llama.cpp needs to load it: architecture, hyper-parameters, tokenizer, and every
  tensor llama.cpp's loader asks for (names and shapes from `gguf.MODEL_TENSORS` of that architecture).
- With --source (the GGUF the export started from, no adapter): every tensor dequantised by `gguf.quants` equals
  the source's within the exported type's rounding, and the tokenizer metadata is identical.
- With --lora: the llama.cpp LoRA adapter keys and `lora_a` / `lora_b` pairs.
Exits non-zero with a message on the first failure; prints a one-line summary otherwise.
"""

import argparse
import sys

import numpy as np
import gguf
from gguf import GGUFReader
from gguf.quants import dequantize


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types and f.types[0] == gguf.GGUFValueType.STRING and len(f.types) == 1:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i] for i in f.data]
    return f.parts[f.data[0]][0]


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def values(t):
    return dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--source")
    ap.add_argument("--lora", action="store_true")
    a = ap.parse_args()
    r = GGUFReader(a.path)
    arch = field(r, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        fail(f"general.architecture = {arch!r}")
    names = {t.name: t for t in r.tensors}
    if a.lora:
        if field(r, "general.type") != "adapter" or field(r, "adapter.type") != "lora":
            fail("general.type / adapter.type are not adapter / lora")
        if field(r, "adapter.lora.alpha") is None:
            fail("adapter.lora.alpha is missing")
        a_names = [n for n in names if n.endswith(".lora_a")]
        for n in a_names:
            b = n[: -len("lora_a")] + "lora_b"
            if b not in names:
                fail(f"{n} has no {b}")
            ra, rb = names[n].shape, names[b].shape  # gguf lists dims fastest first
            if ra[1] != rb[0]:
                fail(f"{n} {list(ra)} and {b} {list(rb)}: ranks differ")
        if not a_names:
            fail("no lora_a tensors")
        print(f"ok: LoRA adapter, {len(a_names)} pairs, alpha {field(r, 'adapter.lora.alpha')}")
        return
    for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.layer_norm_rms_epsilon", "context_length"):
        if field(r, f"{arch}.{k}") is None:
            fail(f"{arch}.{k} is missing")
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if field(r, k) is None:
            fail(f"{k} is missing")
    n_layer = int(field(r, f"{arch}.block_count"))
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    wanted = {"token_embd.weight", "output_norm.weight"}
    for i in range(n_layer):
        for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"):
            wanted.add(f"blk.{i}.{p}.weight")
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_id]}
    for n in names:
        base = n.rsplit(".", 1)[0]
        generic = base.replace(base.split(".")[1], "{bid}", 1) if base.startswith("blk.") else base
        if generic not in known:
            fail(f"tensor {n} is not a {arch} tensor llama.cpp knows")
    missing = wanted - set(names)
    if missing:
        fail(f"missing tensors: {sorted(missing)[:5]}")
    worst = 0.0
    if a.source:
        s = GGUFReader(a.source)
        src = {t.name: t for t in s.tensors}
        if set(src) != set(names):
            fail(f"tensor names differ from the source: {sorted(set(src) ^ set(names))[:5]}")
        for k, f in s.fields.items():
            if k.startswith("tokenizer."):
                if field(s, k) is None or k not in r.fields:
                    fail(f"{k} missing")
                x, y = field(s, k), field(r, k)
                if isinstance(x, list):
                    if len(x) != len(y) or any(not np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(x, y)):
                        fail(f"{k} differs from the source")
                elif x != y:
                    fail(f"{k} differs from the source")
        ty = r.tensors[0].tensor_type
        for n, t in names.items():
            x, y = values(src[n]), values(t)
            scale = max(np.abs(x).max(), 1e-12)
            err = np.abs(x - y).max() / scale
            worst = max(worst, err)
        limits = {"F32": 0.0, "F16": 1e-3, "Q8_0": 1.2e-2, "Q4_0": 0.2}
        kind = gguf.GGMLQuantizationType(names["blk.0.ffn_down.weight"].tensor_type).name
        if worst > limits.get(kind, 0.2):
            fail(f"largest difference from the source {worst:.3g} of the tensor's range, over {kind}'s rounding")
    print(f"ok: {arch}, {len(names)} tensors, {n_layer} layers, "
          f"type {gguf.GGMLQuantizationType(names['blk.0.ffn_down.weight'].tensor_type).name}"
          + (f", worst difference from the source {worst:.3g} of a tensor's range" if a.source else ""))


if __name__ == "__main__":
    main()
