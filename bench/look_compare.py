"""Compare the renderer's look with the reference Blender renders, by eye and by numbers.

Writes docs/look_compare.png: the reference contact sheet (6 scenes x 5 steps at 64x64, as the
lab's loaders see them) next to render.py's images of the same labels in the same layout,
upscaled; and prints tone statistics (backdrop regions, object colors, object size and position)
for both. The reference folder is never copied into the repository.

    python bench/look_compare.py [--look ../shared/look] [--seeds 0 1 2]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataloader  # noqa: E402
import render  # noqa: E402

# Backdrop regions at 64x64 (rows, cols), named after iclevr-facts.md section 4.
REGIONS = {"wall (top third)": (slice(0, 21), slice(0, 64)),
           "pool behind objects": (slice(22, 30), slice(20, 44)),
           "mid-left": (slice(24, 40), slice(0, 12)),
           "bottom": (slice(52, 64), slice(0, 64)),
           "bottom-right": (slice(48, 64), slice(44, 64))}


def hue(rgb):
    """Hue angle in degrees of (..., 3) colors (mixing with the gray backdrop keeps it)."""
    r, g, b = np.moveaxis(np.asarray(rgb, float), -1, 0)
    return np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360


HUES = hue(render.ALBEDO)


def find_objects(img):
    """Object blobs of one uint8 (64, 64, 3) image: pixels far from a median-filtered
    background -> [(color name, pixel colors (n, 3), centroid (x, y), width, height)]."""
    img = img.astype(float)
    bg = ndimage.median_filter(img, size=(15, 15, 1), mode="nearest")
    mask = np.abs(img - bg).sum(-1) > 36
    blobs, n = ndimage.label(mask)
    out = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(blobs == i)
        if len(xs) < 4:
            continue
        px = img[ys, xs]
        med = np.median(px, 0)
        if med.max() - med.min() < 20:
            if med.mean() > np.median(bg[ys, xs]).mean():
                continue  # a light streak of the backdrop, not an object
            color = "gray"
        else:
            dist = np.abs((HUES[1:] - hue(med) + 180) % 360 - 180)  # nearest hue, not gray
            color = dataloader.COLORS[int(dist.argmin()) + 1]
        out.append((color, px, (xs.mean(), ys.mean()), np.ptp(xs) + 1, np.ptp(ys) + 1))
    return out


def stats(images, names, labels):
    """Tone, color, size and position statistics of uint8 (N, 64, 64, 3) images."""
    res = {}
    for region, (rows, cols) in REGIONS.items():
        res[region] = np.median(images[:, rows, cols].reshape(-1, 3), 0)
    by_color, spheres, centres, first = {}, [], [], []
    for img, name in zip(images, names):
        objs = find_objects(img)
        for color, px, centre, w, h in objs:
            by_color.setdefault(color, []).append(px)
            centres.append(centre)
            if f"{color} sphere" in labels[name] and sum(c == color for c, *_ in objs) == 1:
                spheres.append((w, h))
        if len(labels[name]) == 1 and objs:
            first.append(min((c for _, _, c, _, _ in objs),
                             key=lambda c: (c[0] - 32) ** 2 + (c[1] - 29) ** 2))
    for color in dataloader.COLORS:
        if color in by_color:
            res[f"object {color}"] = np.median(np.concatenate(by_color[color]), 0)
    centres = np.array(centres)
    res["centres x range"] = np.percentile(centres[:, 0], [0, 100])
    res["centres y range"] = np.percentile(centres[:, 1], [0, 100])
    res["first object (x, y)"] = np.median(np.array(first), 0)
    if spheres:
        res["sphere w x h (median)"] = np.median(np.array(spheres), 0)
    return res


def sheet(images, rows, cols):
    """(rows*cols, 64, 64, 3) -> one contact sheet image array."""
    return images.reshape(rows, cols, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(
        rows * 64, cols * 64, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--look", type=Path, default=dataloader.ROOT.parent / "shared" / "look")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="render seeds; the figure shows the first, the numbers use all")
    ap.add_argument("--out", type=Path, default=dataloader.ROOT / "docs" / "look_compare.png")
    ap.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscale of the figure")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    labels = dataloader.load_spec(args.look / "labels.json")
    names = list(labels)
    ref = np.stack([dataloader.load_image(args.look / n).permute(1, 2, 0).numpy() for n in names])
    ours = [render.render_tensor(labels, seed=s, device=args.device).permute(0, 2, 3, 1).cpu()
            .numpy() for s in args.seeds]

    rows = len({dataloader.STEP_NAME.match(n)[1] for n in names})
    gap = np.full((rows * 64, 8, 3), 255, np.uint8)
    fig = np.concatenate([sheet(ref, rows, len(names) // rows), gap,
                          sheet(ours[0], rows, len(names) // rows)], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(fig).resize((fig.shape[1] * args.scale, fig.shape[0] * args.scale),
                                Image.NEAREST).save(args.out)
    print(f"wrote {args.out} (left: reference Blender renders, right: render.py seed "
          f"{args.seeds[0]})")

    a = stats(ref, names, labels)
    b = stats(np.concatenate(ours), names * len(args.seeds), labels)
    fmt = lambda v: "(" + ", ".join(f"{x:5.1f}" for x in v) + ")"  # noqa: E731
    print(f"\n| {'statistic (sRGB / 64x64 px)':28s} | {'reference':21s} | {'render.py':21s} |")
    print(f"|{'-' * 30}|{'-' * 23}|{'-' * 23}|")
    for k in a:
        print(f"| {k:28s} | {fmt(a[k]):21s} | {fmt(b[k]) if k in b else '-':21s} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    dataloader.run_cli(main)
