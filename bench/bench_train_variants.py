"""Training throughput of one preset under speed options (batch size, channels_last,
torch.compile, CUDA graph; on a CPU also bf16 autocast and threads), with train.py's own
TrainStep (bf16 autocast on CUDA, fused AdamW there).

    python bench/bench_train_variants.py --device cuda  # results/train-variants-PRESET-GPU.json
    python bench/bench_train_variants.py --device cpu --preset ground   # the CPU variants
    python bench/bench_train_variants.py --device cpu --preset ground-shape --variants "b32 bf16" \
        --archs widths-64 ps4-wide two-levels --tag=-archs    # other shapes of the same net

Achieved GFLOP/s counts a training step as 3 forward passes (model.flops_per_image).

The JSON is rewritten after every variant, so a run cut short keeps what it measured.
"""
import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

from dataloader import (ROOT, DataError, command_line, device_tag, host, resolve_device,  # noqa: E402
                        run_cli, speed_up_cuda, write_json)
from model import build_model, flops_per_image, make_noise_scheduler  # noqa: E402
from trainstep import TrainStep  # noqa: E402

VARIANTS = {  # name: (batch size, channels_last, compile, CUDA graph[, precision, threads])
    "b256": (256, False, False, False),
    "b256 channels_last": (256, True, False, False),
    "b512": (512, False, False, False),
    "b128 graph": (128, False, False, True),
    "b256 graph": (256, False, False, True),
    "b512 graph": (512, False, False, True),
    "b256 compile": (256, False, True, False),
    # compiled (fused) kernels, replayed by train.py's own graph: does compiling pay back its
    # compile time once launches are gone?
    "b256 compile graph": (256, False, True, True),
}
CPU_VARIANTS = {  # the speedrun's CPU batch; precision "no" = fp32, threads 0 = torch's default
    "b32 fp32": (32, False, False, False, "no", 0),
    "b16 bf16": (16, False, False, False, "bf16", 0),
    "b32 bf16": (32, False, False, False, "bf16", 0),
    "b32 bf16 channels_last": (32, True, False, False, "bf16", 0),
    "b32 bf16 1 thread": (32, False, False, False, "bf16", 1),
    "b64 bf16": (64, False, False, False, "bf16", 0),
    "b32 bf16 compile": (32, False, True, False, "bf16", 0),
}
VARIANTS.update(CPU_VARIANTS)
# Shapes of the preset's UNet (model.build_model overrides): do some map onto oneDNN's kernels
# better, i.e. more GFLOP/s, so that a 40-minute budget buys more of the same arithmetic?
ARCHS = {
    "preset": {},
    "widths-64": {"block_out_channels": (128, 128, 192)},  # multiples of 64
    "ps4-wide": {"pixel_shuffle": 4, "block_out_channels": (256, 320),  # 16x16 and 8x8 levels
                 "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                 "up_block_types": ("AttnUpBlock2D", "UpBlock2D")},
    "two-levels": {"block_out_channels": (128, 192),  # 32x32 and 16x16, no 8x8 level
                   "down_block_types": ("DownBlock2D", "DownBlock2D"),
                   "up_block_types": ("UpBlock2D", "UpBlock2D")},
    "layers-2": {"layers_per_block": 2},
}
BUDGET_S = 600  # the speedrun's 10 minutes: what a variant's warm-up (compile) time costs


def make_step(net, device, channels_last=False, compile_=False, graph=False, precision="auto"):
    """train.py's TrainStep (loss, backward, clip, fused AdamW, as train.py builds them) for net.
    Eager steps go through accelerate.prepare, which patches net's forward: pass a copy of a
    model that is used for anything else afterwards."""
    cuda = device.type == "cuda"
    mp = precision if precision != "auto" else ("bf16" if cuda else "no")
    AcceleratorState._reset_state(True)  # a process-wide singleton: each variant its precision
    acc = Accelerator(cpu=not cuda, mixed_precision=mp)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda, capturable=graph)
    model, opt = (net, opt) if graph else acc.prepare(net, opt)
    model = torch.compile(model) if compile_ else model
    sched = make_noise_scheduler(prediction_type="v_prediction")
    ac = sched.alphas_cumprod.to(device)
    return TrainStep(acc, model, opt, sched, ac / (1 - ac), 5.0, 1.0, cuda_graph=graph)


def seed0_model(preset, **overrides):
    torch.manual_seed(0)
    return build_model(preset, **overrides)


def check_graph(preset, device, batch=64, steps=8):
    """Eager and CUDA-graph steps from the same init on the same batches -> both loss curves
    (equal up to bf16 kernel nondeterminism; the replays are steps WARMUP + 1 onwards)."""
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, 3, 64, 64, generator=g, device=device) * 2 - 1
    y = (torch.rand(batch, 24, generator=g, device=device) < 0.1).float()
    no_layout = torch.zeros(batch, 0, 5, device=device)  # label-only presets read none
    batches = [(torch.randn(x0.shape, generator=g, device=device),
                torch.randint(0, 1000, (batch,), generator=g, device=device))
               for _ in range(steps)]
    curves = {}
    for graph in (False, True):
        step = make_step(seed0_model(preset), device, graph=graph)
        curves["graph" if graph else "eager"] = [float(step(x0, y, no_layout, n, t)[0])
                                                   for n, t in batches]
    curves["replayed"] = step.replaying  # False: the capture failed and it ran eagerly
    return curves


