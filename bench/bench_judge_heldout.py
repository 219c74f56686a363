"""Judges on held-out images of both renderers: our renders (train_judge.py's held-out scenes)
and held-out Blender i-CLEVR scenes (bench/render_blender.sh), 1-3 and 4-5 objects, the lab's
accuracy rule. Writes results/heldout-judges.json.

    python bench/bench_judge_heldout.py     # the shipped judge and weights/judge-blender
"""
import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataloader as dl  # noqa: E402
import train_judge  # noqa: E402
from evaluator import evaluation_model  # noqa: E402

ROOT = dl.ROOT
JUDGES = ["shipped=weights/judge", "blender=weights/judge-blender"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judges", nargs="+", default=JUDGES, help="NAME=PATH ...")
    ap.add_argument("--blender", type=Path, default=ROOT / "data" / "blender_judge_test")
    ap.add_argument("--val-scenes", type=int, default=1000,
                    help="our held-out renders (train_judge.py's --val-seed), x5 images")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "heldout-judges.json")
    args = ap.parse_args()
    device = dl.resolve_device(args.device)
    cfg = train_judge.Config()
    sets = {"ours": train_judge.render_split(args.val_scenes, cfg.val_seed, "SYN_judgeval_",
                                             device),
            "blender": train_judge.load_folder(args.blender, device)}
    rows = {}
    for item in args.judges:
        name, _, path = item.partition("=")
        judge = evaluation_model(dl.repo_path(path), device)
        rows[name] = {"checkpoint": dl._rel(judge.checkpoint)}
        for where, (x, y) in sets.items():
            rows[name].update(train_judge.metrics(judge, x, y, lambda ks, w=where: {
                f"{w} 1-3 objects": ks <= 3, f"{w} 4-5 objects": ks >= 4}))
        print(f"{name:8s} " + "  ".join(f"{k} {v['accuracy']:.4f}" for k, v in rows[name].items()
                                         if isinstance(v, dict)))
    dl.write_json(args.out, {"command": dl.command_line(), "device": platform.processor() or
                             str(device), "blender": dl._rel(args.blender),
                             "val_scenes": args.val_scenes, "judges": rows})
    print(f"wrote {dl._rel(args.out)}")


if __name__ == "__main__":
    dl.run_cli(main)
