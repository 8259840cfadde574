#!/usr/bin/env python3
"""The Python half of scripts/gpu-check.sh (run it through that script: it unpacks the CUDA binary first).

Writes under --out: checkpoints' parity, the training checks (train/), the side-by-side benchmark (bench.jsonl),
results.json and results.md. Every step has its own time limit so a hang in one cannot eat the machine's budget.

The training checks need no PyTorch: `--only training --device cpu` dry-runs them with any ytrainer binary.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import math

YT = os.environ.get("YTRAINER", "/tmp/ytrainer")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# SmolLM2-135M-Instruct's config.json (../shared/assets/smollm2-135m-instruct/config.json), random weights.
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2,
)
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2,
)


def log(*a):
    print(*a, flush=True)


def run(cmd, timeout, env=None):
    log("$", " ".join(cmd))
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"cmd": cmd, "rc": "timeout", "stdout": "", "stderr": "", "s": time.time() - t0}
    if p.returncode != 0:
        log(p.stdout[-2000:], p.stderr[-2000:])
    return {"cmd": cmd, "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "s": time.time() - t0}


def make_checkpoint(path, cfg, seed):
    """A random-initialised Llama in HF layout, with a word-level tokenizer (ytrainer loads one with every model)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(path, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(min(cfg["vocab_size"], 256))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "t1", "eos_token": "t2", "unk_token": "t0"}, f)
    return model


