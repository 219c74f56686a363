"""Where classifier-free guidance helps: one checkpoint sampled on random validation conditions
(never the benchmark files) with guidance at every step, and only inside a range of timesteps
(the "guidance interval" of Kynkaanniemi et al. 2024), scored by the judge.

    python bench/bench_guidance.py          # shipped weights, 128 conditions: ~50 min on 2 CPUs
    python bench/bench_guidance.py --checkpoint runs/NAME --device cuda

-> results/guidance-<device>.json. Besides the lab's accuracy it counts the images in which the
judge finds more or fewer objects than asked for (a wrong layout), which is what the strong
guidance of the first, noisiest steps fixes. All settings share the seed: image i starts from
the same noise in each, so the comparison is paired.
"""
import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import sample  # noqa: E402
from dataloader import (ROOT, DataError, _rel, command_line, device_tag,  # noqa: E402
                        encode_batch, listed_order, resolve_device, run_cli, validation_conditions,
                        write_json)
from evaluator import (by_objects, by_objects_text, compute_acc, evaluation_model,  # noqa: E402
                       miss_kinds, per_image)
from model import resolve_checkpoint  # noqa: E402

# name: (guidance scale, (lowest, highest) training timestep that is guided, None = all). The
# 25 dpm++ steps run t = 999, 959, ..., 39: 880 and 160 bound the sigma range 0.28-5.4 that
# EDM2 guides (sigma = sqrt((1 - alphabar) / alphabar) of the cosine schedule); 519/520 splits
# the steps in half.
SETTINGS = {"w3": (3.0, None), "w5": (5.0, None), "w5 mid": (5.0, (160, 880)),
            "w8 mid": (8.0, (160, 880)), "w5 high noise": (5.0, (520, 999)),
            "w5 low noise": (5.0, (0, 519))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=sample.WEIGHTS_DIR,
                    help="checkpoint-STEP, run or weights folder (default: the shipped weights)")
    ap.add_argument("--conditions", type=int, default=128, help="random 1-3-object conditions")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.conditions < 1:
        raise DataError(f"--conditions: expected a positive number, got {args.conditions}")
    device = resolve_device(args.device)
    ckpt = resolve_checkpoint(args.checkpoint)
    model, sched_cfg = sample.load_model(ckpt, device)
    judge = evaluation_model(device=device)
    conds = validation_conditions(args.conditions)
    labels = encode_batch(conds, "validation conditions")
    out = ROOT / "results" / f"guidance-{device_tag(device)}.json"
    res = {"bench": "guidance", "checkpoint": _rel(ckpt),
           "weights_of": sample.sample_config(ckpt).get("speedrun"), "device": str(device),
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "command": command_line(), "sampler": "dpm++", "steps": 25, "seed": args.seed,
           "conditions": args.conditions, "objects": int(labels.sum()), "settings": {}}
    print(f"{'setting':16s} {'guided t':>10s} {'accuracy':>9s} {'by objects':>24s} "
          f"{'too many':>9s} {'too few':>8s} {'seconds':>8s}")
    for name in args.settings:
        w, interval = SETTINGS[name]
        t0 = time.perf_counter()
        images = sample.generate(model, labels, sampler="dpm++", steps=25, guidance=w,
                                 guidance_interval=interval, seed=args.seed,
                                 order=listed_order(conds), scheduler_config=sched_cfg,
                                 progress=False)
        seconds = time.perf_counter() - t0
        scores = judge.scores(images)  # once: the lab's accuracy and the misses
        rows = per_image(scores, labels)
        acc, m, by_k = compute_acc(scores, labels), miss_kinds(rows), by_objects(rows)
        guided = "all" if interval is None else f"{interval[0]}-{interval[1]}"
        res["settings"][name] = {"guidance": w, "guided_timesteps": interval,
                                 "accuracy": round(acc, 4), "misses": m, "by_objects": by_k,
                                 "seconds": round(seconds, 1)}
        print(f"{name:16s} {guided:>10s} {acc:9.4f} {by_objects_text(by_k):>24s} "
              f"{m['more_objects']:9d} {m['fewer_objects']:8d} {seconds:8.1f}", flush=True)
        write_json(out, res)  # after every setting: a run cut short keeps what it measured
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    run_cli(main)
