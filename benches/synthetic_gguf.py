"""Writes a synthetic Q4_0 GGUF of a real model's shape, for memory benchmarks of QLoRA (`docs/performance.md`).

    python3 benches/synthetic_gguf.py --shape qwen2.5-1.5b --out /tmp/q15.gguf
    python3 benches/synthetic_gguf.py --shape llama-7b --out /tmp/l7.gguf

Every matrix is Q4_0 with random 4-bit codes and a small random scale (so activations stay finite); norms are
ones. The tokenizer is SmolLM2-135M-Instruct's byte-level BPE from a GGUF given with --tokenizer-from (default:
the asset in ../shared), padded with `[PADi]` tokens to the shape's vocabulary size. Needs `pip install gguf`.
The file is a benchmark input only: never commit one.
"""

import argparse

import numpy as np
import gguf

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, tied, arch
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True, "qwen2"),
    "llama-7b": (4096, 11008, 32, 32, 32, 49152, False, "llama"),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True, "llama"),
}


def q4_0(rows, cols, rng):
    """Random Q4_0 blocks: f16 scale d then 16 bytes of 4-bit codes per 32 values."""
    nblocks = rows * cols // 32
    out = np.empty((nblocks, 18), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.5, nblocks) * 0.02 / np.sqrt(cols / 576)).astype(np.float16)
    out[:, :2] = d.view(np.uint8).reshape(nblocks, 2)
    out[:, 2:] = rng.integers(0, 256, size=(nblocks, 16), dtype=np.uint8)
    return out.reshape(rows, cols // 32 * 18)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-from", default="../shared/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    hidden, inter, layers, heads, kv, vocab, tied, arch = SHAPES[a.shape]
    head_dim = hidden // heads
    rng = np.random.default_rng(a.seed)
    src = gguf.GGUFReader(a.tokenizer_from)

    def field(k):
        f = src.fields[k]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [int(f.parts[i][0]) for i in f.data]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        return f.parts[f.data[0]][0]

    w = gguf.GGUFWriter(a.out, arch)
    w.add_name(f"synthetic-{a.shape}")
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(2)
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    pad = vocab - len(tokens)
    assert pad >= 0, "the shape's vocabulary is smaller than the tokenizer's"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    w.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab)])
    w.add_token_types(types + [5] * pad)
    w.add_token_merges(field("tokenizer.ggml.merges"))
    w.add_bos_token_id(int(field("tokenizer.ggml.bos_token_id")))
    w.add_eos_token_id(int(field("tokenizer.ggml.eos_token_id")))
    w.add_chat_template(field("tokenizer.chat_template"))

    Q = gguf.GGMLQuantizationType.Q4_0
    ones = lambda n: np.ones(n, dtype=np.float32)
    w.add_tensor("token_embd.weight", q4_0(vocab, hidden, rng), raw_dtype=Q)
    for i in range(layers):
        p = f"blk.{i}"
        for name, rows, cols in [
            ("attn_q", heads * head_dim, hidden), ("attn_k", kv * head_dim, hidden),
            ("attn_v", kv * head_dim, hidden), ("attn_output", hidden, heads * head_dim),
            ("ffn_gate", inter, hidden), ("ffn_up", inter, hidden), ("ffn_down", hidden, inter),
        ]:
            w.add_tensor(f"{p}.{name}.weight", q4_0(rows, cols, rng), raw_dtype=Q)
        if arch == "qwen2":
            for name, rows in [("attn_q", heads * head_dim), ("attn_k", kv * head_dim), ("attn_v", kv * head_dim)]:
                w.add_tensor(f"{p}.{name}.bias", np.zeros(rows, dtype=np.float32))
        w.add_tensor(f"{p}.attn_norm.weight", ones(hidden))
        w.add_tensor(f"{p}.ffn_norm.weight", ones(hidden))
    w.add_tensor("output_norm.weight", ones(hidden))
    if not tied:
        w.add_tensor("output.weight", q4_0(vocab, hidden, rng), raw_dtype=Q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
