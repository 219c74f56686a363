"""Benchmark render.py: images per second in memory (render_tensor, what the judge's training
uses) and to PNG files (render_spec, the train set), and the time spent placing scenes. Prints
a table and writes results/render-<device>.json after every measurement (a run cut short keeps
what it measured).

    python bench/bench_render.py                 # this machine's default device, ~30 s on 2 CPUs
    python bench/bench_render.py --device cuda   # the GPU run, ~20 s
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataloader  # noqa: E402
import render  # noqa: E402


def timed(fn, device):
    """(result, seconds) of fn(), waiting for the GPU's queued work on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=None,
                    help="images rendered in memory, 3 per scene (default 1200 CPU, 24000 GPU)")
    ap.add_argument("--png-images", type=int, default=None,
                    help="images written as PNG files (default: half of --images, at most 6000)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default results/render-<device>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dataloader.resolve_device(args.device)
    images = args.images or (1200 if device.type == "cpu" else 24000)
    png_images = args.png_images or min(images // 2, 6000)
    if images < 3 or png_images < 3:
        raise dataloader.DataError("--images, --png-images: expected at least 3 (one scene)")
    bs = args.batch_size or render.DEFAULT_BATCH.get(device.type, 8)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    load = os.getloadavg()[0]  # other processes on the machine slow the CPU numbers down
    out = args.out or dataloader.ROOT / "results" / f"render-{dataloader.device_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_avg_1m": round(load, 2), "batch_size": bs,
        "command": dataloader.command_line(), "results": [],
    }
    print(f"device: {device} ({name}), torch threads {torch.get_num_threads()}, batch {bs}, "
          f"torch {torch.__version__}, load average before the run {load:.1f}")
    print(f"| {'what':28s} | {'images':>7s} | {'seconds':>8s} | {'images/s':>9s} |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 10}|{'-' * 11}|")

    def report(what, n, seconds):
        print(f"| {what:28s} | {n:7d} | {seconds:8.2f} | {n / seconds:9.1f} |", flush=True)
        result["results"].append({"what": what, "images": n, "seconds": round(seconds, 3),
                                   "images_per_s": round(n / seconds, 1)})
        dataloader.write_json(out, result)

    # warm-up: CUDA context and kernels, the sRGB table
    render.render_tensor(render.make_spec(4, 3, seed=99), device=device, batch_size=bs)

    spec = render.make_spec(images // 3, 3, seed=1, prefix="SYN_bench_")
    keys, objects, _ = render.plan_images(spec)
    _, t = timed(lambda: render.render_tensor(spec, device=device, batch_size=bs), device)
    report("render_tensor (in memory)", len(spec), t)
    png_spec = render.make_spec(png_images // 3, 3, seed=2, prefix="SYN_bench_")
    with tempfile.TemporaryDirectory() as tmp:
        n, t = timed(lambda: render.render_spec(png_spec, tmp, device=device, batch_size=bs,
                                                progress=False), device)
    report("render_spec (PNG files)", n, t)
    _, t = timed(lambda: render.sample_scenes(keys, objects, 0, device), device)
    report("  of which scene placement", len(spec), t)
    print(f"wrote {out}")


if __name__ == "__main__":
    dataloader.run_cli(main)