def random_batch(batch, device, fmt=torch.contiguous_format):
    """Random images, labels and layouts of three objects anywhere (the grounded presets draw
    their maps; the others read nothing)."""
    x0 = torch.randn(batch, 3, 64, 64, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 24, device=device) < 0.1).float()
    layout = torch.cat([torch.randint(0, 24, (batch, 3, 1), device=device).float(),
                        torch.rand(batch, 3, 2, device=device) * 64,
                        torch.full((batch, 3, 2), 4.0, device=device)], -1)
    return x0, y, layout


def bench(net, device, batch, channels_last, compile_, graph, warmup, steps, precision="auto"):
    """Images/s of train.py's TrainStep for net on random data, and the warm-up seconds."""
    step = make_step(net, device, channels_last, compile_, graph, precision)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x0, y, layout = random_batch(batch, device, fmt)

    def run(n):
        t0 = time.perf_counter()
        for _ in range(n):
            step(x0, y, layout, torch.randn_like(x0),
                 torch.randint(0, 1000, (batch,), device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warm_s = run(warmup + (TrainStep.WARMUP + 1 if graph else 0))  # graphs: capture included
    if graph and not step.replaying:
        raise RuntimeError("CUDA graph capture failed (see the warning above)")
    return batch * steps / run(steps), warm_s


def run_variant(args, device, arch, name, threads):
    """One speed option (VARIANTS) of one shape (ARCHS) of args.preset -> its results row."""
    batch, cl, comp, graph, precision, n_threads = (*VARIANTS[name], "auto", 0)[:6]
    torch.set_num_threads(n_threads or threads)
    net = seed0_model(args.preset, **ARCHS[arch])
    gflop = flops_per_image(net) / 1e9
    params = sum(p.numel() for p in net.parameters()) / 1e6
    try:
        ips, warm = bench(net, device, batch, cl, comp, graph, args.warmup, args.steps,
                          precision)
    except (RuntimeError, DataError) as e:  # e.g. a capture that fails: record, go on
        return {"error": str(e).strip().splitlines()[0][:500]}
    budget = max(0.0, BUDGET_S - warm) * ips  # compile and capture come out of the budget
    return {"arch": ARCHS[arch], "params_m": round(params, 2),
            "gflop_per_image_forward": round(gflop, 3), "batch_size": batch, "channels_last": cl,
            "compile": comp, "cuda_graph": graph, "precision": precision,
            "threads": n_threads or threads, "images_per_s": round(ips, 1),
            "achieved_gflop_per_s": round(3 * gflop * ips, 1), "warmup_seconds": round(warm, 1),
            "images_in_10_min": round(budget)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                    help="default: the CPU variants on a CPU, the others elsewhere")
    ap.add_argument("--archs", nargs="+", default=["preset"], choices=list(ARCHS),
                    help="shapes of the preset's UNet, each run with every variant")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tag", default="",
                    help="suffix of the results file name, so a rerun keeps an earlier file")
    args = ap.parse_args()
    device = resolve_device(args.device)
    speed_up_cuda(device)
    args.variants = args.variants or [v for v in VARIANTS
                                      if (v in CPU_VARIANTS) == (device.type == "cpu")]
    gflop = flops_per_image(build_model(args.preset)) / 1e9
    out = ROOT / "results" / f"train-variants-{args.preset}-{device_tag(device)}{args.tag}.json"
    res = {"bench": "train variants", "preset": args.preset,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "host": host(device),
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "command": command_line(),
           "timed_steps": args.steps, "warmup_steps": args.warmup,
           "gflop_per_image_forward": round(gflop, 3), "variants": {}}
    if device.type == "cuda" and any(VARIANTS[v][3] for v in args.variants):
        try:
            curves = check_graph(args.preset, device)
            diff = max(abs(a - b) / abs(a) for a, b in zip(curves["eager"], curves["graph"]))
            res["graph_check"] = {**curves, "max_rel_diff": round(diff, 5)}
            print(f"CUDA graph (replayed: {curves['replayed']}) vs eager, same batches: losses "
                  f"differ by at most {diff:.2%}")
        except RuntimeError as e:
            res["graph_check"] = {"error": str(e).strip().splitlines()[0][:500]}
            print(f"CUDA graph check failed: {res['graph_check']['error']}")
        write_json(out, res)
    print(f"{'variant':34s} {'params':>7s} {'img/s':>9s} {'GFLOP/s':>8s} {'warm-up s':>10s} "
          f"{'images in 10 min':>17s}")
    threads = torch.get_num_threads()
    for arch in args.archs:
        for name in args.variants:
            key = name if arch == "preset" else f"{arch}, {name}"
            res["variants"][key] = row = run_variant(args, device, arch, name, threads)
            if "error" in row:
                print(f"{key:34s} failed: {row['error'][:200]}", flush=True)
            else:
                print(f"{key:34s} {row['params_m']:6.2f}M {row['images_per_s']:9.1f} "
                      f"{row['achieved_gflop_per_s']:8.0f} {row['warmup_seconds']:10.1f} "
                      f"{row['images_in_10_min']:17d}", flush=True)
            write_json(out, res)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    run_cli(main)
