"""How much detail the judge needs: its accuracy on renders of the 64 benchmark conditions after
a Gaussian blur, and after squeezing to a lower resolution and back to 64x64; and how far the same
changes move evaluate.py's Frechet distance (judge features, against its 16 renders of each
condition), which the clean renders set the floor of.

    python bench/bench_judge_resolution.py     # -> results/resolution-judge-<device>.json

If the judge still reads the squeezed renders, a generator that gets the objects right at that
resolution scores as well as a sharp one: what it lacks is the right objects, not fine detail.
The FD column says what else, beyond the objects, that distance responds to.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.nn.functional as F  # noqa: E402
from torchvision.transforms.functional import gaussian_blur  # noqa: E402

from dataloader import (ROOT, TEST_JSONS, command_line, device_tag, encode_batch,  # noqa: E402
                        load_conditions, resolve_device, run_cli, to_float, write_json)
from evaluate import fd_against_renders, reference_renders  # noqa: E402
from evaluator import evaluation_model  # noqa: E402

SEED = 7  # not evaluate.py's FD seed: other scenes than the FD references


def squeeze(x, size):
    """64x64 -> size x size (antialiased) -> 64x64 (bilinear)."""
    small = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-1], mode="bilinear", align_corners=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--per-condition", type=int, default=4, help="renders per condition")
    ap.add_argument("--blur", type=float, nargs="+", default=[0.7, 1.0, 1.5, 2.0],
                    help="Gaussian blur sigmas (pixels)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 32, 24, 16],
                    help="resolutions to squeeze to and back")
    args = ap.parse_args()
    device = resolve_device(args.device)
    judge = evaluation_model(device=device)
    conds = [c for p in TEST_JSONS for c in load_conditions(p)]
    x = to_float(reference_renders(conds, args.per_condition, SEED, device=device))
    labels = encode_batch([c for c in conds for _ in range(args.per_condition)])
    versions = {"clean": x}
    versions.update({f"blur sigma {s:g} px": gaussian_blur(x, 2 * round(2 * s) + 1, s)
                     for s in args.blur})
    versions.update({f"squeezed to {r}x{r} and back": squeeze(x, r) for r in args.sizes})
    rows = {what: judge.eval(v, labels) for what, v in versions.items()}
    # against evaluate.py's references (its seed, 16 renders per condition), as generated images
    fd = {what: fd_against_renders(judge, v, conds) for what, v in versions.items()}
    print(f"{'renders of the benchmark conditions':40s} accuracy      FD")
    for what, acc in rows.items():
        print(f"{what:40s} {acc:.4f} {fd[what]:8.1f}")
    out = ROOT / "results" / f"resolution-judge-{device_tag(device)}.json"
    write_json(out, {"bench": "judge resolution", "device": str(device), "images": len(x),
                     "command": command_line(),
                     "accuracy": {k: round(v, 4) for k, v in rows.items()},
                     "fd": {k: round(v, 2) for k, v in fd.items()}})
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    run_cli(main)
