"""How well estimate_layouts.py places objects from images and labels alone: against the true
layouts of renders whose camera stays still between the steps of a scene (as in the lab's
train.json) and of renders whose camera moves (the color fallback), then on ../shared/look/
(Blender renders of real i-CLEVR, no true positions: a picture of the estimates).

    python bench/bench_layout_estimate.py  # results/layout-estimate-cpu.json + docs/ picture
"""
import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import dataloader  # noqa: E402
import estimate_layouts  # noqa: E402
import render  # noqa: E402
from dataloader import ROOT, command_line, load_image, load_json, run_cli, write_json  # noqa: E402

LOOK = ROOT.parent / "shared" / "look"


def errors(estimated, truth):
    """Per object of every image: (distance in px or NaN where skipped, relative size error,
    color index)."""
    rows = []
    for name, objs in truth.items():
        got = {o["label"]: o for o in estimated.get(name, [])}
        for o in objs:
            e = got.get(o["label"])
            c = dataloader.OBJECTS[o["label"]] % len(dataloader.COLORS)
            if e is None:
                rows.append((np.nan, np.nan, c))
            else:
                rows.append((np.hypot(e["x"] - o["x"], e["y"] - o["y"]),
                             abs(e["rx"] - o["rx"]) / o["rx"], c))
    return np.array(rows)


def measure(spec, seed, camera_moves):
    """Render spec, estimate its layouts, compare with the renderer's -> results row."""
    images = render.render_tensor(spec, seed, "cpu", camera_moves=camera_moves)
    truth = render.spec_layouts(spec, seed, "cpu", camera_moves)
    t0 = time.perf_counter()
    est, skipped, moved = estimate_layouts.estimate(images, spec)
    seconds = time.perf_counter() - t0
    err = errors(est, truth)
    dist, size, color = err.T
    placed = ~np.isnan(dist)
    by_color = {c: round(float(np.mean(np.nan_to_num(dist[color == i], nan=99) <= 2)), 4)
                for i, c in enumerate(dataloader.COLORS)}
    return {"camera": "moves between steps" if camera_moves else "still (as train.json)",
            "images": len(spec), "objects": len(dist), "images_skipped": len(skipped),
            "skip_reasons": sorted(set(skipped.values())), "scenes_moved": moved,
            "within_2px": round(float(np.mean(np.nan_to_num(dist, nan=99) <= 2)), 4),
            "within_1px": round(float(np.mean(np.nan_to_num(dist, nan=99) <= 1)), 4),
            "mean_error_px": round(float(dist[placed].mean()), 3),
            "median_error_px": round(float(np.median(dist[placed])), 3),
            "size_error": round(float(size[placed].mean()), 3),
            "within_2px_by_color": by_color, "seconds": round(seconds, 2)}


def draw_look(folder, out, scale=3):
    """Estimate the layouts of the look/ renders and draw them (an ellipse of rx, ry in the
    object's color at each estimate) on their 64x64 views, one row per scene."""
    spec = load_json(folder / "labels.json")
    names = list(spec)
    images = torch.stack([load_image(folder / n) for n in names])
    est, skipped, _ = estimate_layouts.estimate(images, spec, names)
    rows = estimate_layouts.scene_steps(spec)
    side = 64 * scale
    cols = max(len(v) for v in rows.values())
    sheet = Image.new("RGB", (cols * (side + 4), len(rows) * (side + 4)), "white")
    for r, steps in enumerate(rows.values()):
        for c, name in enumerate(steps):
            tile = Image.fromarray(images[names.index(name)].permute(1, 2, 0).numpy())
            tile = tile.resize((side, side), Image.NEAREST)
            draw = ImageDraw.Draw(tile)
            for o in est.get(name, []):
                x, y, rx, ry = (o[k] * scale for k in ("x", "y", "rx", "ry"))
                rgb = tuple(render.COLOR_SRGB[o["label"].split()[0]])
                draw.ellipse((x - rx, y - ry, x + rx, y + ry), outline=rgb, width=2)
                draw.line((x - 3, y, x + 3, y), fill="black")
                draw.line((x, y - 3, x, y + 3), fill="black")
            if name in skipped:
                draw.text((4, 4), "skipped", fill="black")
            sheet.paste(tile, (c * (side + 4), r * (side + 4)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return {"images": len(spec), "images_skipped": len(skipped),
            "skip_reasons": sorted(set(skipped.values())), "picture": dataloader._rel(out)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--objects", type=int, default=3)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--look", type=Path, default=LOOK)
    ap.add_argument("--picture", type=Path, default=ROOT / "docs" / "layout-estimate-look.png")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "layout-estimate-cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    spec = render.make_spec(args.scenes, args.objects, seed=args.seed, prefix="CLEVR_train_")
    rows = [measure(spec, args.seed, moves) for moves in (False, True)]
    print(f"{'camera':24} {'images':>6} {'skipped':>7} {'<= 2 px':>8} {'mean px':>8} "
          f"{'size err':>8}")
    for r in rows:
        print(f"{r['camera']:24} {r['images']:6} {r['images_skipped']:7} {r['within_2px']:8.3f} "
              f"{r['mean_error_px']:8.2f} {r['size_error']:8.2f}")
    look = draw_look(args.look, args.picture) if (args.look / "labels.json").is_file() else None
    if look:
        print(f"look/: {look['images']} images, {look['images_skipped']} skipped -> "
              f"{look['picture']}")
    write_json(args.out, {"device": "cpu", "device_name": platform.processor() or "cpu",
                          "torch": torch.__version__, "python": platform.python_version(),
                          "command": command_line(), "scenes": args.scenes,
                          "objects_per_scene": args.objects, "seed": args.seed, "rows": rows,
                          "look": look})
    print(f"wrote {dataloader._rel(args.out)}")


if __name__ == "__main__":
    run_cli(main)
