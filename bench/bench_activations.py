"""Is a network blown up? The size of the UNet's residual stream after each of its stages, for
one or more checkpoints on the same fixed batch.

    python bench/bench_activations.py                           # the shipped weights
    python bench/bench_activations.py --checkpoint weights/ddpm runs/NAME/checkpoint-2554/model

A healthy network keeps the stream near unit size from stage to stage. A blown-up one grows it
by orders of magnitude: the group norms hide that from the loss but scale every gradient down
with it, so the loss stays high and the network no longer learns (train.py stops such a run:
check_diverging). The batch: 8 random images, labels and three-object layouts (seed 0) at
training timestep 500, bf16 autocast as in training.
-> results/activations-<device>.json
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench_train_variants import random_batch  # noqa: E402
from dataloader import (ROOT, _rel, command_line, device_tag, host, portable_path,  # noqa: E402
                        resolve_device, run_cli, write_json)
from sample import load_model  # noqa: E402


def stages(unet):
    """(name, module) of the UNet's stages in the order the stream passes them."""
    out = [("conv_in", unet.conv_in)]
    out += [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    out += [("mid_block", unet.mid_block)]
    out += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    return out + [("conv_out", unet.conv_out)]


@torch.no_grad()
def stream_sizes(net, device):
    """{stage: std of its output} of net on the fixed batch."""
    sizes, hooks = {}, []
    for name, module in stages(net.unet):
        def hook(m, args, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            sizes[name] = float(out.float().std())
        hooks.append(module.register_forward_hook(hook))
    torch.manual_seed(0)
    x0, y, layout = random_batch(8, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        net(x0.clamp(-1, 1), torch.full((8,), 500, device=device), y, layout)
    for h in hooks:
        h.remove()
    return sizes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", nargs="+", type=Path, default=[ROOT / "weights" / "ddpm"],
                    help="weights folders, checkpoints or runs (sample.load_model reads them)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    res = {"bench": "activations", "device": device_tag(device), "host": host(device),
           "command": command_line(), "batch": "8 random images, seed 0, timestep 500",
           "checkpoints": {}}
    for ckpt in args.checkpoint:
        net, _ = load_model(ckpt, device)
        sizes = stream_sizes(net, device)
        res["checkpoints"][portable_path(ckpt)] = {k: round(v, 4) for k, v in sizes.items()}
        print(f"{portable_path(ckpt)}: " + ", ".join(f"{k} {v:.3g}" for k, v in sizes.items()))
    out = args.out or ROOT / "results" / f"activations-{device_tag(device)}.json"
    write_json(out, res)
    print(f"wrote {_rel(out)}")


if __name__ == "__main__":
    run_cli(main)
