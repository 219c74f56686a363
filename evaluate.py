"""Score generated images with the judge: accuracy by the lab's rule, next to a Frechet distance.

Image i of a condition file is <images>/<file stem>/<i>.png (the lab's layout: images/test/0.png
for test.json[0]). The Frechet distance compares the judge's penultimate features of the images
with those of renders of the same conditions (16 fixed-seed scenes each), so numbers are
comparable across runs that score the same condition files. Next to it comes the FD that as many
renders of another seed get (a perfect generator's score): with 32 images it is far from 0.

Images of another size, or grayscale, RGBA or palette ones, are squash-resized and converted to
RGB like the lab's loader, with a warning; 16-bit grayscale ones are refused (converting them
would clip them to white). 16-bit RGB ones are read at 8 bits.

    python evaluate.py                                    # images/test and images/new_test
    python evaluate.py --checkpoint checkpoint.pth --per-image --json results/eval.json
    python evaluate.py --fd-reference /path/to/iclevr    # a model trained on the lab's images

A model trained on other images than our renders is compared with its own training images
(--fd-reference): against renders, its FD would measure the renderer's difference too.
"""
import argparse
import json
import re
import sys
import weakref
from collections import Counter
from pathlib import Path

import torch

from dataloader import (COLORS, IMAGE_SIZE, ROOT, TEST_JSONS, DataError, _rel, command_line,
                        encode_batch, foreground_masks, load_conditions, load_image, load_spec,
                        read_image, run_cli, to_float, write_json)
from evaluator import (by_objects, by_objects_text, evaluation_model, frechet_distance,
                       miss_kinds, per_image)

FD_RENDERS, FD_SEED = 16, 0
_REFERENCES = {}  # rendered reference images, reused across calls (speedrun scores repeatedly)
_FEATURES = weakref.WeakKeyDictionary()  # judge -> {reference key: its features of them}


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def load_folder(folder, n):
    """<folder>/0.png .. <folder>/<n-1>.png -> uint8 (n, 3, 64, 64); other sizes are resized."""
    folder = Path(folder)
    expected = f"expected 0.png .. {n - 1}.png, one per condition, as sample.py writes them"
    if not folder.is_dir():
        raise DataError(f"{_rel(folder)}: folder not found ({expected})")
    paths = [folder / f"{i}.png" for i in range(n)]
    missing = [p.name for p in paths if not p.is_file()]
    if len(missing) == n:
        raise DataError(f"{_rel(folder)}: no images ({expected})")
    if missing:
        raise DataError(f"{_rel(folder)}: {len(missing)} of {n} images are missing (first: "
                        f"{', '.join(missing[:3])})")
    extra = [p.name for p in folder.glob("*.png")
             if re.fullmatch(r"\d+\.png", p.name) and int(p.stem) >= n]
    if extra:
        warn(f"{_rel(folder)}: ignoring {len(extra)} images beyond the {n} conditions "
             f"(first: {', '.join(sorted(extra)[:3])})")
    images, resized, converted = [], [], []
    for p in paths:
        image, mode, size = read_image(p)  # DataError for unreadable or 16-bit gray files
        if mode != "RGB":
            converted.append(f"{p.name} {mode}")
        if size != (IMAGE_SIZE, IMAGE_SIZE):
            resized.append(f"{p.name} {size[0]}x{size[1]}")
        images.append(image)
    if resized:
        warn(f"{_rel(folder)}: {len(resized)} images are not {IMAGE_SIZE}x{IMAGE_SIZE}, "
             f"squash-resized like the lab's loader (first: {', '.join(resized[:3])})")
    if converted:
        warn(f"{_rel(folder)}: {len(converted)} images are not RGB, converted to RGB like the "
             f"lab's loader (first: {', '.join(converted[:3])})")
    return torch.stack(images)


def reference_renders(conditions, per_condition=FD_RENDERS, seed=FD_SEED, device="auto"):
    """per_condition renders of every condition (fixed seed), cached for the process."""
    key = (json.dumps(conditions), per_condition, seed, str(device))
    if key not in _REFERENCES:
        import render  # only the Frechet distance needs the renderer

        # render.py seeds each scene by (seed, name): naming a scene after its condition makes
        # the references of a condition the same whichever file or position it comes from;
        # a condition listed again (several seeds' images at once) gets further scenes
        items, seen = [], Counter()
        for c in conditions:
            first = seen[tuple(c)] * per_condition
            seen[tuple(c)] += 1
            items += [(f"reference {', '.join(c)} #{first + r}", c) for r in range(per_condition)]
        _REFERENCES[key] = render.render_tensor(items, seed=seed, device=str(device))
    return _REFERENCES[key]


