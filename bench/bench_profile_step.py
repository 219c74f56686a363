"""Where a training step's time goes: train.py's TrainStep (loss, backward, clip, AdamW) under
torch.profiler, its operators' own time grouped into kinds.

    python bench/bench_profile_step.py                  # ground-shape, batch 16, bf16 autocast
    python bench/bench_profile_step.py --batch 32 --tag=-b32

The step is bench_train_variants.make_step's (as train.py builds it) on random data with three
objects per image and a weight map, as --fg-weight gives. Each operator's self time (without
its children) lands in exactly one kind, so the kinds add up to the profiled time.
-> results/profile-step-<preset>-<device><tag>.json
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_train_variants import make_step, random_batch, seed0_model  # noqa: E402
from dataloader import (ROOT, _rel, command_line, device_tag, host, resolve_device,  # noqa: E402
                        run_cli, write_json)
from model import flops_per_image  # noqa: E402

# kind: substrings of operator names, matched in this order (the first match wins)
KINDS = {
    "convolution backward": ("convolution_backward",),
    "convolution forward": ("convolution",),
    "copies and casts (autocast, memory layouts)": ("copy_", "_to_copy", "clone", "contiguous"),
    "attention": ("scaled_dot_product",),
    "matmul (linear layers)": ("::mm", "addmm", "bmm"),
    "group norm": ("group_norm",),
    "SiLU": ("silu",),
}
OTHER = "elementwise and other (loss, AdamW, gradient clip)"


def kind_of(name):
    return next((k for k, keys in KINDS.items() if any(s in name for s in keys)), OTHER)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="ground-shape")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10, help="profiled steps (after 5 warm-up)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--out", type=Path, default=None, help="results file (default: see above)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    net = seed0_model(args.preset)
    gflop = flops_per_image(net) / 1e9
    step = make_step(net, device, precision=args.precision)
    x0, y, layout = random_batch(args.batch, device)
    weight = torch.ones(args.batch, 1, 64, 64, device=device)  # as --fg-weight passes one

    def one():
        step(x0, y, layout, torch.randn_like(x0),
             torch.randint(0, 1000, (args.batch,), device=device), weight)

    for _ in range(5):
        one()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one()
    unprofiled = (time.perf_counter() - t0) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            one()
    kinds = dict.fromkeys([*KINDS, OTHER], 0.0)
    for e in prof.key_averages():
        kinds[kind_of(e.key)] += e.self_cpu_time_total / 1e3 / args.steps  # ms per step
    total = sum(kinds.values())
    res = {"bench": "profile step", "preset": args.preset, "batch_size": args.batch,
           "precision": args.precision, "device": device_tag(device), "host": host(device),
           "versions": {"torch": torch.__version__}, "command": command_line(),
           "steps": args.steps, "gflop_per_image_forward": round(gflop, 3),
           "step_ms_unprofiled": round(unprofiled * 1e3, 1),
           "images_per_s_unprofiled": round(args.batch / unprofiled, 1),
           "step_ms_profiled": round(total, 1),
           "kinds_ms": {k: round(v, 1) for k, v in kinds.items()}}
    print(f"{args.preset}, batch {args.batch}, {args.precision}: {unprofiled * 1e3:.0f} ms per "
          f"step unprofiled ({args.batch / unprofiled:.1f} images/s), {total:.0f} ms profiled")
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {k:55s} {v:7.1f} ms  {v / total:6.1%}")
    out = args.out or ROOT / "results" / f"profile-step-{args.preset}-{device_tag(device)}" \
                                         f"{args.tag}.json"
    write_json(out, res)
    print(f"wrote {_rel(out)}")


if __name__ == "__main__":
    run_cli(main)
