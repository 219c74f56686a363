"""Layouts drawn apart or as the training images have them: the judge's accuracy on validation
conditions (never the benchmark files) when the layout prior draws only training layouts whose
objects' outlines do not overlap (model.apart, draw_layouts(apart_only=True)), against any
training layout of the right size (what sample.py does).

    python bench/bench_apart.py                        # weights/ddpm, 384 conditions, 2 seeds

-> results/layout-apart-<device>.json
"""
import argparse
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataloader as dl  # noqa: E402
import sample  # noqa: E402
from evaluator import by_objects, evaluation_model, miss_kinds, per_image  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=sample.WEIGHTS_DIR)
    ap.add_argument("--conditions", type=int, default=384)
    ap.add_argument("--seeds", type=int, nargs="+", default=[10**6, 10**6 + 1])
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = dl.resolve_device(args.device)
    net, sched_cfg = sample.load_model(args.checkpoint, device)
    cfg = sample.scored_settings(args.checkpoint)
    judge = evaluation_model(device=device)
    conds = dl.validation_conditions(args.conditions)
    labels, order = dl.encode_batch(conds), dl.listed_order(conds)
    res = {"device": dl.device_tag(device), "command": dl.command_line(),
           "checkpoint": dl.portable_path(args.checkpoint),
           "weights_of": sample.sample_config(args.checkpoint).get("speedrun"),
           "conditions": args.conditions,
           "seeds": args.seeds, "guidance": cfg["guidance"], "modes": {}}
    for mode, apart_only in (("apart", True), ("any training layout", False)):
        rows, accs = [], []
        for seed in args.seeds:
            layouts = sample.prior_layouts(net, labels, seed, apart_only=apart_only, order=order)
            images = sample.generate(net, labels, layouts=layouts, seed=seed, **cfg,
                                     scheduler_config=sched_cfg, progress=False)
            scores = judge.scores(dl.as_png(images))
            accs.append(round(float(judge.compute_acc(scores, labels)), 4))
            rows += per_image(scores, labels)
        res["modes"][mode] = {"accuracy": accs, "by_objects": by_objects(rows),
                              "misses": miss_kinds(rows)}
        print(f"{mode}: accuracy {accs} | misses {res['modes'][mode]['misses']}", flush=True)
    out = dl.ROOT / "results" / f"layout-apart-{dl.device_tag(device)}.json"
    dl.write_json(out, res)
    print(f"wrote {dl._rel(out)}")


if __name__ == "__main__":
    dl.run_cli(main)
