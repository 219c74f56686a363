#!/usr/bin/env bash
# The judges of issue 22, trained on this CPU from the Blender sets of bench/render_blender.sh:
#   mixed    the shipped judge fine-tuned on our renders plus Blender renders (1-5 objects);
#            it won, and its files are the shipped weights/judge since
#   blender  a judge trained on Blender renders only, from scratch, as the lab's checkpoint was:
#            a yardstick for what a lab user's checkpoint.pth would say
# Fixed steps (not a time budget), so the result does not depend on what else the CPU runs.
# Then both judges and the shipped one on held-out scenes of both renderers.
#    bash bench/judges_blender.sh              # ~25 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BLENDER="data/blender_iclevr data/blender_judge_train"
COMMON=(--device cpu --held-out data/blender_judge_test --val-scenes 1000 --batch-size 128
        --max-minutes 120 --deadline-minutes 0 --log-every 50)
"$PY" train_judge.py "${COMMON[@]}" --init weights/judge --train-scenes 2000 --data $BLENDER \
    --steps "${MIXED_STEPS:-600}" --lr 5e-4 --out weights/judge-mixed \
    --results results/judge-mixed-cpu.json --log runs/judge-mixed/log.jsonl
"$PY" train_judge.py "${COMMON[@]}" --train-scenes 0 --data $BLENDER \
    --steps "${BLENDER_STEPS:-1000}" --lr 2e-3 --out weights/judge-blender \
    --results results/judge-blender-cpu.json --log runs/judge-blender/log.jsonl
"$PY" bench/bench_judge_heldout.py
