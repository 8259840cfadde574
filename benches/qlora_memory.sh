#!/usr/bin/env bash
# Peak RSS of one LoRA optimizer step on a large synthetic quantised base, side by side with PyTorch + PEFT on the
# same shape (docs/performance.md, "Bigger models"). Not a test: minutes per run on 2 cores, GBs of memory.
#
#   bash benches/qlora_memory.sh qwen2.5-1.5b 1024 3GB      # shape, sequence length, ytrainer's --memory-budget
#   bash benches/qlora_memory.sh llama-7b 512 8GB
#   TORCH=1 bash benches/qlora_memory.sh qwen2.5-1.5b 1024 3GB   # also PyTorch + PEFT, fp32 and bf16
#
# Needs: a release build (`cargo build --release`), python3 with `gguf` and `numpy` (and torch, transformers, peft
# for TORCH=1; e.g. a venv in $PYTHON). Writes under ${WORK:-/tmp/ytrainer-qlora-bench}: the synthetic GGUF
# (benches/synthetic_gguf.py; never commit it), a text corpus cut from this repository's docs, and one log per run.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE=${1:?shape: qwen2.5-1.5b or llama-7b}
SEQ=${2:?sequence length}
BUDGET=${3:-auto}
PYTHON=${PYTHON:-python3}
YT=${YTRAINER:-$PWD/target/release/ytrainer}
WORK=${WORK:-/tmp/ytrainer-qlora-bench}
mkdir -p "$WORK"
GGUF="$WORK/$SHAPE.gguf"
[ -f "$GGUF" ] || "$PYTHON" benches/synthetic_gguf.py --shape "$SHAPE" --out "$GGUF"
cat docs/*.md > "$WORK/corpus.md"

peak() { sed -n 's/.*Maximum resident set size (kbytes): \([0-9]*\).*/\1/p' "$1" | awk '{printf "%.0f MB", $1/1024}'; }
wall() { sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): \(.*\)/\1/p' "$1"; }

# One optimizer step of one SEQ-token row (continued pretraining on packed text), LoRA r16 on all 7 projections.
log="$WORK/ytrainer-$SHAPE-$SEQ-$BUDGET.log"
/usr/bin/time -v "$YT" run --model "$GGUF" --data "$WORK/corpus.md" --set 'data.training_type="cpt"' \
    --max-seq-len "$SEQ" --lora-r 16 --lora-alpha 32 --max-steps 1 --tokens-per-step "$SEQ" \
    --set "train.micro_batch_tokens=$SEQ" --memory-budget "$BUDGET" --set eval.every_steps=0 \
    --set eval.max_samples=1 --save-every 0 --output-dir "$WORK/run-$SHAPE" --overwrite >"$log" 2>&1
echo "ytrainer  $SHAPE seq $SEQ budget $BUDGET: peak $(peak "$log"), wall $(wall "$log")"
grep -m1 "memory plan" "$log" || true

if [ "${TORCH:-0}" = 1 ]; then
    for dtype in f32 bf16; do
        log="$WORK/torch-$SHAPE-$SEQ-$dtype.log"
        /usr/bin/time -v "$PYTHON" benches/torch_baseline.py --shape "$SHAPE" --mode lora --rank 16 --batch 1 \
            --seq "$SEQ" --steps 1 --warmup 0 --dtype "$dtype" >"$log" 2>&1
        echo "torch+peft $SHAPE seq $SEQ $dtype: peak $(peak "$log"), wall $(wall "$log")"
        grep -m1 "^torch" "$log" || tail -3 "$log"
    done
fi
