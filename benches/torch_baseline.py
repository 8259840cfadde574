#!/usr/bin/env python3
"""PyTorch + PEFT baseline for `ytrainer bench`: the same shapes, trained the same way.

Run manually (CI has no torch), alternating with `ytrainer bench` on an otherwise idle machine:

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers peft
    /tmp/torchenv/bin/python benches/torch_baseline.py --shape tiny --mode lora --steps 10

What a step is (identical to `ytrainer bench`): one batch of B x T random token ids from a seeded stream, every
position except the first of each row supervised (transformers shifts labels itself), fp32, forward + mean CE +
backward + AdamW (lr 1e-4, no clipping). The model is a randomly initialised Qwen2 of the bench shape with tied
embeddings; LoRA is r = 8, alpha = 16, dropout 0 on the seven projections (PEFT). `--warmup` (2) untimed steps, then
`--steps` timed ones. Prints one line (or one JSON object with --format json) in `ytrainer bench`'s vocabulary:
tokens_per_s = B * T * steps / time of the timed steps, peak_rss_mb = the process's peak RSS.

`--windowed N` runs the seed's `--token_batch N` loop instead, in PyTorch as the seed itself does: one sample of
`--prompt` (64) random prompt ids and `--seq` (256) answer ids, its answer cut into windows of N targets (the tail
window kept, as in `ytrainer bench --windowed N`, so both sides run the same number of windows), and per window one
forward over the whole prompt + answer with the labels outside the window set to -100, one backward and one AdamW
step. Two warm-up windows, then `--rounds` timed epochs of the sample; prints the median epoch time, to compare
with `ytrainer bench --windowed N`'s ytrainer time (alternate the two runs).
"""

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    # architecture, vocab, hidden, intermediate, layers, heads, kv heads (crates/ytrainer-cli/src/bench.rs)
    "tiny": ("qwen2", 8192, 256, 704, 4, 4, 2),
    "small": ("qwen2", 16384, 512, 1408, 8, 8, 4),
    "smollm2": ("llama", 49152, 576, 1536, 30, 9, 3),
    # Qwen2.5-1.5B's shape (benches/synthetic_gguf.py --shape qwen2.5-1.5b): the QLoRA memory comparison.
    "qwen2.5-1.5b": ("qwen2", 151936, 1536, 8960, 28, 12, 2),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa or eager)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="weights and compute dtype")
    ap.add_argument("--format", choices=["text", "json"], default="text")
    ap.add_argument(
        "--gradient-checkpointing", action="store_true", help="transformers' gradient checkpointing (non-reentrant)"
    )
    ap.add_argument("--windowed", type=int, default=0, metavar="N", help="time the seed's token_batch N loop")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens of the --windowed sample")
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs of the --windowed sample")
    a = ap.parse_args()

    torch.manual_seed(0)
    arch, vocab, hidden, inter, layers, heads, kv = SHAPES[a.shape]
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=True,
    )
    config._attn_implementation = a.attn
    if a.dtype == "bf16":
        # Built in bf16 directly, as from_pretrained(dtype=bfloat16) loads a checkpoint: an f32 model converted
        # afterwards would put a transient f32 copy into the peak RSS.
        torch.set_default_dtype(torch.bfloat16)
    model = model_cls(config)
    torch.set_default_dtype(torch.float32)
    model = model.to(a.device)
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(
            model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=targets)
        )
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    gen = torch.Generator().manual_seed(0)
    if a.windowed > 0:
        return windowed(a, model, optim, vocab, gen)

    def step():
        ids = torch.randint(0, vocab, (a.batch, a.seq), generator=gen).to(a.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(a.warmup):
        step()
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        ce = step()  # .item() synchronises the device
        times.append(time.perf_counter() - t0)
    total = sum(times)
    result = {
        **common_result(a),
        "batch": a.batch,
        "seq": a.seq,
        "steps": a.steps,
        "tokens_per_s": round(a.batch * a.seq * a.steps / total, 2),
        "median_step_s": round(statistics.median(times), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_ce": round(ce, 4),
        "device": a.device,
        "dtype": a.dtype,
        "rank": a.rank,
        "gradient_checkpointing": a.gradient_checkpointing,
    }
    if a.device.startswith("cuda"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if a.format == "json":
        print(json.dumps(result))
    else:
        print(
            f"torch {a.shape}/{a.mode} batch {a.batch}x{a.seq}: {result['tokens_per_s']:.0f} tokens/s "
            f"(median step {result['median_step_s']:.3f}s over {a.steps} steps), "
            f"peak RSS {result['peak_rss_mb']:.0f} MiB, last CE {ce:.4f}"
        )


def common_result(a):
    return {
        "impl": "pytorch",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": a.shape,
        "mode": a.mode,
    }


def windowed(a, model, optim, vocab, gen):
    """The seed's token_batch loop: every window recomputes the whole sequence and its full-vocabulary logits."""
    n = a.windowed
    ids = torch.randint(0, vocab, (1, a.prompt + a.seq), generator=gen).to(a.device)
    starts = list(range(a.prompt, a.prompt + a.seq, n))

    def window(start):
        labels = torch.full_like(ids, -100)
        end = min(start + n, a.prompt + a.seq)
        labels[0, start:end] = ids[0, start:end]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss.item()

    for start in starts[:2]:
        window(start)
    epochs = []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        for start in starts:
            window(start)
        epochs.append(time.perf_counter() - t0)
    result = {
        **common_result(a),
        "windowed": n,
        "prompt": a.prompt,
        "answer": a.seq,
        "windows": len(starts),
        "rounds": a.rounds,
        "seed_way_s": round(statistics.median(epochs), 4),
        "seed_way_s_per_round": [round(e, 4) for e in epochs],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if a.format == "json":
        print(json.dumps(result))
    else:
        print(
            f"torch {a.shape}/{a.mode} windowed N={n}, prompt {a.prompt} + answer {a.seq} tokens "
            f"({len(starts)} windows): the seed's way {result['seed_way_s']:.2f}s per epoch of the sample "
            f"(median of {a.rounds})"
        )


if __name__ == "__main__":
    main()
