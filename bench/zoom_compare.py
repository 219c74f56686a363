"""Generated objects next to rendered ones, zoomed: the same conditions at the same positions.

    python bench/zoom_compare.py                                   # weights/ddpm
    python bench/zoom_compare.py --name "shipped (ground-shape)" --before runs/weights-before \
        --before-name "earlier (ground)"      # the picture in docs/; runs/weights-before holds
                                              # weights/ddpm of commit 8bde776

The first --conditions conditions of test.json are rendered (render.py, seed 0); their true
layouts are what the grounded model is told, so each generated image should show the same
objects in the same places. Each column is a 32x32 window around the objects, shown 5x with
nearest-neighbour pixels. -> docs/zoom_compare.png
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import render  # noqa: E402
import sample  # noqa: E402
from dataloader import (ROOT, TEST_JSONS, _rel, encode_batch, layout_tensor,  # noqa: E402
                        load_conditions, resolve_device, run_cli, to_uint8)

WINDOW = 32


def windows(images, layouts):
    """uint8 (N, 3, 64, 64) -> (N, 3, WINDOW, WINDOW) around each image's objects."""
    out = []
    for img, lay in zip(images, layouts):
        xy = lay[lay[:, 0] >= 0][:, 1:3].mean(0)
        x0, y0 = (int(min(max(v - WINDOW / 2, 0), 64 - WINDOW)) for v in xy.tolist())
        out.append(img[:, y0:y0 + WINDOW, x0:x0 + WINDOW])
    return torch.stack(out)


def generated(checkpoint, labels, layouts, device, seed):
    model, sched_cfg = sample.load_model(checkpoint, device)
    return to_uint8(sample.generate(model, labels, layouts=layouts, seed=seed,
                                    **sample.scored_settings(checkpoint),
                                    scheduler_config=sched_cfg, progress=False, device=device))


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=sample.WEIGHTS_DIR)
    ap.add_argument("--before", type=Path, default=None, help="older weights for a third row")
    ap.add_argument("--name", default="shipped", help="the --checkpoint row's label")
    ap.add_argument("--before-name", default="before", help="the --before row's label")
    ap.add_argument("--conditions", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "zoom_compare.png")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    conds = load_conditions(TEST_JSONS[0])[:args.conditions]
    spec = {f"zoom-{i}": c for i, c in enumerate(conds)}
    renders = render.render_tensor(spec, seed=args.seed, device=str(device)).cpu()
    layouts = layout_tensor(render.spec_layouts(spec, args.seed), spec)
    labels = encode_batch(conds, "test.json")
    rows = {"rendered": renders,
            args.name: generated(args.checkpoint, labels, layouts, device, args.seed)}
    if args.before:
        rows[args.before_name] = generated(args.before, labels, layouts, device, args.seed)
    n = len(conds)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.9 * n, 2.15 * len(rows)), dpi=100,
                             squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c, win in enumerate(windows(imgs, layouts)):
            ax = axes[r, c]
            ax.imshow(win.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(conds[c]), fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {_rel(args.out)}")


if __name__ == "__main__":
    run_cli(main)
