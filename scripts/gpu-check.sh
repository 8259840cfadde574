#!/usr/bin/env bash
# The GPU check: one prepared run on a CUDA machine (NVIDIA driver + CUDA, Python with PyTorch, transformers and
# peft; no Rust toolchain, no internet). Takes the binary built by scripts/build-cuda.sh (dist/cuda/ytrainer.xz),
# then, within ~10 minutes:
#   a. creates random-initialised checkpoints with transformers: a tiny Llama and one of SmolLM2-135M's shape;
#   b. parity: per-token losses of `ytrainer score --device cuda` vs transformers on the same ids (f32);
#   c. training checks on the tiny preset (made by `ytrainer init`), per-step losses against a reference run:
#      LoRA NLIRG on cuda vs cpu; LoRA over a q8_0 GGUF base (made by `ytrainer export`) on cuda vs cpu; gradient
#      checkpointing vs plain on cuda; bf16 vs f32 on cuda; a 1-rank NCCL group (YTRAINER_TRANSPORT=nccl, PyTorch's
#      libnccl) vs the plain run on cuda; DPO step-0 loss = ln 2 on cuda (training.json);
#   c2. LoRA variants against PEFT (peft.json): DoRA, modules_to_save and both trained on the tiny preset, each
#      adapter loaded with PeftModel.from_pretrained (per-token CE vs ytrainer score) and merged (merge_and_unload
#      vs ytrainer merge); alone: python3 scripts/gpu_check.py --only peft --out DIR (CPU PyTorch is enough);
#   d. LoRA SFT throughput side by side (r 16, all 7 projections, seq 1024): `ytrainer bench --device cuda
#      --shape smollm2` vs benches/torch_baseline.py (PyTorch + PEFT, f32 and bf16), tokens/s, peak GPU memory, MFU;
#      ytrainer CE vs NLIRG step time;
#   e. writes results.json and results.md under $OUT (and every raw log).
# Not covered: several ranks (MPI, docs/distributed.md; the CUDA binary is built without `mpi`, the machine has one GPU).
# The training checks alone, without PyTorch or a GPU: python3 scripts/gpu_check.py --only training --device cpu
# Usage (device tool): bash scripts/gpu-check.sh      ($OUT defaults to ./gpu-out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
echo "== $(date -u) gpu-check"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed"
head -15 "$OUT/nvidia-smi.txt"
python3 - <<'PY'
import lzma, os, shutil, stat
src = "dist/cuda/ytrainer.xz"
if not os.path.exists(src):
    raise SystemExit("dist/cuda/ytrainer.xz missing: build it with scripts/build-cuda.sh and carry dist/cuda")
with lzma.open(src) as f, open("/tmp/ytrainer", "wb") as g:
    shutil.copyfileobj(f, g)
os.chmod("/tmp/ytrainer", os.stat("/tmp/ytrainer").st_mode | stat.S_IEXEC)
PY
export YTRAINER=/tmp/ytrainer
timeout 570 python3 scripts/gpu_check.py --out "$OUT"
echo "== exit $? $(date -u)"