def fd_against_renders(judge, images, conditions, per_condition=FD_RENDERS, seed=FD_SEED):
    """Frechet distance between the judge's features of images and of renders of conditions
    (those features are computed once per judge: the FD and its floor share them)."""
    cache = _FEATURES.setdefault(judge, {})
    key = (json.dumps(conditions), per_condition, seed)
    if key not in cache:
        cache[key] = judge.features(reference_renders(conditions, per_condition, seed,
                                                      judge.device))
    return frechet_distance(judge.features(images), cache[key])


def fd_floor(judge, conditions, per_condition=1, references=FD_RENDERS):
    """fd_against_renders of per_condition renders of each condition with another seed: what a
    generator that draws exactly the renders' distribution scores with as many images (a few
    dozen images in 512 dimensions are far from 0)."""
    renders = reference_renders(conditions, per_condition, FD_SEED + 1, judge.device)
    return fd_against_renders(judge, renders, conditions, references)


def fd_against_folder(judge, images, folder, spec_path, references=2000, seed=0):
    """(FD, floor) for images of another data set than our renders (the lab's, Blender's): the
    judge's features of images against `references` random training images of folder, and
    that of as many other training images as images (roughly a perfect generator's; the
    benchmark's conditions are not the training set's)."""
    names = list(load_spec(spec_path))
    pick = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    n = min(references, len(names) - len(images))
    if n < len(images):
        raise DataError(f"{_rel(spec_path)}: {len(names)} images, too few for an FD of "
                        f"{len(images)} images (expected at least {2 * len(images)})")
    ref, other = (judge.features(to_float(torch.stack(
        [load_image(Path(folder) / names[i]) for i in part])))
        for part in (pick[:n], pick[n:n + len(images)]))
    return frechet_distance(judge.features(images), ref), frechet_distance(other, ref)


def object_colors(images, layouts):
    """Mean RGB (N, K, 3) of the foreground pixels (dataloader.foreground_masks) inside each
    object's ellipse (x, y, rx, ry) of layouts (N, K, 5); NaN where there are none or no object."""
    images = torch.as_tensor(images)
    size = images.shape[-1]
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    cls, x, y, rx, ry = layouts.float().unbind(-1)
    dx = (grid - x[..., None]) / rx.clamp_min(1.0)[..., None]  # (N, K, W)
    dy = (grid - y[..., None]) / ry.clamp_min(1.0)[..., None]  # (N, K, H)
    inside = (dy[..., :, None] ** 2 + dx[..., None, :] ** 2) <= 1  # (N, K, H, W)
    w = (inside & foreground_masks(images)).float() * (cls >= 0)[..., None, None]
    total = torch.einsum("nkhw,nchw->nkc", w, images.float())
    return total / w.sum((2, 3))[..., None]  # 0 / 0 = NaN: nothing there


def color_palette(images, layouts):
    """Each color's mean object_colors over images whose layouts are true (renders): (8, 3)."""
    rgb, cls = object_colors(images, layouts).flatten(0, 1), layouts[..., 0].flatten().long()
    palette = torch.full((len(COLORS), 3), float("nan"))
    for c in range(len(COLORS)):
        pick = rgb[(cls >= 0) & (cls % len(COLORS) == c)]
        pick = pick[~pick.isnan().any(1)]
        if len(pick):
            palette[c] = pick.mean(0)
    return palette


def layout_fidelity(images, layouts, palette):
    """Share of the layouts' objects that appear where they were placed: some foreground in
    their ellipse, whose mean color is nearest (in RGB) to their own color's palette entry."""
    rgb = object_colors(images, layouts)
    cls = layouts[..., 0].long()
    nearest = torch.cdist(rgb.nan_to_num(-1e4).flatten(0, 1), palette.nan_to_num(1e4))
    hit = nearest.argmin(1).view(cls.shape) == cls % len(COLORS)
    hit &= ~rgb.isnan().any(-1)
    present = cls >= 0
    return float(hit[present].float().mean()) if present.any() else float("nan")


