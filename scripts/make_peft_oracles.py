#!/usr/bin/env python3
"""Writes tests/fixtures/peft/: adapters made and saved by PEFT itself, with PEFT's per-token CE, for tests/peft.rs.

Needs torch, transformers and peft (made with torch 2.15, transformers 5.25, peft 0.21.2 on the CPU); CI does not:
it only reads what this script wrote. Run from anywhere:

    python scripts/make_peft_oracles.py

Base model: the tiny transformers-made Qwen2 in ../shared/assets/tiny-qwen2 (tied embeddings). For every variant
the script builds `get_peft_model(base, LoraConfig(...))`, moves every trainable tensor away from PEFT's
initialisation with a seeded generator (lora_A, lora_B, DoRA's magnitudes, the modules_to_save copies of the
embeddings and the head), saves it with `save_pretrained`, loads it back with `PeftModel.from_pretrained` to check
the saved files reproduce the model, and records PEFT's per-token CE on fixed token ids (`ids.json`) for the
adapter model (`loss`), after `merge_and_unload()` (`merged_loss`) and for the base alone (`base_loss`).

Files per variant directory: `adapter_config.json` as PEFT wrote it (README.md is dropped), `oracle.json` and
- without modules_to_save: `adapter_model.safetensors` as PEFT wrote it;
- with modules_to_save: the two vocabulary-sized matrices (8192 x 256 f32, 8 MB each) would dwarf everything else,
  so only their rows that differ from the base's are kept: `adapter_model.lora.safetensors` holds PEFT's other
  tensors (the same values) and `vocab_rows.safetensors` holds, for each matrix, those rows (`<PEFT's tensor
  name>`, `[k, hidden]`), their row indices being in `oracle.json` (`vocab_rows`); every other row is bit for bit
  the base model's. tests/peft.rs rebuilds PEFT's `adapter_model.safetensors` from the base's
  `model.embed_tokens.weight` and these rows.

The embeddings and the head get different changes (PEFT without `ensure_weight_tying` gives each listed module its
own copy), so a loader that kept them tied would fail; `modules_to_save_tied` is PEFT's `ensure_weight_tying`
form: one matrix, saved under both names, listed as `["embed_tokens", "model.embed_tokens"]`. Only the rows that can change the CE on `ids.json` are
changed: the embeddings at the input ids, the head at the target ids plus 16 others (which enter the softmax).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

# `target_modules` is a Python set in PEFT's config and is written in hash order: pin the hash seed so that the
# fixtures are the same from run to run.
if os.environ.get("PYTHONHASHSEED") != "0":
    env = dict(os.environ, PYTHONHASHSEED="0")
    raise SystemExit(subprocess.call([sys.executable, *sys.argv], env=env))

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Relative to the repository root, as the tests reach it (and as PEFT records it in `base_model_name_or_path`).
BASE = os.path.join("..", "shared", "assets", "tiny-qwen2")
OUT = os.path.join("tests", "fixtures", "peft")
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MTS = ["embed_tokens", "lm_head"]

# name, LoraConfig arguments, seed. Small ranks and module subsets keep the files small; together the variants
# cover all seven projections (and DoRA on both attention and MLP projections, with k/v's narrower outputs).
VARIANTS = [
    ("lora", dict(r=1, lora_alpha=3, target_modules=ALL7), 11),
    ("rslora", dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "k_proj"]), 12),
    ("dora", dict(r=2, lora_alpha=2.5, lora_dropout=0.1, use_dora=True,
                  target_modules=["v_proj", "gate_proj", "down_proj"]), 13),
    ("modules_to_save", dict(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], modules_to_save=MTS), 14),
    ("dora_modules_to_save", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["k_proj", "down_proj"],
                                  modules_to_save=MTS), 15),
    # PEFT's recommended form on a tied model: one trained matrix, listed as `["embed_tokens",
    # "model.embed_tokens"]` and saved under both names.
    ("modules_to_save_tied", dict(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj"], modules_to_save=MTS,
                                  ensure_weight_tying=True), 16),
]


def load_base():
    return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()


def ce_of(model, ids):
    """PEFT's per-token CE: [row][t] = CE(logits[row, t], ids[row, t + 1])."""
    with torch.no_grad():
        logits = model(ids).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1)
    return (-lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)).tolist()


