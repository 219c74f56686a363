#!/usr/bin/env bash
# Grounded against label-only conditioning on this CPU, side by side: the same CPU speedrun
# recipe (speedrun.py CPU_RECIPE) and training budget for
#   ground      the grounded model (spatial label maps + label vector, layout prior)
#   xfast       the best label-only preset that fits a CPU (cross-attention to label tokens at
#               4x4 space-to-depth, 3.3 GFLOP/img)
#   concat-cpu  the seed report's constant label map, on ground's UNet
# -> results/speedrun-cpu-compare-<preset>.json (bench/tables.py prints them side by side).
#    MINUTES=15 bash bench/cpu_compare.sh          (default 10 minutes each)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MINUTES=${MINUTES:-10}
for preset in ${PRESETS:-ground xfast concat-cpu}; do
  # guidance from two scales on 64 validation conditions: label-only models want more than
  # the grounded one
  "$PY" speedrun.py --device cpu --minutes "$MINUTES" --tag="-compare-$preset" \
      --guidance-grid 2 4 --val-conditions 64 --eval-every 100000 --preset "$preset"
done
