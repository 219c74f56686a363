"""Training throughput of one preset under speed options (batch size, channels_last,
torch.compile), the same training step as train.py (bf16 autocast on CUDA, fused AdamW).

    python bench/bench_train_variants.py --device cuda     # -> results/train-variants-<gpu>.json

The JSON is rewritten after every variant, so a run cut short keeps what it measured.
"""
import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dataloader import ROOT, device_tag, resolve_device, run_cli, write_json  # noqa: E402
from model import build_model, make_noise_scheduler  # noqa: E402
from train import diffusion_loss  # noqa: E402

VARIANTS = {  # name: (batch size, channels_last, compile)
    "b256": (256, False, False),
    "b256 channels_last": (256, True, False),
    "b512": (512, False, False),
    "b256 compile": (256, False, True),
}


def bench(preset, device, batch, channels_last, compile_, warmup, steps):
    torch.manual_seed(0)
    net = build_model(preset).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    model = torch.compile(net) if compile_ else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    sched = make_noise_scheduler(prediction_type="v_prediction")
    ac = sched.alphas_cumprod.to(device)
    snr = ac / (1 - ac)
    x0 = torch.randn(batch, 3, 64, 64, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 24, device=device) < 0.1).float()
    amp = device.type == "cuda"

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = diffusion_loss(model, sched, x0, y, noise, t, snr, 5.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0), warm_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = ROOT / "results" / f"train-variants-{args.preset}-{device_tag(device)}.json"
    res = {"bench": "train variants", "preset": args.preset,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
           "timed_steps": args.steps, "warmup_steps": args.warmup, "variants": {}}
    print(f"{'variant':22s} {'img/s':>9s} {'warm-up s':>10s}")
    for name in args.variants:
        batch, cl, comp = VARIANTS[name]
        ips, warm = bench(args.preset, device, batch, cl, comp, args.warmup, args.steps)
        res["variants"][name] = {"batch_size": batch, "channels_last": cl, "compile": comp,
                                 "images_per_s": round(ips, 1), "warmup_seconds": round(warm, 1)}
        print(f"{name:22s} {ips:9.0f} {warm:10.1f}", flush=True)
        write_json(out, res)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    run_cli(main)
