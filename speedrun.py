"""Speedrun: render the training set, train for a wall-clock budget, sample both benchmark files
for 5 seeds from the one final EMA checkpoint, score them with the shipped judge, and write
results/speedrun-<device>.json.

    python speedrun.py                  # 10-minute training budget (one GPU)
    python speedrun.py --short          # ~2 minutes, for ablations
    python speedrun.py --minutes 4 --ship   # also export the EMA weights to weights/ddpm (fp16)
    python speedrun.py --short --tag=-fast --preset fast   # an ablation
    python speedrun.py --resume latest  # finish a run that was cut short (same budget and tag)

Flags this script does not know go to train.py, after the recipe (RECIPE below, and GPU_RECIPE
when it trains on a GPU).

The guidance scale is chosen on a validation set of random conditions (never on the benchmark
files), and all seeds come from the one final checkpoint: no checkpoint or seed picking.
"""
import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import dataloader as dl

ROOT = dl.ROOT
# The speedrun's training recipe on a GPU: train.py flags that come before the user's own (the
# last of a repeated flag wins, so e.g. `--lr 1e-3` or `--no-lr-by-time` override them).
# Time-annealed cosine LR: the schedule ends with the budget, whatever the step rate. xattn is
# the best label-only preset of the GPU ablations (README).
RECIPE = ["--preset", "xattn", "--batch-size", "256", "--lr", "5e-4", "--lr-by-time",
          "--max-steps", "1000000", "--warmup-steps", "300", "--log-every", "200",
          "--save-every", "2000"]
# On a GPU the whole step is one CUDA graph: 3875 against 2616 images/s at batch 256 on an H200,
# with the same losses (results/train-variants-default-h200-graph.json). --no-cuda-graph undoes it.
GPU_RECIPE = ["--cuda-graph"]
# On a CPU (python speedrun.py --device cpu): the grounded model (docs/grounded.md) in bf16
# autocast, which this project's CPUs run in hardware, at a batch small enough for thousands of
# steps in an hour; fewer validation conditions, since each costs CPU time.
CPU_RECIPE = ["--preset", "ground", "--batch-size", "32", "--lr", "1e-3", "--lr-by-time",
              "--max-steps", "1000000", "--warmup-steps", "200", "--log-every", "50",
              "--save-every", "500", "--mixed-precision", "bf16", "--eval-conditions", "64"]
CPU_SAMPLING = {"val_conditions": 96, "guidance_grid": [1.5, 2.0, 3.0]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=None,
                   help="training wall-clock budget (default: 10 on a GPU, 40 on a CPU, or 2 "
                        "with --short)")
    p.add_argument("--short", action="store_true",
                   help="short mode for ablations: a 2-minute budget, -short in the file names")
    p.add_argument("--run-name", default=None, help="default: speedrun-<device>[-short]")
    p.add_argument("--tag", default="",
                   help="suffix of the results and run names, e.g. --tag=-xattn (ablations)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--sampler", default="dpm++")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", default="auto",
                   help="a number, or 'auto': the best of --guidance-grid on validation conditions")
    p.add_argument("--guidance-grid", type=float, nargs="+", default=None,
                   help="default: 1 2 3 4 5 (on a CPU: 1.5 2 3)")
    p.add_argument("--val-conditions", type=int, default=None,
                   help="random 1-3-object conditions used to choose the guidance scale "
                        "(default: 256, on a CPU 96)")
    p.add_argument("--ddpm-baseline", type=int, nargs="?", const=1000, default=0, metavar="STEPS",
                   help="also score DDPM (1000 steps; fewer only to rehearse) without guidance "
                        "(seed 0), for the ablation table")
    p.add_argument("--judge", default=None, help="judge checkpoint (default: the shipped one)")
    p.add_argument("--ship", action="store_true",
                   help="export the final EMA weights (fp16 shards) to weights/ddpm and copy the "
                        "seed-0 images to results/speedrun-<device>/")
    p.add_argument("--device", default="auto")
    p.add_argument("--results-dir", default=str(ROOT / "results"))
    args, train_argv = p.parse_known_args(argv)
    return args, train_argv  # unknown flags go to train.py (e.g. --preset, --lr, --batch-size)


def train_flags(run_name, minutes, device, train_argv):
    """train.py's flags for a speedrun: the budget, then RECIPE, then the user's own. A resumed
    run (--resume latest: one cut short by a time limit) keeps the recipe in its config.json,
    so RECIPE is left out; its --max-minutes counts the training time it already had."""
    resume = any(a == "--resume" or a.startswith("--resume=") for a in train_argv)
    kind = dl.resolve_device(device).type
    recipe = [] if resume else (RECIPE + GPU_RECIPE if kind == "cuda" else
                                CPU_RECIPE if kind == "cpu" else RECIPE)
    return ["--run-name", run_name, "--max-minutes", str(minutes), "--device", str(device),
            *recipe, *train_argv]


