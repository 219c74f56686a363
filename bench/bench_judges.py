"""One diffusion checkpoint scored by several judges: both benchmark files, 5 seeds, the lab's
accuracy rule, the same images for every judge. For models trained on other images than our
renders (Blender i-CLEVR), the guidance scale is chosen on validation conditions with the judge
--guidance-judge names, and FD is measured against a folder of training images instead of
evaluate.py's renders. Writes results/judges-<tag>.json and seed 0's PNGs and grids under
results/judges-<tag>/.

    python bench/bench_judges.py --tag synthetic --fd-reference data/iclevr_syn --fd-spec train.json
    python bench/bench_judges.py --checkpoint runs/blender-40min --tag blender \\
        --guidance-judge blender --fd-reference data/blender_iclevr
"""
import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataloader as dl  # noqa: E402
import sample  # noqa: E402
import speedrun  # noqa: E402
import evaluate  # noqa: E402
from evaluator import evaluation_model, miss_kinds, per_image  # noqa: E402
from model import WEIGHTS_DIR, resolve_checkpoint  # noqa: E402

ROOT = dl.ROOT
JUDGES = ["shipped=weights/judge", "blender=weights/judge-blender"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--judges", nargs="+", default=JUDGES, help="NAME=PATH ...")
    ap.add_argument("--guidance", type=float, default=None,
                    help="default: the checkpoint's sample_config.json, else chosen on "
                         "validation conditions")
    ap.add_argument("--guidance-judge", default="shipped", help="NAME of the judge choosing it")
    ap.add_argument("--guidance-grid", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--val-conditions", type=int, default=96)
    ap.add_argument("--fd-reference", type=Path, default=None,
                    help="folder of training images for the FD")
    ap.add_argument("--fd-spec", type=Path, default=None,
                    help="their spec (default: the folder's train.json, else labels.json)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    names = [item.partition("=")[0] for item in args.judges]
    if args.guidance_judge not in names:
        raise dl.DataError(f"--guidance-judge: no judge named {args.guidance_judge!r} in "
                           f"--judges (expected one of {', '.join(names)})")
    device = dl.resolve_device(args.device)
    judges = {}
    for item in args.judges:
        name, _, path = item.partition("=")
        judges[name] = evaluation_model(dl.repo_path(path), device)
    ckpt = resolve_checkpoint(args.checkpoint)
    settings = sample.scored_settings(ckpt)
    gen = speedrun.Sampler(ckpt, device, settings["sampler"], settings["steps"])
    result = {"command": dl.command_line(), "device": platform.processor() or str(device),
              "versions": speedrun.versions(), "checkpoint": dl._rel(ckpt),
              "judges": {k: dl._rel(j.checkpoint) for k, j in judges.items()},
              "sampler": settings["sampler"], "steps": settings["steps"]}
    out = ROOT / "results" / f"judges-{args.tag}.json"
    guidance = args.guidance or sample.sample_config(ckpt).get("guidance")
    if guidance is None:
        guidance, part = speedrun.guidance_stage(gen, judges[args.guidance_judge],
                                                 args.guidance_grid, args.val_conditions,
                                                 fd_tie_break=args.fd_reference is None)
        result.update(part, guidance_judge=args.guidance_judge)
    result["guidance"] = guidance
    files = {p.name: dl.load_conditions(p) for p in dl.TEST_JSONS}
    acc = {j: {f: [] for f in files} for j in judges}
    rows = {j: {f: [] for f in files} for j in judges}
    generated = []
    for seed in args.seeds:
        for f, conds in files.items():
            images, labels, _ = gen(conds, seed, guidance)
            generated.append(images)
            if seed == args.seeds[0]:
                for i, img in enumerate(dl.to_uint8(images)):
                    sample.save_png(img, out.with_suffix("") / Path(f).stem / f"{i}.png")
                sample.save_grid(images, out.with_suffix("") / f"{Path(f).stem}_grid.png")
            for j, judge in judges.items():
                scores = judge.scores(images)
                acc[j][f].append(round(judge.compute_acc(scores, labels), 4))
                rows[j][f] += per_image(scores, labels)
        print(f"seed {seed}: " + " | ".join(
            f"{j} " + " ".join(f"{v[-1]:.4f}" for v in acc[j].values()) for j in judges))
    result["by_judge"] = {j: {
        "accuracy": acc[j],
        "accuracy_mean": {f: round(float(np.mean(v)), 4) for f, v in acc[j].items()},
        "accuracy_std": {f: round(float(np.std(v)), 4) for f, v in acc[j].items()},
        "misses_all_seeds": {f: miss_kinds(r) for f, r in rows[j].items()}} for j in judges}
    if args.fd_reference:
        fd, floor = evaluate.fd_against_folder(judges[args.guidance_judge],
                                               torch.cat(generated),
                                               *evaluate.fd_reference(args.fd_reference,
                                                                      args.fd_spec))
        result["fd_training_images"] = {"judge": args.guidance_judge, "fd": round(fd, 2),
                                        "floor": round(floor, 2),
                                        "reference": dl._rel(args.fd_reference)}
        print(f"FD against {dl._rel(args.fd_reference)} ({args.guidance_judge}'s features): "
              f"{fd} (two sets of its own images: {floor})")
    for j, r in result["by_judge"].items():
        print(f"{j:10s} " + "  ".join(f"{f} {r['accuracy_mean'][f]:.4f} ± "
                                      f"{r['accuracy_std'][f]:.4f}" for f in files))
    dl.write_json(out, result)
    print(f"wrote {dl._rel(out)}")


if __name__ == "__main__":
    dl.run_cli(main)
