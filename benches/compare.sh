#!/usr/bin/env bash
# Side-by-side CPU throughput: `ytrainer bench` vs PyTorch + PEFT (benches/torch_baseline.py), alternating runs in
# one session so both see the same machine state. Prints one JSON line per run; summarise the ratios per round
# with benches/summarize.py.
#
#   cargo build --release -p ytrainer-cli
#   python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers peft
#   bash benches/compare.sh [ROUNDS] [STEPS] > /tmp/compare.jsonl
#   python3 benches/summarize.py /tmp/compare.jsonl
set -euo pipefail
ROUNDS=${1:-2}
STEPS=${2:-8}
PY=${TORCH_PYTHON:-/tmp/torchenv/bin/python}
YT=${YTRAINER:-target/release/ytrainer}
# GC=1: both sides with gradient checkpointing (activation recomputation).
GCFLAG=""
if [ "${GC:-0}" = "1" ]; then GCFLAG="--gradient-checkpointing"; fi
cd "$(dirname "$0")/.."
for round in $(seq 1 "$ROUNDS"); do
  for shape in tiny small; do
    for mode in lora full; do
      "$PY" benches/torch_baseline.py --shape "$shape" --mode "$mode" --steps "$STEPS" $GCFLAG --format json 2>/dev/null
      "$YT" bench --shape "$shape" --mode "$mode" --steps "$STEPS" $GCFLAG --format json | sed 's/^{/{"impl":"ytrainer",/'
    done
  done
  "$YT" bench --shape tiny --mode lora --steps "$STEPS" --loss nlirg --format json | sed 's/^{/{"impl":"ytrainer",/'
  # Windowed N=10: the seed's loop in PyTorch, then ytrainer's windows (its line also times the seed's way
  # through ytrainer's own kernels).
  "$PY" benches/torch_baseline.py --shape tiny --mode lora --windowed 10 --rounds 1 --format json 2>/dev/null
  "$YT" bench --shape tiny --mode lora --windowed 10 --rounds 1 --format json | sed 's/^{/{"impl":"ytrainer",/'
done