def versions():
    import accelerate
    import diffusers
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "cuda": torch.version.cuda}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    args, train_argv = parse_args(argv)
    import evaluate
    import sample
    import train
    from evaluator import by_objects, by_objects_text, evaluation_model, miss_kinds, per_image

    device = dl.resolve_device(args.device)
    dev = dl.device_tag(device)
    cpu = device.type == "cpu"
    minutes = args.minutes or (2.0 if args.short else 40.0 if cpu else 10.0)
    grid = args.guidance_grid or (CPU_SAMPLING["guidance_grid"] if cpu else [1, 2, 3, 4, 5])
    n_val = args.val_conditions or (CPU_SAMPLING["val_conditions"] if cpu else 256)
    run_name = args.run_name or f"speedrun-{dev}{'-short' if args.short else ''}{args.tag}"
    command = dl.command_line()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else dev,
              "command": command, "versions": versions(), "budget_minutes": minutes}
    results_dir = Path(args.results_dir)
    path = results_dir / f"speedrun-{dev}{'-short' if args.short else ''}{args.tag}.json"

    phases = result["phase_seconds"] = {}  # wall seconds per stage: what a GPU call must fit
    clock = [time.time()]

    def lap(name):
        now = time.time()
        phases[name] = round(now - clock[0], 1)
        clock[0] = now

    def save():  # after every stage, so a run cut short keeps what it measured
        result["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        dl.write_json(path, result)

    try:
        judge = evaluation_model(checkpoint=args.judge, device=device)
    except dl.DataError as e:  # still worth training (and shipping); score later
        print(f"warning: no judge ({e}); training only, score later with evaluate.py")
        judge = None
    lap("judge")

    # 1. The training set, train.py's --data-root and --train-json (the synthetic default),
    #    rendered on the device when missing.
    cfg = train.parse_args(train_flags(run_name, minutes, args.device, train_argv))
    spec_path = dl.repo_path(cfg.train_json)
    dl.ensure_images(dl.repo_path(cfg.data_root), dl.load_spec(spec_path), spec_path,
                     device=str(device))
    lap("data")  # phase_seconds["data"]: older results files call it data_seconds

    # 2. Train for the budget. Extra flags pass through to train.py.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    run_dir = Path(train.train(cfg))
    train_seconds = time.time() - t0
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in log if "step" in r)
    speeds = [r["images_per_s"] for r in log if "images_per_s" in r][1:]  # after warm-up
    end = [r for r in log if r.get("event") == "end"][-1]
    loop_s = end["elapsed_s"]
    result.update(
        run_dir=str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
        train_config=json.loads((run_dir / "config.json").read_text()),
        train_minutes=round(loop_s / 60, 2), train_wall_minutes_incl_setup=round(
            train_seconds / 60, 2), steps=steps, images_seen=steps * cfg.batch_size,
        train_images_per_s=round(float(np.median(speeds)) if speeds else
                                 steps * cfg.batch_size / loop_s, 1),
        cuda_graph_replayed=end.get("cuda_graph_replayed"),
        started_at_steps=[r["step"] for r in log if r.get("event") == "start"],  # [0]: no resume
        learning_curve=[{"step": r["step"], "train_minutes": round(r["elapsed_s"] / 60, 2),
                         "val_accuracy": round(r["eval_val_acc"], 4),
                         "val_accuracy_by_objects": r.get("eval_val_by_objects")}
                        for r in log if "eval_val_acc" in r],  # train.py --eval-every
        peak_gpu_memory_gb=(round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                            if device.type == "cuda" else None))
    print(f"trained {steps} steps in {loop_s / 60:.2f} min ({result['train_images_per_s']} img/s)")

    ckpt = sample.latest_checkpoint(run_dir)
    if args.ship:  # before scoring, so the weights survive whatever happens next
        import model as model_lib

        model_lib.export_fp16(ckpt, ROOT / "weights" / "ddpm")
    lap("train")  # with its setup, its --eval-every evaluations and the last checkpoint
    save()
    if judge is None:
        return result
    net, sched_cfg = sample.load_model(ckpt, device, ema=True)
    batch = 512 if device.type == "cuda" else 64  # a whole condition file in one batch on a GPU

    def generate(conds, seed, guidance, sampler=args.sampler, steps=args.steps):
        labels = dl.encode_batch(conds)
        synchronize(device)
        t = time.time()
        images = sample.generate(net, labels, sampler=sampler, steps=steps, guidance=guidance,
                                 seed=seed, device=device, scheduler_config=sched_cfg,
                                 batch_size=batch, progress=False)
        synchronize(device)
        # Score exactly what a PNG holds: quantise to uint8 first.
        return dl.to_float(dl.to_uint8(images.float().cpu())), labels, time.time() - t

    # 3. Guidance scale from validation conditions (seed 10**6, disjoint from the benchmark seeds).
    if args.guidance == "auto":
        val = dl.validation_conditions(n_val)
        sweep = {}
        for g in grid:
            images, labels, _ = generate(val, 10**6, g)
            sweep[g] = judge.eval(images, labels)
            print(f"validation guidance {g}: accuracy {sweep[g]:.4f}")
        guidance = max(sweep, key=lambda g: (round(sweep[g], 4), -g))
        result["guidance_sweep_validation"] = {str(g): round(a, 4) for g, a in sweep.items()}
    else:
        guidance = float(args.guidance)
    result.update(sampler=args.sampler, sampler_steps=args.steps, guidance=guidance)
    lap("guidance_sweep")
    if args.ship:  # sample.py's defaults for the shipped weights: what they were scored with,
        # and the results file that scored them (bench_cpu_sample.py checks against it)
        dl.write_json(ROOT / "weights" / "ddpm" / sample.SAMPLE_CONFIG,
                      {"sampler": args.sampler, "steps": args.steps, "guidance": guidance,
                       "speedrun": dl.portable_path(path)})

    # 4. Five seeds x both benchmark files, from the one final EMA checkpoint.
    files = {p.stem: dl.load_conditions(p) for p in dl.TEST_JSONS}
    acc = {k: [] for k in files}
    rows = {k: [] for k in files}  # per-image judgements, all seeds
    seconds, generated = [], {k: [] for k in files}
    for seed in args.seeds:
        t_seed = 0.0
        for name, conds in files.items():
            images, labels, dt = generate(conds, seed, guidance)
            t_seed += dt
            scores = judge.scores(images)  # once: the lab's accuracy and the misses
            acc[name].append(round(judge.compute_acc(scores, labels), 4))
            rows[name] += per_image(scores, labels)
            generated[name].append(images)
        seconds.append(round(t_seed, 3))
        print(f"seed {seed}: " + "  ".join(f"{k} {v[-1]:.4f}" for k, v in acc.items())
              + f"  (sampled both files in {t_seed:.2f} s)")
    result["accuracy"] = acc
    result["accuracy_mean"] = {k: round(float(np.mean(v)), 4) for k, v in acc.items()}
    result["accuracy_std"] = {k: round(float(np.std(v)), 4) for k, v in acc.items()}
    result["sampling_seconds_both_files"] = seconds
    misses = {k: miss_kinds(v) for k, v in rows.items()}  # what the missed objects became
    result["misses_all_seeds"] = misses
    result["accuracy_by_objects_all_seeds"] = {k: by_objects(v) for k, v in rows.items()}
    print("missed objects, all seeds (wrong shape / wrong color / neither; images with too many "
          "/ too few objects): " + "  ".join(
              f"{k} {m['wrong_shape']}/{m['wrong_color']}/{m['neither']}; "
              f"{m['more_objects']}/{m['fewer_objects']}" for k, m in misses.items()))
    print("accuracy by number of objects, all seeds: " + "  ".join(
        f"{k} {by_objects_text(b, 4)}" for k, b in result["accuracy_by_objects_all_seeds"].items()))
    lap("seeds")
    save()
    # FD of all seeds' images of a file against evaluate.py's fixed renders of that file
    result["fd"] = {k: round(evaluate.fd_against_renders(judge, torch.cat(v), files[k]), 3)
                    for k, v in generated.items()}
    # ... and what as many renders of another seed score: the FD of a perfect generator
    result["fd_floor"] = {k: round(evaluate.fd_floor(judge, files[k], len(args.seeds)), 3)
                          for k in files}
    lap("fd")

    # 5. Seed 0 written by sample.py itself (PNGs, grids, denoising strip) and scored from disk,
    #    the same path as `python sample.py && python evaluate.py`.
    out = ROOT / "results" / f"speedrun-{dev}{args.tag}" if args.ship else run_dir / "images"
    sample.main(["--checkpoint", str(ckpt), "--out", str(out), "--sampler", args.sampler,
                 "--steps", str(args.steps), "--guidance", str(guidance), "--seed", "0",
                 "--device", str(args.device)])
    result["seed0_from_png"] = {p.stem: evaluate.score_folder(judge, out / p.stem, p)["accuracy"]
                                for p in dl.TEST_JSONS}
    result["images"] = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)
    lap("seed0_pngs")
    save()

    # 6. Ablation row: the seed report's sampler, 1000-step DDPM without guidance. Both files in
    #    one batch: 1000 small steps are launch-bound, so this halves the time (new_test's
    #    images get the noise of indices 32-63 of seed 0).
    if args.ddpm_baseline:
        both = [c for conds in files.values() for c in conds]
        images, labels, dt = generate(both, 0, 1.0, sampler="ddpm", steps=args.ddpm_baseline)
        row, start = {}, 0
        for name, conds in files.items():
            part = slice(start, start + len(conds))
            row[name] = round(judge.eval(images[part], labels[part]), 4)
            start += len(conds)
        result["ddpm1000_no_guidance_seed0"] = {**row, "steps": args.ddpm_baseline,
                                                "seconds_both_files": round(dt, 2)}
        lap("ddpm")

    save()
    print(f"\n| file | accuracy mean +- std over {len(args.seeds)} seeds | FD | FD of renders |")
    print("|---|---|---|---|")
    for k in files:
        print(f"| {k}.json | {result['accuracy_mean'][k]:.4f} +- {result['accuracy_std'][k]:.4f} "
              f"| {result['fd'][k]} | {result['fd_floor'][k]} |")
    means = result["accuracy_mean"].values()
    print(f"mean of the files' means: {sum(means) / len(means):.4f}")  # what ablations compare
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    dl.run_cli(main)
