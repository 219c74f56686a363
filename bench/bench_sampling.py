"""Sampling settings of one checkpoint side by side on validation conditions (never the
benchmark files): the lab's accuracy and the Frechet distance to renders of the same
conditions, against that of as many other renders (the floor). Training is not touched: this is
what the sampler alone can still buy.

    python bench/bench_sampling.py --raw-checkpoint runs/speedrun-cpu-shape-40min   # ~20 min
    python bench/bench_sampling.py --settings "shipped" "w1.0" --conditions 16 --seeds 1

-> results/sampling-<device>.json. Every setting samples the same conditions from the same
seeds (image i starts from the same noise in each), so the comparison is paired; the seeds
(10**6 + s) are the speedrun's validation seeds, disjoint from the benchmark's 0-4.
"""
import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import evaluate  # noqa: E402
import sample  # noqa: E402
from dataloader import (ROOT, DataError, _rel, command_line, device_tag, host,  # noqa: E402
                        as_png, encode_batch, listed_order, resolve_device, run_cli,
                        validation_conditions, write_json)
from evaluator import by_objects, compute_acc, evaluation_model, miss_kinds, per_image  # noqa: E402
from model import resolve_checkpoint  # noqa: E402

VAL_SEED = 10**6
# name: what differs from the checkpoint's scored settings (sample_config.json): sampler,
# steps, guidance, guidance interval (lowest, highest guided training timestep), precision,
# ema=False for the raw (not averaged) weights, order "random" for layouts that give the
# prior's positions to the labels in random order (not in the listed order: listed_order).
SETTINGS = {
    "shipped": {},
    "random order": {"order": "random"},
    "w1.0": {"guidance": 1.0},
    "w1.5": {"guidance": 1.5},
    "w2.0": {"guidance": 2.0},
    "w3.0 mid": {"guidance": 3.0, "interval": (160, 880)},
    "dpm++sde": {"sampler": "dpm++sde"},
    "unipc": {"sampler": "unipc"},
    "ddim": {"sampler": "ddim"},
    "15 steps": {"steps": 15},
    "fp32": {"precision": "fp32"},
    "raw weights": {"ema": False},
}


def run_setting(models, judge, conds, seeds, base, change):
    """Images of every seed for one setting -> (images, labels, results row)."""
    s = {**base, "ema": True, "interval": None, "precision": "auto", "order": "listed",
         **change}
    model, sched_cfg = models[s["ema"]]
    labels = encode_batch(conds, "validation conditions")
    t0, images = time.perf_counter(), []
    for seed in seeds:
        out = sample.generate(model, labels, sampler=s["sampler"], steps=s["steps"],
                              guidance=s["guidance"], guidance_interval=s["interval"],
                              precision=s["precision"],
                              order=listed_order(conds) if s["order"] == "listed" else None,
                              seed=VAL_SEED + seed, scheduler_config=sched_cfg, progress=False)
        images.append(as_png(out))
    seconds = time.perf_counter() - t0
    images, labels = torch.cat(images), labels.repeat(len(seeds), 1)
    scores = judge.scores(images)
    rows = per_image(scores, labels)
    row = {**s, "accuracy": round(compute_acc(scores, labels), 4), "misses": miss_kinds(rows),
           "by_objects": by_objects(rows), "seconds_per_image": round(seconds / len(images), 3)}
    return images, row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=sample.WEIGHTS_DIR,
                    help="checkpoint-STEP, run or weights folder (default: the shipped weights)")
    ap.add_argument("--conditions", type=int, default=64, help="random 1-3-object conditions")
    ap.add_argument("--seeds", type=int, default=3, help="images per condition")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--raw-checkpoint", type=Path, default=None,
                    help="training checkpoint (runs/NAME[/checkpoint-STEP]) of the same weights "
                         "whose raw weights 'raw weights' samples (a weights folder has only "
                         "the EMA); without it that setting is skipped")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: results/sampling-<device>.json)")
    args = ap.parse_args()
    if args.conditions < 1 or args.seeds < 1:
        raise DataError(f"--conditions and --seeds: expected positive numbers, got "
                        f"{args.conditions} and {args.seeds}")
    device = resolve_device(args.device)
    ckpt = resolve_checkpoint(args.checkpoint)
    models = {True: sample.load_model(ckpt, device)}
    if args.raw_checkpoint:
        models[False] = sample.load_model(resolve_checkpoint(args.raw_checkpoint), device,
                                          ema=False)
    names = [n for n in args.settings if SETTINGS[n].get("ema", True) in models]
    if len(names) < len(args.settings):
        print("skipped 'raw weights': it needs --raw-checkpoint")
    judge = evaluation_model(device=device)
    base = sample.scored_settings(ckpt)
    conds = validation_conditions(args.conditions)
    seeds = list(range(args.seeds))
    out = args.out or ROOT / "results" / f"sampling-{device_tag(device)}.json"
    res = {"bench": "sampling", "checkpoint": _rel(ckpt),
           "weights_of": sample.sample_config(ckpt).get("speedrun"), "device": str(device),
           "host": host(device),
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "command": command_line(), "scored_settings": base,
           "raw_checkpoint": _rel(args.raw_checkpoint) if args.raw_checkpoint else None, "conditions": args.conditions,
           "seeds": [VAL_SEED + s for s in seeds],
           "fd_floor": round(evaluate.fd_floor(judge, conds, len(seeds)), 3), "settings": {}}
    print(f"FD floor ({len(conds) * len(seeds)} renders): {res['fd_floor']}")
    print(f"{'setting':12s} {'sampler':>9s} {'steps':>5s} {'w':>5s} {'accuracy':>9s} "
          f"{'FD':>7s} {'s/img':>6s}")
    for name in names:
        images, row = run_setting(models, judge, conds, seeds, base, SETTINGS[name])
        row["fd"] = round(evaluate.fd_against_renders(judge, images, conds), 3)
        res["settings"][name] = row
        print(f"{name:12s} {row['sampler']:>9s} {row['steps']:5d} {row['guidance']:5.2f} "
              f"{row['accuracy']:9.4f} {row['fd']:7.2f} {row['seconds_per_image']:6.3f}",
              flush=True)
        write_json(out, res)  # after every setting: a run cut short keeps what it measured
    print(f"wrote {_rel(out)}")


if __name__ == "__main__":
    run_cli(main)
