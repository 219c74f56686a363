"""Layouts estimated from images and labels alone: where each object of a training image is,
for data that comes without positions (the lab's real i-CLEVR).

The steps of an i-CLEVR scene add one object at a time and the new object is the last label of
each step, so where step k differs from step k-1 (and differs toward the new label's color) is
where the new object is. Scenes whose steps do not line up (the camera moved), and images
without steps, fall back to foreground blobs (dataloader.foreground_masks) matched to the
labels by color. The colors come from the data itself: the mean foreground color of the
one-object images of each color. Sizes follow a straight-line fit of blob size on image row.

    python estimate_layouts.py --data-root DIR --train-json FILE     # DIR/<FILE stem>_layouts.json
    python estimate_layouts.py --data-root DIR --train-json FILE --out runs/x/train_layouts.json

The output is a layout file (docs/layouts.md) with "estimated": true and "skipped": {image
name: why it could not be placed}; ICLEVRDataset leaves the skipped images out.
"""
import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import dataloader
from dataloader import COLORS, LAYOUT_FORMAT, DataError, _rel

CHANGE = 16          # of 255: a pixel differs between consecutive steps
MIN_PIXELS = 3       # fewer pixels than this do not make an object
RADIUS = 6.0         # px: the robust centroid keeps pixels this close to its current estimate
MOVED = 0.03         # share of the earlier objects' pixels that changed away from the new
                     # one, above which the camera moved between the steps
ASPECT = 4 / 3       # 320x240 squashed to 64x64: an object is 4/3 as tall as wide
# A sphere's radius (the layouts' size) over that of a disc with an object's pixel count: cubes,
# cylinders and anti-aliased edges cover more pixels (fitted on renders with true layouts by
# bench/bench_layout_estimate.py, whose size error checks it)
SIZE_SCALE = 0.79


def scene_steps(spec):
    """{scene key: [image names by step]} for the scenes whose steps each add one label (names
    ..._<k>.png); every other image is its own one-step scene."""
    groups = {}
    for name in spec:
        m = dataloader.STEP_NAME.match(name)
        groups.setdefault(m[1] if m else name, []).append((int(m[2]) if m else 0, name))
    out = {}
    for key, steps in groups.items():
        names = [n for _, n in sorted(steps)]
        chained = all(list(spec[b][:-1]) == list(spec[a])
                      for a, b in zip(names, names[1:]))
        if chained and len(spec[names[0]]) == 1:
            out[key] = names
        else:
            out.update({n: [n] for n in names})
    return out


def robust_centroid(ys, xs, start=None):
    """Mean position of the pixels near their median (three refinements): a stray pixel or a
    shadow's edge does not drag the centre. Returns (x, y) at pixel centres."""
    cy, cx = start if start is not None else (np.median(ys), np.median(xs))
    for _ in range(3):
        near = (ys - cy) ** 2 + (xs - cx) ** 2 <= RADIUS ** 2
        if near.sum() < MIN_PIXELS:
            break
        cy, cx = ys[near].mean(), xs[near].mean()
    return float(cx) + 0.5, float(cy) + 0.5


def estimate_palette(images, fg, spec, names):
    """(8, 3) mean foreground RGB per color over the one-object images; NaN for a color that
    no one-object image shows."""
    sums, counts = np.zeros((len(COLORS), 3)), np.zeros(len(COLORS))
    for i, name in enumerate(names):
        if len(spec[name]) == 1:
            c = dataloader.OBJECTS[spec[name][0]] % len(COLORS)
            px = images[i][:, fg[i]]
            if px.shape[1] >= MIN_PIXELS:
                sums[c] += px.mean(1)
                counts[c] += 1
    with np.errstate(invalid="ignore"):
        return sums / counts[:, None]


def _nearer_than(px, color, other):
    """Pixels px (3, P) nearer (RGB) to color (3,) than to other (3, P) or (3,)."""
    if np.isnan(color).any():
        return np.ones(px.shape[1], bool)
    other = other if other.ndim == 2 else other[:, None]
    return ((px - color[:, None]) ** 2).sum(0) < ((px - other) ** 2).sum(0)


