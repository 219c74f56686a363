#!/bin/bash
cd /work/main
probe() {
  name=$1; steps=$2; shift 2
  .venv/bin/python train.py --run-name probe-$name --max-minutes 60 --device cpu --max-steps $steps --lr-decay-steps 4357 --save-every 100000 "$@" > /tmp/probes/$name.log 2>&1
  echo "$name: $(grep -o 'step [0-9]*/[0-9]* | loss [0-9.]* | lr [0-9.e-]*' /tmp/probes/$name.log | sed 's/step //; s/\/[0-9]* | loss / /; s/ | lr / @/' | tr '\n' ' ')" >> /tmp/probes/summary2.txt
  rm -rf runs/probe-$name
}
for s in 1 2 3 4; do probe s$s 400 --seed $s; done
