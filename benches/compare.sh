#!/usr/bin/env bash
# Side-by-side CPU throughput: `ytrainer bench` vs PyTorch + PEFT (benches/torch_baseline.py), alternating runs in
# one session so both see the same machine state. Prints one JSON line per run; summarise with the python snippet
# at the end (medians per shape/mode/implementation).
#
#   cargo build --release -p ytrainer-cli
#   python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers peft
#   bash benches/compare.sh [ROUNDS] [STEPS] > /tmp/compare.jsonl
set -euo pipefail
ROUNDS=${1:-2}
STEPS=${2:-8}
PY=${TORCH_PYTHON:-/tmp/torchenv/bin/python}
YT=${YTRAINER:-target/release/ytrainer}
cd "$(dirname "$0")/.."
for round in $(seq 1 "$ROUNDS"); do
  for shape in tiny small; do
    for mode in lora full; do
      "$PY" benches/torch_baseline.py --shape "$shape" --mode "$mode" --steps "$STEPS" --format json 2>/dev/null
      "$YT" bench --shape "$shape" --mode "$mode" --steps "$STEPS" --format json | sed 's/^{/{"impl":"ytrainer",/'
    done
  done
  "$YT" bench --shape tiny --mode lora --steps "$STEPS" --loss nlirg --format json | sed 's/^{/{"impl":"ytrainer",/'
done