def locate_new(img, prev, fg, prev_fg, color):
    """The object step k adds: pixels that changed, are foreground now and are nearer the new
    label's color than to what was there -> ((x, y), pixel count, camera moved?) or None."""
    changed = (np.abs(img - prev).max(0) > CHANGE) & fg
    ys, xs = np.nonzero(changed)
    if len(ys) < MIN_PIXELS:
        return None
    px = img[:, ys, xs]
    keep = _nearer_than(px, color, prev[:, ys, xs])
    if keep.sum() >= MIN_PIXELS:
        ys, xs = ys[keep], xs[keep]
    x, y = robust_centroid(ys, xs)
    # Earlier objects change only where the new one covers them, unless the camera moved.
    near = np.zeros_like(fg)
    r = int(2 * RADIUS)
    near[max(0, int(y) - r):int(y) + r, max(0, int(x) - r):int(x) + r] = True
    old = prev_fg & ~near
    moved = old.sum() > 0 and (changed & old).sum() / old.sum() > MOVED
    return (x, y), len(ys), moved


def pixel_owners(img, fg, background, colors, palette):
    """Foreground pixels (ys, xs) and, for each, the index in colors of the nearest palette
    color, or len(colors) where the local background (dataloader.median_background) is
    nearer."""
    ys, xs = np.nonzero(fg)
    refs = np.concatenate([palette[colors][:, :, None].repeat(len(ys), 2),
                           background[:, ys, xs][None]])  # (C + 1, 3, P)
    return ys, xs, ((img[:, ys, xs][None] - refs) ** 2).sum(1).argmin(0)


def _colors(labels):
    return [dataloader.OBJECTS[lb] % len(COLORS) for lb in labels]


def locate_by_color(img, fg, background, labels, palette):
    """Every object of an image without steps, from the foreground pixels of its color ->
    ({label: ((x, y), pixels)}, None) or (None, why it cannot be placed)."""
    colors = _colors(labels)
    if np.isnan(palette[colors]).any():
        return None, "no one-object image shows one of its colors"
    if len(set(colors)) < len(colors):
        return None, "two objects of one color and no earlier step to tell them apart"
    ys, xs, owner = pixel_owners(img, fg, background, colors, palette)
    out = {}
    for j, (label, c) in enumerate(zip(labels, colors)):
        sel = owner == j
        if sel.sum() < MIN_PIXELS:
            return None, f"no {COLORS[c]} object found"
        out[label] = (robust_centroid(ys[sel], xs[sel]), int(sel.sum()))
    return out, None


def locate_moved(img, prev, fg, background, labels, palette, previous):
    """Every object of a step whose camera moved -> {label: ((x, y), pixels)} or None. The
    earlier ones come from the pixels of their color near their position in the previous step
    (the camera moves them a few pixels), or stay there when too little of them shows; the new
    one from the changed pixels of its color away from earlier objects of that color."""
    colors = np.array(_colors(labels))
    ys, xs, owner = pixel_owners(img, fg, background, list(colors), palette)
    # the color each pixel is nearest to (-1: the background); two labels may share a color
    nearest = np.where(owner < len(colors), colors[owner.clip(max=len(colors) - 1)], -1)
    out, new_color = {}, colors[-1]
    new = (nearest == new_color) & (np.abs(img[:, ys, xs] - prev[:, ys, xs]).max(0) > CHANGE)
    for j, label in enumerate(labels[:-1]):
        (x0, y0), _ = previous[label]
        sel = (nearest == colors[j]) & ((ys + 0.5 - y0) ** 2 + (xs + 0.5 - x0) ** 2
                                        <= RADIUS ** 2)
        out[label] = ((robust_centroid(ys[sel], xs[sel], (y0 - 0.5, x0 - 0.5)), int(sel.sum()))
                      if sel.sum() >= MIN_PIXELS else ((x0, y0), 0))
        if colors[j] == new_color:
            (x1, y1), _ = out[label]
            new &= (ys + 0.5 - y1) ** 2 + (xs + 0.5 - x1) ** 2 > (RADIUS / 2) ** 2
    if new.sum() < MIN_PIXELS:
        return None
    out[labels[-1]] = (robust_centroid(ys[new], xs[new]), int(new.sum()))
    return out


def locate_step(img, prev, fg, prev_fg, background, labels, palette, previous):
    """Every object of step k of a scene, given step k-1's image and objects -> ((objects or
    None, why not), camera moved?)."""
    color = palette[dataloader.OBJECTS[labels[-1]] % len(COLORS)]
    new = locate_new(img, prev, fg, prev_fg, color)
    if new is None:
        return (None, "nothing new where its step adds an object"), False
    if not new[2]:
        return ({**previous, labels[-1]: new[:2]}, None), False
    objs = locate_moved(img, prev, fg, background, labels, palette, previous)
    return (objs, None if objs else "its new object not found (the camera moved)"), True


