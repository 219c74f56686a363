#!/bin/bash
cd /work/main
probe() {
  name=$1; steps=$2; shift 2
  .venv/bin/python train.py --run-name probe-$name --max-minutes 60 --device cpu --seed 1 --max-steps 4357 --eval-every 1500 "$@" > /tmp/probes/$name.log 2>&1 &
  pid=$!
  while kill -0 $pid 2>/dev/null; do
    if grep -q "step $steps/" /tmp/probes/$name.log; then kill -9 $pid; fi
    sleep 5
  done
  echo "$name: $(grep -o 'step [0-9]*/[0-9]* | loss [0-9.]* | lr [0-9.e-]*' /tmp/probes/$name.log | sed 's/step //; s/\/[0-9]* | loss / /; s/ | lr / @/' | tr '\n' ' ') $(grep -o 'error: .*' /tmp/probes/$name.log)" >> /tmp/probes/mitigations.txt
  rm -rf runs/probe-$name
}
probe warmup500 700 --warmup-steps 500
probe lr1e-3 400 --lr 1e-3
