"""Layout fidelity of a grounded model: how often each object appears where it was placed.

    python bench/bench_layout_fidelity.py                 # shipped weights, 128 conditions
    python bench/bench_layout_fidelity.py --checkpoint runs/NAME --conditions 64

Random validation conditions (never the benchmark files) are rendered, and their true layouts
(render.spec_layouts) become the placements the model is asked for. An object counts as placed
when its ellipse in the generated image holds foreground whose mean color is nearest to its own
color among the colors of the rendered objects (evaluate.layout_fidelity). The renders
themselves are the ceiling, the same images scored against other scenes' layouts the chance
level. The judge's accuracy comes alongside, and the Frechet distance to other renders of the
conditions (evaluate.fd_against_renders; the renders' own is the floor), for placed layouts,
placed layouts whose labels moved one object along, and layouts drawn from the model's prior
with the labels in the conditions' order and in random order: where the FD comes from.
-> results/layout-fidelity-<device>.json
"""
import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import render  # noqa: E402
import sample  # noqa: E402
from dataloader import (ROOT, DataError, _rel, command_line, device_tag,  # noqa: E402
                        encode_batch, layout_tensor, listed_order, resolve_device, run_cli,
                        to_float, to_uint8, validation_conditions, write_json)
from evaluate import color_palette, fd_against_renders, layout_fidelity  # noqa: E402
from evaluator import evaluation_model  # noqa: E402
from model import resolve_checkpoint  # noqa: E402


def labels_moved_along(layouts):
    """Each layout with its labels moved one object along (the last label to the first
    object's position, the first to the second's, ...): the same positions in another order."""
    out = layouts.clone()
    for lay in out:
        k = int((lay[:, 0] >= 0).sum())
        lay[:k, 0] = lay[:k, 0].roll(1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=sample.WEIGHTS_DIR,
                    help="a grounded model's checkpoint, run or weights folder")
    ap.add_argument("--conditions", type=int, default=128, help="random 1-3-object conditions")
    ap.add_argument("--guidance", type=float, default=None,
                    help="default: the checkpoint's sample_config.json, else 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: results/layout-fidelity-<device>.json")
    args = ap.parse_args()
    if args.conditions < 2:
        raise DataError(f"--conditions: expected at least 2, got {args.conditions}")
    device = resolve_device(args.device)
    ckpt = resolve_checkpoint(args.checkpoint)
    model, sched_cfg = sample.load_model(ckpt, device)
    if not sample.is_grounded(model):
        raise DataError(f"{_rel(ckpt)}: not a grounded model ({model.config.conditioning!r})")
    guidance = args.guidance or sample.sample_config(ckpt).get("guidance", sample.GUIDANCE)
    judge = evaluation_model(device=device)

    conds = validation_conditions(args.conditions)
    spec = {f"fidelity-{i}": c for i, c in enumerate(conds)}
    renders = render.render_tensor(spec, seed=args.seed, device=str(device)).cpu()
    placed = layout_tensor(render.spec_layouts(spec, args.seed), spec)
    palette = color_palette(renders, placed)
    labels = encode_batch(conds, "validation conditions")
    kw = dict(sampler="dpm++", steps=25, guidance=guidance, seed=args.seed,
              scheduler_config=sched_cfg, progress=False)
    t0 = time.time()
    at_placed = to_uint8(sample.generate(model, labels, layouts=placed, **kw))
    seconds = time.time() - t0
    moved = labels_moved_along(placed)
    prior = sample.prior_layouts(model, labels, args.seed, order=listed_order(conds))
    unordered = sample.prior_layouts(model, labels, args.seed)
    rows = {
        "renders (ceiling)": (renders, placed),
        "renders vs other scenes' layouts (chance)": (renders, placed.roll(1, 0)),
        "generated at the placed layouts": (at_placed, placed),
        "generated at the placed layouts, labels moved one object along":
            (to_uint8(sample.generate(model, labels, layouts=moved, **kw)), moved),
        "generated from the prior's layouts (the conditions' order)":
            (to_uint8(sample.generate(model, labels, layouts=prior, **kw)), prior),
        "generated from the prior's layouts, labels in random order":
            (to_uint8(sample.generate(model, labels, layouts=unordered, **kw)), unordered),
    }
    res = {"bench": "layout_fidelity", "checkpoint": _rel(ckpt),
           "weights_of": sample.sample_config(ckpt).get("speedrun"), "device": str(device),
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "command": command_line(), "sampler": "dpm++", "steps": 25, "guidance": guidance,
           "seed": args.seed, "conditions": len(conds), "objects": int(labels.sum()),
           "sampling_seconds_placed": round(seconds, 2), "rows": {}}
    print("| images | layout fidelity | judge accuracy | FD |\n|---|---|---|---|")
    for name, (images, layouts) in rows.items():
        fid = layout_fidelity(images, layouts, palette)
        acc = judge.eval(to_float(images), labels)
        fd = fd_against_renders(judge, to_float(images), conds)
        res["rows"][name] = {"layout_fidelity": round(fid, 4), "judge_accuracy": round(acc, 4),
                             "fd": round(fd, 3)}
        print(f"| {name} | {fid:.4f} | {acc:.4f} | {fd:.1f} |")
    out = args.out or ROOT / "results" / f"layout-fidelity-{device_tag(device)}.json"
    write_json(out, res)
    print(f"wrote {_rel(out)}")


if __name__ == "__main__":
    run_cli(main)