def fit_sizes(found):
    """Straight-line fit of an object's apparent radius on its image row, from the pixel counts
    (area = pi * rx * ry): (slope, intercept), refitted once without the worst outliers
    (objects partly hidden by later ones)."""
    pts = np.array([(y, SIZE_SCALE * np.sqrt(n / (np.pi * ASPECT))) for objs in found.values()
                    for (_, y), n in objs.values() if n >= MIN_PIXELS])
    if len(pts) < 2:
        return 0.0, 3.0
    keep = np.ones(len(pts), bool)
    for _ in range(2):
        coef = np.polyfit(pts[keep, 0], pts[keep, 1], 1)
        resid = pts[:, 1] - np.polyval(coef, pts[:, 0])
        keep = np.abs(resid) <= 2 * resid[keep].std() + 1e-6
    return float(coef[0]), float(coef[1])


def estimate(images, spec, names=None):
    """uint8 images (N, 3, H, W), in the order of names (default: the spec's) -> (layouts
    {name: [{"label", "x", "y", "rx", "ry"}]}, skipped {name: why}, scenes whose camera moved)."""
    names = list(spec) if names is None else list(names)
    index = {n: i for i, n in enumerate(names)}
    images = torch.as_tensor(images)
    fg = dataloader.foreground_masks(images)[:, 0].numpy()
    background = dataloader.median_background(images).numpy()
    imgs = images.float().numpy()
    palette = estimate_palette(imgs, fg, spec, names)
    found, skipped, moved = {}, {}, set()
    for key, steps in scene_steps({n: spec[n] for n in names}).items():
        for prev, name in zip([None] + steps[:-1], steps):
            i, labels = index[name], spec[name]
            if prev not in found:  # a scene's first step, or one after a skipped step
                objs, why = locate_by_color(imgs[i], fg[i], background[i], labels, palette)
            else:
                j = index[prev]
                (objs, why), camera_moved = locate_step(imgs[i], imgs[j], fg[i], fg[j],
                                                        background[i], labels, palette,
                                                        found[prev])
                if camera_moved:
                    moved.add(key)
            if objs is None:
                skipped[name] = why
            else:
                found[name] = objs
    slope, intercept = fit_sizes(found)
    layouts = {}
    for name, objs in found.items():
        layouts[name] = []
        for label in spec[name]:
            (x, y), _ = objs[label]
            rx = max(1.0, slope * y + intercept)
            layouts[name].append({"label": label, "x": round(x, 2), "y": round(y, 2),
                                  "rx": round(rx, 2), "ry": round(ASPECT * rx, 2)})
    return layouts, skipped, len(moved)


def summary(n_images, skipped, moved):
    """One line: images placed, images skipped and why."""
    why = Counter(skipped.values())
    reasons = "; ".join(f"{v}: {k:,}" for v, k in why.most_common(3))
    more = f" ({reasons}; first: {next(iter(skipped))})" if skipped else ""
    return (f"layouts estimated for {n_images - len(skipped):,} of {n_images:,} images, "
            f"{len(skipped):,} skipped{more}; {moved:,} scenes with a moving camera placed "
            "by color")


def write_estimate(path, layouts, skipped, size=dataloader.IMAGE_SIZE):
    """The layout file (docs/layouts.md) of an estimate."""
    dataloader.write_json(path, {"format": LAYOUT_FORMAT, "image_size": size, "estimated": True,
                                 "layouts": layouts, "skipped": skipped}, indent=None)
    return Path(path)


def estimate_dataset(ds, path):
    """Estimate the layouts of an in-memory ICLEVRDataset's images and write them to path ->
    the summary line. Stops with one line when no image can be placed."""
    layouts, skipped, moved = estimate(ds.images, ds.spec, ds.names)
    if len(skipped) == len(ds.spec):
        name, why = next(iter(skipped.items()))
        raise DataError(f"{_rel(ds.spec_path)}: no image could be placed by "
                        f"estimate_layouts.py (first: {name}: {why})")
    write_estimate(path, layouts, skipped)
    return summary(len(ds.spec), skipped, moved)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n" + __doc__.split("\n\n")[2])
    ap.add_argument("--data-root", type=Path, default=dataloader.DATA_ROOT)
    ap.add_argument("--train-json", type=Path, default=dataloader.TRAIN_JSON)
    ap.add_argument("--out", type=Path, default=None,
                    help="layout file to write (default: DATA_ROOT/<spec stem>_layouts.json)")
    args = ap.parse_args()
    ds = dataloader.ICLEVRDataset(args.data_root, args.train_json, in_memory=True)
    path = args.out or dataloader.layout_path(args.data_root, args.train_json)
    print(estimate_dataset(ds, path))
    print(f"wrote {_rel(path)}")


if __name__ == "__main__":
    dataloader.run_cli(main)
