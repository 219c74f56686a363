#!/usr/bin/env bash
# Blender i-CLEVR: the sets issue 22's measurements use, rendered with real Blender over CLEVR's
# own assets (../shared/blender/render_iclevr.py; set-up in its README: bpy in a venv of its own).
# A measuring instrument: nothing a user runs needs bpy or ../shared.
#   data/blender_iclevr/        2,000 scenes x 3 steps (1-3 objects): the lab-style training set
#   data/blender_judge_test/    300 scenes x 5 steps (1-5 objects): held out, for the judges
#   data/blender_judge_train/   JUDGE_SCENES scenes x 5 steps (1-5 objects): judge training
#   tests/fixtures/blender/     6 scenes x 3 steps at the lab's 320x240 and 128 spp (committed)
# Size and samples per pixel: results/blender-render-tradeoff.json (bench/bench_blender_render.py);
# docs/data.md says why. Every set is resumable (--resume): run the script again after a stop.
#    bash bench/render_blender.sh                    # ~50 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
BPY=${BPY:-$HOME/.cache/bpy-venv/bin/python}
BLENDER=${BLENDER:-../shared/blender}
SIZE=${SIZE:-"--width 128 --height 96 --samples 16"}
JUDGE_SCENES=${JUDGE_SCENES:-400}
render() {  # out prefix objects scenes seed [size flags]
  local out=$1 prefix=$2 objects=$3 scenes=$4 seed=$5; shift 5
  "$BPY" "$BLENDER/render_iclevr.py" --assets "$BLENDER/assets" --out "$out" --prefix "$prefix" \
      --objects "$objects" --scenes "$scenes" --seed "$seed" --threads 2 --positions --resume "$@"
}
render data/blender_iclevr BLENDER_train 3 2000 1 $SIZE
render data/blender_judge_test BLENDER_judgetest 5 300 2 $SIZE
render tests/fixtures/blender BLENDER_fixture 3 6 4 --width 320 --height 240 --samples 128
render data/blender_judge_train BLENDER_judgetrain 5 "$JUDGE_SCENES" 3 $SIZE
