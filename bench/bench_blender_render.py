"""Blender i-CLEVR: what render size and samples per pixel cost, and what they change at 64x64.

Renders the same scenes with ../shared/blender/render_iclevr.py (real Blender, in a Python that
has `bpy`; see ../shared/blender/README.md) at the lab's 320x240 and 128 samples per pixel and
at cheaper settings, squashes every image to 64x64 as training does (dataloader.read_image), and
prints seconds per image against the RMS difference from the lab's setting. Writes
results/blender-render-tradeoff.json. A measuring instrument: nothing a user runs needs bpy.

    python bench/bench_blender_render.py                     # ~3 minutes on 2 cores
"""
import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataloader  # noqa: E402

ROOT = dataloader.ROOT
BLENDER = ROOT.parent / "shared" / "blender"
BPY_PYTHON = Path.home() / ".cache" / "bpy-venv" / "bin" / "python"
REFERENCE = (320, 240, 128)
CANDIDATES = [(320, 240, 32), (160, 120, 64), (160, 120, 32), (128, 96, 32), (128, 96, 16)]


def render(python, out, scenes, objects, seed, setting):
    """Render with render_iclevr.py; returns its seconds per image (render only, as it prints)."""
    w, h, spp = setting
    cmd = [str(python), str(BLENDER / "render_iclevr.py"), "--assets", str(BLENDER / "assets"),
           "--out", str(out), "--prefix", "TRADEOFF", "--objects", str(objects),
           "--scenes", str(scenes), "--seed", str(seed), "--width", str(w), "--height", str(h),
           "--samples", str(spp), "--threads", "2"]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"\(([\d.]+)s/img render, ([\d.]+)s/img overall\)", log)
    return float(m[1]), float(m[2])


def squashed(folder):
    names = sorted(json.loads((folder / "labels.json").read_text()))
    return torch.stack([dataloader.load_image(folder / n) for n in names]).float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", type=Path, default=BPY_PYTHON, help="a Python with bpy")
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--objects", type=int, default=3)
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "blender-render-tradeoff.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = Path(tmp) / "ref"
        ref_s, ref_all = render(args.python, ref_dir, args.scenes, args.objects, args.seed,
                                REFERENCE)
        ref = squashed(ref_dir)
        rows.append({"width": REFERENCE[0], "height": REFERENCE[1], "spp": REFERENCE[2],
                     "s_per_image": ref_s, "s_per_image_overall": ref_all, "rms_64": 0.0})
        for setting in CANDIDATES:
            folder = Path(tmp) / "x".join(map(str, setting))
            s, s_all = render(args.python, folder, args.scenes, args.objects, args.seed, setting)
            rms = (squashed(folder) - ref).pow(2).mean().sqrt().item()
            rows.append({"width": setting[0], "height": setting[1], "spp": setting[2],
                         "s_per_image": s, "s_per_image_overall": s_all, "rms_64": round(rms, 2)})
    print("| size | spp | s/image | s/image with placing | RMS at 64x64 vs 320x240@128 (0-255) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']}x{r['height']} | {r['spp']} | {r['s_per_image']:.2f} | "
              f"{r['s_per_image_overall']:.2f} | {r['rms_64']:.2f} |")
    dataloader.write_json(args.out, {
        "command": dataloader.command_line(), "device": platform.processor() or "cpu",
        "cpus": torch.get_num_threads(), "python": platform.python_version(),
        "images": args.scenes * args.objects, "seed": args.seed, "rows": rows})


if __name__ == "__main__":
    dataloader.run_cli(main)
