"""estimate_layouts.py on Blender i-CLEVR renders (bench/render_blender.sh) against the true
positions Blender's camera gives (the set's layouts.json): within 1 / 2 / 4 px, by color and by
step, and every skipped image with its reason. Writes results/layout-estimate-blender.json.

    python bench/bench_blender_layouts.py                       # data/blender_iclevr, ~1 minute
    python bench/bench_blender_layouts.py --estimated runs/NAME/train_layouts.json
"""
import argparse
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataloader  # noqa: E402
import estimate_layouts  # noqa: E402
from bench_layout_estimate import errors  # noqa: E402
from dataloader import ROOT, load_image, load_json  # noqa: E402

RADII = (1, 2, 4)


def share_within(dist, r):
    """Share of objects placed within r px (skipped ones count as misses)."""
    return round(float(np.mean(np.nan_to_num(dist, nan=np.inf) <= r)), 4) if len(dist) else None


def table(dist, groups, names):
    """{group name: {"objects", "within_1px", ...}} of dist split by the group index."""
    return {name: {"objects": int((groups == g).sum()),
                   **{f"within_{r}px": share_within(dist[groups == g], r) for r in RADII}}
            for g, name in enumerate(names) if (groups == g).any()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", type=Path, default=ROOT / "data" / "blender_iclevr")
    ap.add_argument("--estimated", type=Path, default=None,
                    help="a layout file estimate_layouts.py wrote (e.g. the run's "
                         "train_layouts.json); default: estimate here")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "layout-estimate-blender.json")
    args = ap.parse_args()
    spec = dataloader.load_spec(args.data_root / "labels.json")
    truth = load_json(args.data_root / "layouts.json")["layouts"]
    t0 = time.perf_counter()
    if args.estimated:
        est_file = load_json(args.estimated)
        est, skipped = est_file["layouts"], est_file.get("skipped", {})
    else:
        images = torch.stack([load_image(args.data_root / n) for n in spec])
        est, skipped, _ = estimate_layouts.estimate(images, spec)
    seconds = time.perf_counter() - t0
    truth = {n: truth[n] for n in spec}
    dist, size, color = errors(est, truth).T
    step = np.array([k for objs in truth.values() for k in range(len(objs))])
    placed = ~np.isnan(dist)
    result = {
        "command": dataloader.command_line(), "device": platform.processor() or "cpu",
        "data_root": dataloader._rel(args.data_root),
        "estimated": dataloader._rel(args.estimated) if args.estimated else "estimated here",
        "images": len(spec), "objects": len(dist), "images_skipped": len(skipped),
        "skip_reasons": dict(Counter(skipped.values())), "skipped": skipped,
        **{f"within_{r}px": share_within(dist, r) for r in RADII},
        "mean_error_px": round(float(dist[placed].mean()), 3),
        "max_error_px": round(float(dist[placed].max()), 3),
        "size_error": round(float(size[placed].mean()), 3),
        "by_color": table(dist, color.astype(int), dataloader.COLORS),
        "by_step": table(dist, step, [f"added at step {k + 1}" for k in range(5)]),
        "seconds": round(seconds, 1)}
    print(f"{result['images']} images, {result['objects']} objects, {len(skipped)} skipped: "
          + " | ".join(f"<= {r} px {result[f'within_{r}px']:.4f}" for r in RADII)
          + f" | mean {result['mean_error_px']:.2f} px, max {result['max_error_px']:.2f} px")
    for what in ("by_color", "by_step"):
        print(f"{what}, within 2 px: " + ", ".join(f"{k} {v['within_2px']:.3f}"
                                                   for k, v in result[what].items()))
    for reason, n in result["skip_reasons"].items():
        print(f"skipped {n}: {reason}")
    dataloader.write_json(args.out, result)
    print(f"wrote {dataloader._rel(args.out)}")


if __name__ == "__main__":
    dataloader.run_cli(main)
