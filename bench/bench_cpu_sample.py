"""`python sample.py && python evaluate.py` with the shipped weights, timed on this machine, and
checked against the GPU speedrun's seed-0 accuracy (within one label per file: CPU float32 and
GPU bf16 round differently).

    python bench/bench_cpu_sample.py          # -> results/cpu-sample-<device>.json

Both scripts run as subprocesses exactly as a user runs them (defaults: shipped weights, the
sampler settings in weights/ddpm/sample_config.json); only the output folder is a temporary one.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataloader import (TEST_JSONS, command_line, load_conditions, run_cli,  # noqa: E402
                        write_json)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--speedrun", type=Path, default=ROOT / "results" / "speedrun-h200.json",
                    help="the GPU run whose seed-0 accuracy the shipped weights must reproduce")
    args = ap.parse_args()
    ref = json.loads(args.speedrun.read_text())["seed0_from_png"]
    res = {"bench": "cpu sample", "device": args.device, "cpu_count": os.cpu_count(),
           "loadavg_1m_at_start": os.getloadavg()[0], "python": platform.python_version(),
           "command": command_line()}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "sample.py", "--device", args.device, "--out", tmp],
                       cwd=ROOT, check=True)
        res["sample_seconds"] = round(time.perf_counter() - t0, 1)
        metrics = Path(tmp) / "metrics.json"
        subprocess.run([sys.executable, "evaluate.py", "--device", args.device, "--images", tmp,
                        "--json", str(metrics)], cwd=ROOT, check=True)
        files = json.loads(metrics.read_text())["files"]
    res["accuracy"], res["gpu_seed0_accuracy"], res["labels_apart"] = {}, {}, {}
    for path in TEST_JSONS:
        got, want = files[path.name]["accuracy"], ref[path.stem]
        total = sum(map(len, load_conditions(path)))
        res["accuracy"][path.stem], res["gpu_seed0_accuracy"][path.stem] = got, want
        res["labels_apart"][path.stem] = round(abs(got - want) * total)
    res["reproduced_within_one_label"] = all(v <= 1 for v in res["labels_apart"].values())
    res["under_10_minutes"] = res["sample_seconds"] <= 600
    print(f"\nsample.py: {res['sample_seconds']:.0f} s on {args.device} (target <= 600 s)")
    for k in res["accuracy"]:
        print(f"{k}: {res['accuracy'][k]:.4f} here vs {res['gpu_seed0_accuracy'][k]:.4f} on the "
              f"GPU ({res['labels_apart'][k]} labels apart)")
    out = ROOT / "results" / f"cpu-sample-{args.device}.json"
    write_json(out, res)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    run_cli(main)