def score_folder(judge, folder, conditions_path, fd=False, fd_renders=FD_RENDERS,
                 fd_reference=None):
    """Score <folder>/<i>.png against condition i of conditions_path -> JSON-ready dict
    (accuracy, correct, total, misses (miss_kinds), per_image and, with fd=True, fd and
    fd_floor: against renders of the conditions, or with fd_reference=(folder, spec) against
    those training images)."""
    conditions = load_conditions(conditions_path)
    images = load_folder(folder, len(conditions))
    rows = per_image(judge.scores(images), encode_batch(conditions, _rel(conditions_path)))
    correct, total = sum(r["correct"] for r in rows), sum(r["total"] for r in rows)
    result = {"conditions": _rel(conditions_path), "folder": _rel(folder),
              "accuracy": correct / total, "correct": correct, "total": total,
              "misses": miss_kinds(rows), "by_objects": by_objects(rows)}
    if fd and fd_reference:
        result["fd"], result["fd_floor"] = fd_against_folder(judge, images, *fd_reference)
        result["fd_reference"] = _rel(fd_reference[0])
    elif fd:
        result["fd"] = fd_against_renders(judge, images, conditions, fd_renders)
        result["fd_floor"] = fd_floor(judge, conditions, 1, fd_renders)
    return {**result, "per_image": rows}


def fd_reference(folder, spec=None):
    """(folder, spec path) of --fd-reference: the spec given, else the folder's train.json or
    labels.json."""
    folder = Path(folder)
    spec = Path(spec) if spec else next((folder / n for n in ("train.json", "labels.json")
                                         if (folder / n).is_file()), None)
    if spec is None:
        raise DataError(f"{_rel(folder)}: no train.json or labels.json; pass --fd-spec")
    return folder, spec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=str(ROOT / "images"),
                   help="folder holding one subfolder per condition file (test/, new_test/)")
    p.add_argument("--conditions", nargs="+", default=[str(c) for c in TEST_JSONS],
                   help="condition files; images of X.json are read from <images>/X/")
    p.add_argument("--checkpoint", default=None,
                   help="the lab's checkpoint.pth, a .safetensors file or a folder of shards "
                        "(default: the project's weights/judge)")
    p.add_argument("--per-image", action="store_true", help="print each image's missing/extra")
    p.add_argument("--json", default=None, help="write the metrics here")
    p.add_argument("--device", default="auto")
    p.add_argument("--fd", action=argparse.BooleanOptionalAction, default=True,
                   help="Frechet distance to renders of the same conditions, and that of as "
                        "many renders of another seed")
    p.add_argument("--fd-renders", type=int, default=FD_RENDERS,
                   help="reference renders per condition (keep the default to compare runs)")
    p.add_argument("--fd-reference", default=None,
                   help="a model trained on other images than our renders (the lab's): FD "
                        "against this folder of its training images instead of renders")
    p.add_argument("--fd-spec", default=None,
                   help="the spec of --fd-reference (default: its train.json, else labels.json)")
    args = p.parse_args(argv)
    if args.fd_renders < 1:
        raise DataError("--fd-renders: expected a positive integer")
    reference = fd_reference(args.fd_reference, args.fd_spec) if args.fd_reference else None

    judge = evaluation_model(args.checkpoint, args.device)
    files = {}
    for cond in map(Path, args.conditions):
        res = score_folder(judge, Path(args.images) / cond.stem, cond, args.fd, args.fd_renders,
                           reference)
        floor = "training images" if reference else "renders"
        fd = f"  fd {res['fd']:.2f} ({floor}: {res['fd_floor']:.2f})" if "fd" in res else ""
        m = res["misses"]
        why = (f" | missed {m['missed']}: {m['wrong_shape']} wrong shape, {m['wrong_color']} "
               f"wrong color, {m['neither']} neither") if m["missed"] else ""
        why += (f" | objects found: {m['more_objects']} images too many, {m['fewer_objects']} "
                f"too few") if m["more_objects"] or m["fewer_objects"] else ""
        print(f"{cond.name}: accuracy {res['accuracy']:.4f} ({res['correct']}/{res['total']})"
              f"{fd}{why}")
        print("  by number of objects: " + by_objects_text(res["by_objects"], 4, counts=True))
        if args.per_image:
            for i, r in enumerate(res["per_image"]):
                wrong = "".join(f" | {what} {', '.join(r[what])}" for what in ("missing", "extra")
                                if r[what])
                print(f"  {i:3d}: {r['correct']}/{r['total']} {', '.join(r['labels'])}{wrong}")
        files[cond.name] = res
    if args.json:
        command = command_line(None if argv is None else ["evaluate.py", *argv])
        write_json(args.json, {"command": command, "checkpoint": _rel(judge.checkpoint),
                               "device": str(judge.device), "files": files})


if __name__ == "__main__":
    run_cli(main)