def parity(name, path, cfg, out_dir, device="cuda"):
    """Per-token CE of ytrainer on CUDA vs transformers (f32, same ids); bf16 reported for transformers only."""
    import torch

    model = make_checkpoint(path, cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (2, 64), generator=g)
    ids_path = os.path.join(out_dir, f"ids-{name}.json")
    with open(ids_path, "w") as f:
        json.dump(ids.tolist(), f)
    ref = {}
    for dtype in ("f32", "bf16"):
        m = model.to(device, dtype=torch.float32 if dtype == "f32" else torch.bfloat16)
        with torch.no_grad():
            logits = m(ids.to(device)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        ce = -lp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        ref[dtype] = ce.cpu().tolist()
    scores = os.path.join(out_dir, f"scores-{name}.jsonl")
    r = run([YT, "score", "--model", path, "--ids-json", ids_path, "--device", device, "--out", scores], 180)
    result = {"model": name, "ytrainer_rc": r["rc"], "ytrainer_s": round(r["s"], 1)}
    if r["rc"] == 0:
        ours = [[t["loss"] for t in json.loads(line)["tokens"]] for line in open(scores)]
        for dtype in ("f32", "bf16"):
            diffs = [abs(a - b) for ro, rr in zip(ours, ref[dtype]) for a, b in zip(ro, rr)]
            result[f"max_abs_diff_vs_transformers_{dtype}"] = max(diffs)
    else:
        result["stderr"] = r["stderr"][-1500:]
    return result


# Preference pairs in the vocabulary of the quickstart data (the tiny preset's tokenizer is trained on it).
PAIRS = [
    {"prompt": "What is 1 + 41?", "chosen": "1 + 41 = 42.", "rejected": "1 + 41 = 24."},
    {"prompt": "What is 15 + 48?", "chosen": "15 + 48 = 63.", "rejected": "15 + 48 = 36."},
    {"prompt": "What is 34 + 8?", "chosen": "34 + 8 = 42.", "rejected": "34 + 8 = 48."},
    {"prompt": "How many letters are in the word 'bridge'?", "chosen": "The word 'bridge' has 6 letters.",
     "rejected": "The word 'bridge' has 5 letters."},
]


def nccl_env(work):
    """YTRAINER_TRANSPORT=nccl, and LD_LIBRARY_PATH with a `libnccl.so` link to PyTorch's NCCL (cudarc looks for
    that name; the wheel ships only NCCL's soname libnccl.so.2)."""
    env = {"YTRAINER_TRANSPORT": "nccl"}
    try:
        import nvidia.nccl  # PyTorch's dependency wheel
        lib = os.path.join(list(nvidia.nccl.__path__)[0], "lib")
        so = [f for f in os.listdir(lib) if f.startswith("libnccl.so")]
        if so:
            links = os.path.join(work, "nccl-lib")
            os.makedirs(links, exist_ok=True)
            link = os.path.join(links, "libnccl.so")
            if not os.path.exists(link):
                os.symlink(os.path.join(lib, sorted(so)[0]), link)
            env["LD_LIBRARY_PATH"] = links + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")
    except Exception as e:  # noqa: BLE001 - then the system's NCCL, if any, is used
        log("no NCCL from PyTorch's wheels:", e)
    return env


def training_checks(out_dir, device, steps=6):
    """Training on `device` against a reference run, on the tiny preset (made here by `ytrainer init`; no download):
    LoRA (NLIRG) vs the same run on the CPU; LoRA over a quantised GGUF base (q8_0, made by `ytrainer export`) vs
    the CPU; gradient checkpointing vs the plain run on the device; bf16 vs f32 on the device; DPO's step-0 loss
    (ln 2). Each check: the largest per-step loss difference, the tolerance it is held to, and whether it held."""
    work = os.path.join(out_dir, "train")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(ROOT, "examples", "quickstart", "train.jsonl")
    base = os.path.join(work, "base")
    gguf = os.path.join(work, "base-q8_0.gguf")
    pairs = os.path.join(work, "pairs.jsonl")
    with open(pairs, "w") as f:
        f.write("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    for cmd in ([YT, "init", "--data", data, "--out", base],
                [YT, "export", "--model", base, "--to", gguf, "--type", "q8_0"]):
        r = run(cmd, 120)
        if r["rc"] != 0:
            return [{"check": "setup", "ok": False, "cmd": " ".join(cmd), "stderr": r["stderr"][-1500:]}]

    def train(name, model, dev, *extra, data_file=data, env=None):
        out = os.path.join(work, name)
        r = run([YT, "run", "--model", model, "--data", data_file, "--device", dev, "--max-steps", str(steps),
                 "--tokens-per-step", "128", "--output-dir", out, "--overwrite", *extra], 240, env)
        if r["rc"] != 0:
            return None, r["stderr"][-1500:]
        if env and env.get("YTRAINER_TRANSPORT") == "nccl" and "sums over NCCL" not in r["stderr"]:
            return None, "the run did not report the NCCL transport:\n" + r["stderr"][-1500:]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line)["loss"] for line in f], None

    def compare(check, a, b, tol):
        (x, ex), (y, ey) = a, b
        if x is None or y is None:
            return {"check": check, "ok": False, "stderr": ex or ey}
        diff = max(abs(p - q) for p, q in zip(x, y)) if len(x) == len(y) else float("inf")
        return {"check": check, "ok": diff <= tol, "max_abs_loss_diff": diff, "tolerance": tol,
                "losses": [round(v, 6) for v in y], "reference_losses": [round(v, 6) for v in x]}

    checks = []
    lora = ("--loss", "nlirg", "--adapter", "lora", "--lora-r", "8")
    on_dev = train("lora", base, device, *lora)
    checks.append(compare(f"LoRA NLIRG f32, {device} vs cpu", train("lora-cpu", base, "cpu", *lora), on_dev, 1e-3))
    checks.append(compare(f"LoRA over a q8_0 GGUF base, {device} vs cpu", train("qlora-cpu", gguf, "cpu", *lora),
                          train("qlora", gguf, device, *lora), 1e-3))
    checks.append(compare(f"gradient checkpointing vs plain, on {device}", on_dev,
                          train("lora-recompute", base, device, *lora, "--gradient-checkpointing"), 1e-4))
    checks.append(compare(f"bf16 vs f32, on {device}", on_dev,
                          train("lora-bf16", base, device, *lora, "--precision", "bf16"), 0.15))
    if device.startswith("cuda"):
        # A 1-rank NCCL group (the machine has one GPU): set-up, the check sum and every step's gradient and
        # counter sums go through NCCL (host-staged); one rank sums to itself, so the losses equal the plain run's.
        checks.append(compare(f"1-rank NCCL transport vs none, on {device}", on_dev,
                              train("lora-nccl", base, device, *lora, env=nccl_env(work)), 1e-6))
    dpo, err = train("dpo", base, device, "--loss", "dpo", "--set", "preference.pairs_per_step=4", data_file=pairs)
    checks.append({"check": f"DPO step-0 loss = ln 2, on {device}", "ok": dpo is not None and abs(dpo[0] - math.log(2)) < 1e-5,
                   "step0_loss": dpo and dpo[0], "stderr": err})
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(checks, f, indent=1)
    return checks


