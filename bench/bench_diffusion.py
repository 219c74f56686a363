"""Benchmark the conditional DDPM: training throughput and sampling time of the 64 benchmark
conditions, against the seed-style baseline (1000-step DDPM, one image at a time, no guidance).

    python bench/bench_diffusion.py                        # tiny preset on CPU, default on GPU
    python bench/bench_diffusion.py --preset default --device cpu --train-steps 0 \
        --baseline-images 0

Prints a table and writes results/diffusion-<device>.json (diffusion-<preset>-<device>.json when
the preset is not the device's default). Random weights unless --checkpoint: timings do not
depend on the weights.
"""
import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as sample.py: no spinning OpenMP threads
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import accelerate  # noqa: E402
import diffusers  # noqa: E402

from dataloader import (NUM_CLASSES, TEST_JSONS, command_line, device_tag,  # noqa: E402
                        encode_batch, load_conditions, resolve_device, run_cli, speed_up_cuda,
                        write_json)
from model import (build_model, count_params, flops_per_image,  # noqa: E402
                   make_noise_scheduler)
from sample import GUIDANCE, generate, load_model  # noqa: E402
from bench_train_variants import make_step  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(model, device, batch_size, warmup, steps):
    """Images/s of train.py's step and EMA update on random data (bf16 on CUDA), on a copy of
    model: the sampling timings below keep the untouched original."""
    from diffusers.training_utils import EMAModel

    net = copy.deepcopy(model)
    step = make_step(net, device)
    ema = EMAModel(net.parameters(), decay=0.999, use_ema_warmup=True, foreach=True)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch_size, 3, 64, 64, generator=g, device=device) * 2 - 1
    y = (torch.rand(batch_size, NUM_CLASSES, generator=g, device=device) < 0.08).float()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        step(x0, y, torch.randn(x0.shape, generator=g, device=device),
             torch.randint(0, 1000, (batch_size,), generator=g, device=device))
        ema.step(net.parameters())
    _sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, help="default: tiny on CPU, default on GPU")
    ap.add_argument("--checkpoint", default=None, help="time a trained model instead")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (128 GPU, 8 CPU)")
    ap.add_argument("--train-steps", type=int, default=None, help="timed steps (0 = skip)")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--sampler", default="dpm++")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=GUIDANCE)
    ap.add_argument("--baseline-images", type=int, default=None,
                    help="images timed for the 1000-step baseline (0 = skip; 2 GPU, 1 CPU)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    speed_up_cuda(device)
    default_preset = "default" if gpu else "tiny"
    preset = args.preset or default_preset
    batch = args.batch_size or (128 if gpu else 8)
    train_steps = args.train_steps if args.train_steps is not None else (20 if gpu else 5)
    baseline_images = (args.baseline_images if args.baseline_images is not None
                       else (2 if gpu else 1))

    torch.manual_seed(0)
    if args.checkpoint:
        model, sched_cfg = load_model(args.checkpoint, device)
        preset = "checkpoint"
    else:
        model = build_model(preset).to(device).eval()
        sched_cfg = make_noise_scheduler(prediction_type="v_prediction").config
    res = {"bench": "diffusion", "device": torch.cuda.get_device_name(device) if gpu else
           f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "device_type": device.type, "preset": preset, "torch_threads": torch.get_num_threads(),
           "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "diffusers": diffusers.__version__, "accelerate": accelerate.__version__},
           "command": command_line(),
           "params": count_params(model), "gflop_per_image": flops_per_image(model) / 1e9}

    if train_steps:
        ips = bench_train(model, device, batch, args.warmup_steps, train_steps)
        res["train"] = {"batch_size": batch, "timed_steps": train_steps,
                        "warmup_steps": args.warmup_steps, "images_per_s": ips,
                        "precision": "bf16 autocast" if gpu else "fp32"}

    if device.type == "cpu":  # as sample.load_model does for sampling
        model = model.to(memory_format=torch.channels_last)
    # The 64 benchmark conditions: one batched call per file, CFG doubling the batch.
    labels = [encode_batch(load_conditions(p)) for p in TEST_JSONS]
    kw = dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=0,
              scheduler_config=sched_cfg, progress=False)
    generate(model, labels[0][:2], **{**kw, "steps": 2})  # warm-up (allocator, cuDNN)
    per_file = [timed(lambda: generate(model, y, batch_size=len(y), **kw), device)[0]
                for y in labels]
    n = sum(len(y) for y in labels)
    res["sampling"] = {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
                       "images": n, "seconds_per_file": per_file, "seconds": sum(per_file),
                       "images_per_s": n / sum(per_file)}

    if baseline_images:
        k = baseline_images
        y = torch.cat(labels)[:k]
        secs = [timed(lambda: generate(model, y[i:i + 1], sampler="ddpm", steps=1000, guidance=1.0,
                                       seed=0, scheduler_config=sched_cfg, batch_size=1,
                                       progress=False), device)[0] for i in range(k)]
        per_image = sum(secs) / k
        res["baseline"] = {
            "sampler": "ddpm", "steps": 1000, "guidance": 1.0, "batch_size": 1,
            "images_timed": k, "seconds_per_image": per_image,
            "seconds_for_64_extrapolated": per_image * n,
            "note": f"timed on {k} images one at a time, extrapolated per image to {n}",
            "speedup_of_batched_sampling": per_image * n / sum(per_file)}

    rows = [("device", res["device"]), ("preset", preset),
            ("params", f"{res['params'] / 1e6:.2f}M"),
            ("GFLOP/img (forward)", f"{res['gflop_per_image']:.2f}")]
    if "train" in res:
        rows.append((f"train img/s (batch {batch})", f"{res['train']['images_per_s']:.1f}"))
    s = res["sampling"]
    rows.append((f"sample 64 conds ({args.sampler} {args.steps} steps, w={args.guidance})",
                 f"{s['seconds']:.2f} s ({s['seconds_per_file'][0]:.2f} + "
                 f"{s['seconds_per_file'][1]:.2f})"))
    if "baseline" in res:
        b = res["baseline"]
        rows.append(("baseline ddpm 1000 steps, 1 img, no CFG",
                     f"{b['seconds_per_image']:.2f} s/img -> "
                     f"{b['seconds_for_64_extrapolated']:.0f} s for 64 (extrapolated)"))
        rows.append(("batched speedup vs baseline", f"{b['speedup_of_batched_sampling']:.1f}x"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")

    suffix = device_tag(device) if preset == default_preset else f"{preset}-{device_tag(device)}"
    out = args.out_dir / f"diffusion-{suffix}.json"
    write_json(out, res)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    run_cli(main)
