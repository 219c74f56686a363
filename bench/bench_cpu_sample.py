"""`python sample.py && python evaluate.py` with the shipped weights, timed on this machine, and
checked against the seed-0 accuracy of the speedrun that trained them (within one label per
file: the speedrun sampled from its float32 checkpoint, possibly on another device; the shipped
weights are its float16 export).

    python bench/bench_cpu_sample.py                  # results/cpu-sample-cpu.json
    python bench/bench_cpu_sample.py --preset xfast   # results/cpu-sample-xfast-untrained-cpu.json

The reference is the results file that the shipped weights' sample_config.json names (--speedrun
overrides it).

Both scripts run as subprocesses exactly as a user runs them (defaults: shipped weights, the
sampler settings in weights/ddpm/sample_config.json); only the output folder is a temporary one.
--preset times sample.py alone with untrained fp16 weights of a preset, saved as the shipped
ones are, with the shipped sampler settings: what a candidate recipe would cost here before a
GPU run trains it (the cost does not depend on the weights' values).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataloader import (TEST_JSONS, DataError, _rel, command_line, host,  # noqa: E402
                        load_conditions, load_json, repo_path, run_cli, write_json)
from model import (PRESETS, WEIGHTS_DIR, build_model, count_params,  # noqa: E402
                   flops_per_image, make_noise_scheduler, save_fp16)
from sample import SAMPLE_CONFIG  # noqa: E402


def shipped_speedrun():
    """The results file that scored the shipped weights, as their sample_config.json says."""
    path = WEIGHTS_DIR / SAMPLE_CONFIG
    name = load_json(path).get("speedrun")
    if not name:
        raise DataError(f"{_rel(path)}: names no speedrun results file (expected a \"speedrun\" "
                        "key, written by speedrun.py --ship); pass --speedrun")
    return repo_path(name)


def untrained_weights(preset, folder):
    """Random weights of a preset, saved as the shipped ones are (fp16 shards, scheduler and
    sampler settings): sampling costs the same whatever the weights' values."""
    net = build_model(preset)
    info = {"preset": preset, "params": count_params(net),
            "gflop_per_image": round(flops_per_image(net) / 1e9, 2)}
    save_fp16(net, make_noise_scheduler().config, folder)
    shutil.copy(WEIGHTS_DIR / SAMPLE_CONFIG, folder)
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--speedrun", type=Path, default=None,
                    help="the GPU run whose seed-0 accuracy the shipped weights must reproduce "
                         "(default: the one weights/ddpm/sample_config.json names)")
    ap.add_argument("--preset", choices=list(PRESETS), default=None,
                    help="time sample.py with untrained weights of this preset (no accuracy check)")
    args = ap.parse_args()
    ref = None if args.preset else load_json(args.speedrun or shipped_speedrun())["seed0_from_png"]
    res = {"bench": "cpu sample", "device": args.device, "host": host(args.device),
           "cpu_count": os.cpu_count(),
           "loadavg_1m_at_start": os.getloadavg()[0], "python": platform.python_version(),
           "command": command_line()}
    with tempfile.TemporaryDirectory() as tmp:
        images, flags = Path(tmp) / "images", ["--device", args.device]
        if args.preset:
            res.update(untrained_weights(args.preset, Path(tmp) / "weights"))
            flags += ["--checkpoint", str(Path(tmp) / "weights")]
        else:  # what a clean clone's sample.py takes; here runs/ may hold newer checkpoints
            flags += ["--checkpoint", "weights/ddpm"]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "sample.py", *flags, "--out", str(images)], cwd=ROOT,
                       check=True)
        res["sample_seconds"] = round(time.perf_counter() - t0, 1)
        res["under_10_minutes"] = res["sample_seconds"] <= 600
        name = f"cpu-sample-{args.preset}-untrained" if args.preset else "cpu-sample"
        print(f"\nsample.py{f', untrained {args.preset}' if args.preset else ''}: "
              f"{res['sample_seconds']:.0f} s on {args.device} (target <= 600 s)")
        if ref is not None:
            metrics = Path(tmp) / "metrics.json"
            subprocess.run([sys.executable, "evaluate.py", "--device", args.device, "--images",
                            str(images), "--json", str(metrics)], cwd=ROOT, check=True)
            files = json.loads(metrics.read_text())["files"]
            res["accuracy"], res["speedrun_seed0_accuracy"], res["labels_apart"] = {}, {}, {}
            for path in TEST_JSONS:
                got, want = files[path.name]["accuracy"], ref[path.stem]
                total = sum(map(len, load_conditions(path)))
                res["accuracy"][path.stem], res["speedrun_seed0_accuracy"][path.stem] = got, want
                res["labels_apart"][path.stem] = round(abs(got - want) * total)
                print(f"{path.stem}: {got:.4f} here vs {want:.4f} in the speedrun "
                      f"({res['labels_apart'][path.stem]} labels apart)")
            res["reproduced_within_one_label"] = all(v <= 1 for v in res["labels_apart"].values())
    out = ROOT / "results" / f"{name}-{args.device}.json"
    write_json(out, res)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    run_cli(main)