def peft_checks(out_dir, device, steps=4):
    """The LoRA variants against PEFT itself: a few training steps on the tiny preset with plain LoRA, rsLoRA, DoRA,
    with modules_to_save (tied embeddings: one matrix saved as both `embed_tokens` and `lm_head`) and with both; each
    exported adapter is loaded with `PeftModel.from_pretrained` and its per-token CE on random ids compared with
    `ytrainer score --adapter`; then PEFT's `merge_and_unload()` against `ytrainer merge` loaded with transformers.
    A learning rate of 1e-2 moves the magnitudes and embeddings far enough from the base that a format or
    formula error shows (the base is reported too)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work = os.path.join(out_dir, "peft")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(ROOT, "examples", "quickstart", "train.jsonl")
    base = os.path.join(out_dir, "train", "base")
    if not os.path.exists(os.path.join(base, "config.json")):
        r = run([YT, "init", "--data", data, "--out", base], 120)
        if r["rc"] != 0:
            return [{"check": "peft setup", "ok": False, "stderr": r["stderr"][-1500:]}]
    with open(os.path.join(base, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 48), generator=g)
    ids_path = os.path.join(work, "ids.json")
    with open(ids_path, "w") as f:
        json.dump(ids.tolist(), f)

    def ce_of(model):
        with torch.no_grad():
            logits = model(ids.to(device)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        return (-lp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)).cpu().tolist()

    def ours(adapter, name):
        scores = os.path.join(work, f"scores-{name}.jsonl")
        cmd = [YT, "score", "--model", base, "--ids-json", ids_path, "--device", "cpu", "--out", scores]
        if adapter:
            cmd += ["--adapter", adapter]
        r = run(cmd, 180)
        if r["rc"] != 0:
            return None, r["stderr"][-1500:]
        return [[t["loss"] for t in json.loads(line)["tokens"]] for line in open(scores)], None

    def max_diff(a, b):
        return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))

    load = lambda path: AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(device).eval()
    base_ce = ce_of(load(base))
    variants = [
        ("lora", []),
        ("rslora", ["--set", "adapter.use_rslora=true"]),
        ("dora", ["--set", "adapter.use_dora=true"]),
        ("modules_to_save", ["--set", 'adapter.modules_to_save=["embed_tokens","lm_head"]']),
        ("dora+modules_to_save", ["--set", "adapter.use_dora=true",
                                  "--set", 'adapter.modules_to_save=["embed_tokens","lm_head"]']),
    ]
    checks = []
    for name, extra in variants:
        out = os.path.join(work, name)
        r = run([YT, "run", "--model", base, "--data", data, "--device", "cpu", "--max-steps", str(steps),
                 "--tokens-per-step", "128", "--learning-rate", "1e-2", "--lora-r", "8", "--output-dir", out,
                 "--overwrite", *extra], 240)
        if r["rc"] != 0:
            checks.append({"check": f"PEFT loads the {name} adapter", "ok": False, "stderr": r["stderr"][-1500:]})
            continue
        adapter = os.path.join(out, "final")
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            acfg = json.load(f)
        mine, err = ours(adapter, name)
        if mine is None:
            checks.append({"check": f"PEFT loads the {name} adapter", "ok": False, "stderr": err})
            continue
        try:
            peft_model = PeftModel.from_pretrained(load(base), adapter).eval()
            theirs = ce_of(peft_model)
            merged_theirs = ce_of(peft_model.merge_and_unload())
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            checks.append({"check": f"PEFT loads the {name} adapter", "ok": False, "stderr": repr(e)[-1500:]})
            continue
        d = max_diff(mine, theirs)
        checks.append({"check": f"PEFT loads the {name} adapter: per-token CE vs ytrainer score", "ok": d <= 1e-4,
                       "max_abs_loss_diff": d, "tolerance": 1e-4, "moved_from_base": max_diff(theirs, base_ce),
                       "use_rslora": acfg.get("use_rslora"), "use_dora": acfg.get("use_dora"),
                       "modules_to_save": acfg.get("modules_to_save")})
        merged_dir = os.path.join(work, f"merged-{name}")
        r = run([YT, "merge", "--model", base, "--adapter", adapter, "--out", merged_dir], 180)
        if r["rc"] != 0:
            checks.append({"check": f"ytrainer merge of {name} vs PEFT merge_and_unload", "ok": False,
                           "stderr": r["stderr"][-1500:]})
            continue
        dm = max_diff(ce_of(load(merged_dir)), merged_theirs)
        checks.append({"check": f"ytrainer merge of {name} vs PEFT merge_and_unload (per-token CE)",
                       "ok": dm <= 1e-4, "max_abs_loss_diff": dm, "tolerance": 1e-4})
    with open(os.path.join(out_dir, "peft.json"), "w") as f:
        json.dump(checks, f, indent=1)
    return checks


def bench_rows(out_dir, batch, seq, steps):
    rows = []
    cmds = [
        ("ytrainer", "f32", "ce", [YT, "bench", "--device", "cuda", "--shape", "smollm2", "--mode", "lora", "--rank", "16",
                                    "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--format", "json"]),
        ("ytrainer", "f32", "nlirg", [YT, "bench", "--device", "cuda", "--shape", "smollm2", "--mode", "lora", "--rank", "16",
                                       "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--loss", "nlirg",
                                       "--format", "json"]),
        ("ytrainer", "bf16", "ce", [YT, "bench", "--device", "cuda", "--shape", "smollm2", "--mode", "lora", "--rank", "16",
                                     "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--precision", "bf16",
                                     "--format", "json"]),
    ]
    for dtype in ("f32", "bf16"):
        cmds.append(("pytorch", dtype, "ce", [sys.executable, os.path.join(ROOT, "benches", "torch_baseline.py"),
                                               "--device", "cuda", "--dtype", dtype, "--shape", "smollm2", "--mode", "lora",
                                               "--rank", "16", "--batch", str(batch), "--seq", str(seq),
                                               "--steps", str(steps), "--format", "json"]))
    for impl, dtype, loss, cmd in cmds:
        r = run(cmd, 150)
        row = {"impl": impl, "dtype": dtype, "loss": loss, "rc": r["rc"]}
        if r["rc"] == 0:
            try:
                row.update(json.loads(r["stdout"].strip().splitlines()[-1]))
            except (ValueError, IndexError):
                row["stdout"] = r["stdout"][-1000:]
        else:
            row["stderr"] = r["stderr"][-1500:]
        rows.append(row)
        with open(os.path.join(out_dir, "bench.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


def lora_train_flops_per_token(cfg, seq, rank):
    """Model FLOPs of one LoRA training token: forward 2N + backward 2N (activations only; the frozen base gets no
    weight gradient) over the linear layers and the LM head, plus causal attention's 2 x 2 x seq/2 x hidden per
    layer forward and twice that backward; the LoRA matrices add 6 x their parameters."""
    h, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    linear = L * (2 * h * h + 2 * h * kv + 3 * h * i)
    lora = L * rank * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    attn = L * 2 * 2 * (seq / 2) * h
    return 4 * (linear + h * v) + 3 * attn + 6 * lora


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to dry-run the parity part without a GPU")
    ap.add_argument("--only", choices=["training", "peft"],
                    help="run only the training checks (no PyTorch needed) or only the PEFT variant checks")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.only == "training":
        checks = training_checks(a.out, a.device)
        log(json.dumps(checks, indent=1))
        raise SystemExit(0 if all(c["ok"] for c in checks) else 1)
    if a.only == "peft":
        checks = peft_checks(a.out, a.device)
        log(json.dumps(checks, indent=1))
        raise SystemExit(0 if checks and all(c["ok"] for c in checks) else 1)
    import torch

    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu (dry run)"
    results = {"device": name, "torch": torch.__version__}
    log("device:", results["device"])
    results["parity"] = [
        parity("tiny", "/tmp/gpu-tiny", TINY, a.out, a.device),
        parity("smollm2-shape", "/tmp/gpu-smollm2", SMOLLM2, a.out, a.device),
    ]
    log(json.dumps(results["parity"], indent=1)[:3000])
    results["training"] = training_checks(a.out, a.device)
    log(json.dumps(results["training"], indent=1)[:6000])
    results["peft"] = peft_checks(a.out, a.device)
    log(json.dumps(results["peft"], indent=1)[:4000])
    if a.device != "cuda":
        return
    rows = bench_rows(a.out, a.batch, a.seq, a.steps)
    flops = lora_train_flops_per_token(SMOLLM2, a.seq, 16)
    # Dense peaks of an H200 SXM (NVIDIA datasheet): bf16 989 TFLOP/s, TF32 495, FP32 67.
    peaks = {"bf16": 989e12, "f32": 67e12}
    for r in rows:
        if "tokens_per_s" in r:
            r["mfu"] = r["tokens_per_s"] * flops / peaks[r["dtype"]]
    results["bench"] = rows
    results["model_flops_per_token"] = flops
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"# GPU check on {results['device']} (torch {results['torch']})", "",
             "## Parity (per-token CE, 2 x 64 random ids; ytrainer f32 on CUDA)", "",
             "| model | max abs diff vs transformers f32 | vs transformers bf16 |", "|---|---|---|"]
    for p in results["parity"]:
        lines.append(f"| {p['model']} | {p.get('max_abs_diff_vs_transformers_f32', 'failed')} | "
                     f"{p.get('max_abs_diff_vs_transformers_bf16', 'failed')} |")
    lines += ["", "## Training checks (tiny preset; per-step losses against a reference run)", "",
              "| check | max abs loss diff | tolerance | ok |", "|---|---|---|---|"]
    for c in results["training"]:
        lines.append(f"| {c['check']} | {c.get('max_abs_loss_diff', c.get('step0_loss', 'failed'))} | "
                     f"{c.get('tolerance', '1e-5 from ln 2' if 'step0_loss' in c else '')} | {c['ok']} |")
    lines += ["", "## LoRA variants loaded by PEFT (tiny preset; per-token CE on 2 x 48 random ids)", "",
              "| check | max abs loss diff | tolerance | ok |", "|---|---|---|---|"]
    for c in results["peft"]:
        lines.append(f"| {c['check']} | {c.get('max_abs_loss_diff', 'failed')} | {c.get('tolerance', '')} | {c['ok']} |")
    lines += ["", f"## LoRA SFT, SmolLM2-135M shape, r 16 on 7 projections, batch {a.batch} x {a.seq}", "",
              "| impl | dtype | loss | tokens/s | peak GPU MiB | MFU |", "|---|---|---|---|---|---|"]
    for r in rows:
        tps = r.get("tokens_per_s")
        lines.append(f"| {r['impl']} | {r['dtype']} | {r['loss']} | {round(tps) if tps else r['rc']} | "
                     f"{r.get('peak_gpu_mb', 'n/a')} | {('%.1f%%' % (100 * r['mfu'])) if 'mfu' in r else 'n/a'} |")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
