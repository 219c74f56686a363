#!/usr/bin/env bash
# Ablations of the CPU speedrun at the CPU's own budget, on a GPU: each entry replays the CPU
# recipe (`speedrun.py --recipe cpu`) for STEPS optimizer steps, the steps a 40-minute CPU
# speedrun makes, and all entries run side by side on the one GPU (each is bound by kernel
# launches, not by the GPU). The guidance is swept on VAL validation conditions; the benchmark
# files are scored too, but settings are chosen on the validation sweep only.
#   ABLATIONS="name:flags;name:flags"  (default: below)   STEPS (1806)   VAL (512)   LIMIT (420 s
#   of training and scoring per entry, then SIGTERM)
# Writes results/speedrun-<gpu>-cpubudget-<name>.json per entry and packs results/ into
# $OUT/pack.tgz (unpack here with  tar xzf pack.tgz). REHEARSE=1: tiny sizes on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
if [ -d .whl ] && ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
ABLATIONS=${ABLATIONS:-"base:;shape:--preset ground-shape"}
STEPS=${STEPS:-1806}
VAL=${VAL:-512}
DEVICE=cuda
EXTRA=(--guidance-grid 1 1.25 1.5 2 3 --seeds 0 1 --eval-every 600 --eval-conditions 128)
if [ "${REHEARSE:-0}" = 1 ]; then
  DEVICE=cpu STEPS=4 VAL=8
  EXTRA=(--guidance-grid 1 2 --seeds 0 --eval-every 2 --eval-conditions 4 --eval-steps 2
         --batch-size 4 --steps 3)
fi
pack() { tar czf "$OUT/pack.tgz" results/speedrun-*-cpubudget-* 2>/dev/null; }
trap pack EXIT

# the training set and its layouts, once, before the runs read them side by side
$PY -c "import render, dataloader as dl; p = dl.repo_path('train.json'); s = dl.load_spec(p); \
r = dl.repo_path('data/iclevr_syn'); render.ensure_images(r, s, p, device='$DEVICE'); \
render.ensure_layouts(s, p, r, device='$DEVICE')" 2>&1 | tail -1
IFS=';' read -ra entries <<< "$ABLATIONS"
for entry in "${entries[@]}"; do
  name=${entry%%:*} flags=${entry#*:}
  # shellcheck disable=SC2086  # flags are words
  # a run past LIMIT seconds gets SIGTERM: train.py saves and stops, the scoring still runs
  timeout --kill-after=150 "${LIMIT:-420}" $PY speedrun.py --recipe cpu --device "$DEVICE" --minutes 100000 --max-steps "$STEPS" \
    --tag="-cpubudget-$name" --val-conditions "$VAL" --save-every 100000 "${EXTRA[@]}" \
    $flags > "$OUT/$name.log" 2>&1 &
done
wait
for entry in "${entries[@]}"; do
  name=${entry%%:*}
  echo "=== $name"; grep -E "^(trained|validation guidance|seed |eval step)" "$OUT/$name.log" | tail -12
done