def max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def perturb(model, ids, seed):
    """Moves every trainable tensor away from PEFT's initialisation (B = 0 would make LoRA the identity, the
    magnitudes start at the base's row norms, the modules_to_save copies equal the base). Returns whether it
    changed vocabulary-sized matrices."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    inputs = sorted(set(ids.flatten().tolist()))
    targets = set(ids[:, 1:].flatten().tolist())
    others = [i for i in torch.randperm(vocab, generator=g).tolist() if i not in targets][:16]
    head_rows = sorted(targets | set(others))
    # With `ensure_weight_tying` the head is the embeddings' copy (no parameter of its own).
    own_head = any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    changed = False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.25 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name and ("embed_tokens" in name or "lm_head" in name):
                if "lm_head" in name:
                    which = head_rows
                else:
                    which = inputs if own_head else sorted(set(inputs) | set(head_rows))
                idx = torch.tensor(which)
                p[idx] += torch.randn((len(which), p.shape[1]), generator=g) * 0.03
                changed = True
            else:
                raise SystemExit(f"unexpected trainable parameter {name}")
    return changed


def main():
    os.chdir(ROOT)
    g = torch.Generator().manual_seed(2024)
    base = load_base()
    vocab = base.config.vocab_size
    assert base.config.tie_word_embeddings, "the fixtures assume tiny-qwen2's tied embeddings"
    embed = base.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, vocab, (2, 20), generator=g)
    base_ce = ce_of(base, ids)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    with open(os.path.join(OUT, "ids.json"), "w") as f:
        json.dump(ids.tolist(), f)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    for name, kw, seed in VARIANTS:
        model = get_peft_model(load_base(), LoraConfig(task_type="CAUSAL_LM", **kw))
        vocab_sized = perturb(model, ids, seed)
        model.eval()
        loss = ce_of(model, ids)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            again = PeftModel.from_pretrained(load_base(), tmp).eval()
            d = max_diff(ce_of(again, ids), loss)
            assert d == 0.0, f"{name}: the saved adapter gives other losses ({d})"
            merged_loss = ce_of(again.merge_and_unload(), ids)
            dest = os.path.join(OUT, name)
            os.makedirs(dest)
            shutil.copy(os.path.join(tmp, "adapter_config.json"), dest)
            if not vocab_sized:
                # Byte for byte PEFT's file.
                shutil.copy(os.path.join(tmp, "adapter_model.safetensors"), dest)
            tensors = load_file(os.path.join(tmp, "adapter_model.safetensors"))
        oracle = {"peft_config": kw, "seed": seed, "versions": versions, "loss": loss, "merged_loss": merged_loss,
                  "base_loss": base_ce, "moved_from_base": max_diff(loss, base_ce)}
        assert all(t.dtype == torch.float32 for t in tensors.values())
        if vocab_sized:
            vocab_rows, small = {}, {}
            for key, t in tensors.items():
                if t.shape[0] != vocab:
                    small[key] = t
                    continue
                # The rows that differ from the base's, bit for bit; all others are the base's.
                changed = (t != embed).any(dim=1).nonzero().flatten().tolist()
                assert changed, f"{name}: {key} is the base's"
                vocab_rows[key] = t[changed].contiguous()
                oracle.setdefault("vocab_rows", {})[key] = changed
            assert set(oracle["vocab_rows"]) == {"base_model.model.model.embed_tokens.weight",
                                                 "base_model.model.lm_head.weight"}, list(oracle["vocab_rows"])
            save_file(small, os.path.join(dest, "adapter_model.lora.safetensors"), metadata={"format": "pt"})
            save_file(vocab_rows, os.path.join(dest, "vocab_rows.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(dest, "oracle.json"), "w") as f:
            f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in oracle.items()) + "\n}\n")
        print(f"{name}: moved from base {oracle['moved_from_base']:.4f}, "
              f"merged vs adapter {max_diff(merged_loss, loss):.2e}")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"{OUT}: {total} bytes")


if __name__ == "__main__":
    main()
