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
files; accuracy, then FD on a tie), and all seeds come from the one final checkpoint: no
checkpoint or seed picking.
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
# On a GPU the whole step is one CUDA graph: more images/s with the same losses
# (results/train-variants-default-h200-graph.json). --no-cuda-graph undoes it.
GPU_RECIPE = ["--cuda-graph"]
# On a CPU (python speedrun.py --device cpu): train.py's defaults, which are the shipped model's
# recipe (TrainConfig: the grounded model, batch 16, bf16 autocast where the CPU computes it);
# fewer validation conditions for the guidance sweep, since each costs CPU time.
CPU_RECIPE = []
CPU_SAMPLING = {"val_conditions": 96, "guidance_grid": [1.0, 1.25, 1.5, 2.0]}


def parse_args(argv=None):
    # allow_abbrev=False: a train.py flag that prefixes one of these (--seed, --seeds) must reach
    # train.py, not be taken as an abbreviation
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
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
                   help="default: 1 2 3 4 5 (on a CPU: "
                        f"{' '.join(f'{g:g}' for g in CPU_SAMPLING['guidance_grid'])})")
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
    p.add_argument("--recipe", default="auto", choices=["auto", "gpu", "cpu"],
                   help="training recipe: the device's (auto), or the other one; --recipe cpu "
                        "--max-steps N on a GPU replays the CPU speedrun's N steps in seconds "
                        "(ablations at the CPU's budget)")
    p.add_argument("--device", default="auto")
    p.add_argument("--results-dir", default=str(ROOT / "results"))
    args, train_argv = p.parse_known_args(argv)
    return args, train_argv  # unknown flags go to train.py (e.g. --preset, --lr, --batch-size)


def train_flags(run_name, minutes, device, train_argv, recipe="auto"):
    """train.py's flags for a speedrun: the budget, then RECIPE, then the user's own. A resumed
    run (--resume latest: one cut short by a time limit) keeps the recipe in its config.json,
    so RECIPE is left out; its --max-minutes counts the training time it already had."""
    resume = any(a == "--resume" or a.startswith("--resume=") for a in train_argv)
    kind = {"auto": dl.resolve_device(device).type, "gpu": "cuda", "cpu": "cpu"}[recipe]
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


class Phases(dict):
    """Wall seconds per stage, each timed from the previous lap: what a GPU call must fit."""

    def __init__(self):
        super().__init__()
        self.t = time.time()

    def lap(self, name):
        now = time.time()
        self[name] = round(now - self.t, 1)
        self.t = now


def save(path, result):
    """After every stage, so a run cut short keeps what it measured."""
    result["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    dl.write_json(path, result)


def load_judge(checkpoint, device):
    """The judge, or None (one warning line): a run without one still trains and ships."""
    from evaluator import evaluation_model

    try:
        return evaluation_model(checkpoint=checkpoint, device=device)
    except dl.DataError as e:
        print(f"warning: no judge ({e}); training only, score later with evaluate.py")
        return None


def judge_record(judge):
    """{"checkpoint", "trained_on"}: a judge folder's training data, from its judge.json (None
    for a checkpoint that does not say, e.g. the lab's checkpoint.pth)."""
    cfg = judge.meta.get("config")
    ours = ["our renders"] if cfg and cfg.get("train_scenes", 1) else []
    return {"checkpoint": dl.portable_path(judge.checkpoint),
            "trained_on": ours + list(cfg.get("data") or []) if cfg else None}


def data_stage(cfg, device):
    """The training set (train.py's --data-root and --train-json), rendered when missing."""
    import render

    spec_path = dl.repo_path(cfg.train_json)
    render.ensure_images(dl.repo_path(cfg.data_root), dl.load_spec(spec_path), spec_path,
                         device=str(device))


def train_stage(cfg, device):
    """Train for the budget -> (run folder, its part of the results)."""
    import train

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    try:
        run_dir = Path(train.train(cfg))
    except train.NonFiniteLoss as e:  # one line, as train.py says it, and nothing scored
        raise dl.DataError(str(e)) from None
    return run_dir, training_results(run_dir, cfg, time.time() - t0, device)


def training_results(run_dir, cfg, wall_seconds, device):
    """What a run's log.jsonl and config.json say about its training."""
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in log if "step" in r)
    speeds = [r["images_per_s"] for r in log if "images_per_s" in r][1:]  # after warm-up
    end = [r for r in log if r.get("event") == "end"][-1]
    loop_s = end["elapsed_s"]
    part = dict(
        run_dir=str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
        train_config=json.loads((run_dir / "config.json").read_text()),
        train_minutes=round(loop_s / 60, 2),
        train_wall_minutes_incl_setup=round(wall_seconds / 60, 2), steps=steps,
        images_seen=steps * cfg.batch_size,
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
    print(f"trained {steps} steps in {loop_s / 60:.2f} min ({part['train_images_per_s']} img/s)")
    return part


class Sampler:
    """The final EMA checkpoint, sampling condition lists into what a PNG holds."""

    def __init__(self, ckpt, device, sampler, steps):
        import sample

        self.net, self.sched_cfg = sample.load_model(ckpt, device, ema=True)
        self.device, self.sampler, self.steps = device, sampler, steps
        self.batch = 512 if device.type == "cuda" else 64  # a whole file in one batch on a GPU

    def __call__(self, conds, seed, guidance, sampler=None, steps=None):
        """-> (images in [-1, 1] quantised to uint8 levels, labels, seconds)."""
        import sample

        labels = dl.encode_batch(conds)
        synchronize(self.device)
        t = time.time()
        images = sample.generate(self.net, labels, sampler=sampler or self.sampler,
                                 steps=steps or self.steps, guidance=guidance, seed=seed,
                                 device=self.device, scheduler_config=self.sched_cfg,
                                 batch_size=self.batch, order=dl.listed_order(conds),
                                 progress=False)
        synchronize(self.device)
        return dl.as_png(images.float().cpu()), labels, time.time() - t


def guidance_stage(generate, judge, grid, n_val, fd_tie_break=True):
    """The guidance scale of grid that scores best on n_val validation conditions (seed 10**6,
    disjoint from the benchmark seeds) -> (scale, results part). A few hundred objects leave
    scales tied on accuracy; the tie goes to the lower FD of the same images against renders
    of those conditions (fd_tie_break; models trained on other images than our renders pass
    False), else to the smaller scale."""
    import evaluate

    val = dl.validation_conditions(n_val)
    sweep, fds = {}, {}
    for g in grid:
        images, labels, _ = generate(val, 10**6, g)
        sweep[g] = judge.eval(images, labels)
        fds[g] = evaluate.fd_against_renders(judge, images, val) if fd_tie_break else 0.0
        print(f"validation guidance {g}: accuracy {sweep[g]:.4f}"
              + (f", FD {fds[g]:.1f}" if fd_tie_break else ""))
    guidance = max(sweep, key=lambda g: (round(sweep[g], 4), -round(fds[g], 3), -g))
    part = {"guidance_sweep_validation": {str(g): round(a, 4) for g, a in sweep.items()}}
    if fd_tie_break:
        part["guidance_sweep_validation_fd"] = {str(g): round(f, 3) for g, f in fds.items()}
    return guidance, part


def seeds_stage(generate, judge, files, seeds, guidance):
    """Every seed x both benchmark files from the one checkpoint -> (results part, the images
    of each file, all seeds)."""
    from evaluator import by_objects, by_objects_text, miss_kinds, per_image

    acc = {k: [] for k in files}
    rows = {k: [] for k in files}  # per-image judgements, all seeds
    seconds, generated = [], {k: [] for k in files}
    for seed in seeds:
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
    misses = {k: miss_kinds(v) for k, v in rows.items()}  # what the missed objects became
    part = {"accuracy": acc,
            "accuracy_mean": {k: round(float(np.mean(v)), 4) for k, v in acc.items()},
            "accuracy_std": {k: round(float(np.std(v)), 4) for k, v in acc.items()},
            "sampling_seconds_both_files": seconds, "misses_all_seeds": misses,
            "accuracy_by_objects_all_seeds": {k: by_objects(v) for k, v in rows.items()}}
    print("missed objects, all seeds (wrong shape / wrong color / neither; images with too many "
          "/ too few objects): " + "  ".join(
              f"{k} {m['wrong_shape']}/{m['wrong_color']}/{m['neither']}; "
              f"{m['more_objects']}/{m['fewer_objects']}" for k, m in misses.items()))
    print("accuracy by number of objects, all seeds: " + "  ".join(
        f"{k} {by_objects_text(b, 4)}" for k, b in part["accuracy_by_objects_all_seeds"].items()))
    return part, generated


def fd_stage(judge, generated, files, n_seeds):
    """FD of all seeds' images of a file against evaluate.py's fixed renders of that file, and
    that of as many renders of another seed (a perfect generator's FD)."""
    import evaluate

    return {"fd": {k: round(evaluate.fd_against_renders(judge, torch.cat(v), files[k]), 3)
                   for k, v in generated.items()},
            "fd_floor": {k: round(evaluate.fd_floor(judge, files[k], n_seeds), 3)
                         for k in files}}


def seed0_stage(judge, ckpt, out, args, guidance):
    """Seed 0 written by sample.py itself (PNGs, grids, denoising strip) and scored from disk:
    the path of `python sample.py && python evaluate.py`."""
    import evaluate
    import sample

    sample.main(["--checkpoint", str(ckpt), "--out", str(out), "--sampler", args.sampler,
                 "--steps", str(args.steps), "--guidance", str(guidance), "--seed", "0",
                 "--device", str(args.device)])
    return {"seed0_from_png": {p.stem: evaluate.score_folder(judge, out / p.stem, p)["accuracy"]
                               for p in dl.TEST_JSONS},
            "images": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)}


def ddpm_stage(generate, judge, files, steps):
    """The seed report's sampler, DDPM without guidance, seed 0. Both files in one batch: small
    steps are launch-bound, so this halves the time (new_test's images get the noise of the
    indices after test's)."""
    both = [c for conds in files.values() for c in conds]
    images, labels, dt = generate(both, 0, 1.0, sampler="ddpm", steps=steps)
    row, start = {}, 0
    for name, conds in files.items():
        part = slice(start, start + len(conds))
        row[name] = round(judge.eval(images[part], labels[part]), 4)
        start += len(conds)
    return {"ddpm1000_no_guidance_seed0": {**row, "steps": steps,
                                           "seconds_both_files": round(dt, 2)}}


def print_summary(result, files, n_seeds, path):
    print(f"\n| file | accuracy mean +- std over {n_seeds} seeds | FD | FD of renders |")
    print("|---|---|---|---|")
    for k in files:
        print(f"| {k}.json | {result['accuracy_mean'][k]:.4f} +- {result['accuracy_std'][k]:.4f} "
              f"| {result['fd'][k]} | {result['fd_floor'][k]} |")
    means = result["accuracy_mean"].values()
    print(f"mean of the files' means: {sum(means) / len(means):.4f}")  # what ablations compare
    print(f"wrote {path}")


def main(argv=None):
    args, train_argv = parse_args(argv)
    import sample
    import train

    device = dl.resolve_device(args.device)
    dev, cpu = dl.device_tag(device), device.type == "cpu"
    minutes = args.minutes or (2.0 if args.short else 40.0 if cpu else 10.0)
    grid = args.guidance_grid or (CPU_SAMPLING["guidance_grid"] if cpu else [1, 2, 3, 4, 5])
    n_val = args.val_conditions or (CPU_SAMPLING["val_conditions"] if cpu else 256)
    name = f"speedrun-{dev}{'-short' if args.short else ''}{args.tag}"
    path = Path(args.results_dir) / f"{name}.json"
    phases = Phases()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else dev,
              "host": dl.host(device), "command": dl.command_line(), "versions": versions(),
              "budget_minutes": minutes,
              "phase_seconds": phases}
    judge = load_judge(args.judge, device)
    if judge is not None:  # which judge scored: weights/judge has been retrained since
        result["judge"] = judge_record(judge)
    phases.lap("judge")

    cfg = train.parse_args(train_flags(args.run_name or name, minutes, args.device, train_argv,
                                       args.recipe))
    data_stage(cfg, device)
    phases.lap("data")
    run_dir, part = train_stage(cfg, device)
    result.update(part)
    ckpt = sample.latest_checkpoint(run_dir)
    if args.ship:  # before scoring, so the weights survive whatever happens next
        import model as model_lib

        model_lib.export_fp16(ckpt, ROOT / "weights" / "ddpm")
    phases.lap("train")  # with its set-up, its --eval-every evaluations and the last checkpoint
    save(path, result)
    if judge is None:
        return result

    generate = Sampler(ckpt, device, args.sampler, args.steps)
    guidance = float(args.guidance) if args.guidance != "auto" else None
    if guidance is None:
        guidance, part = guidance_stage(generate, judge, grid, n_val)
        result.update(part)
    result.update(sampler=args.sampler, sampler_steps=args.steps, guidance=guidance)
    phases.lap("guidance_sweep")
    if args.ship:  # sample.py's defaults for the shipped weights: what they were scored with,
        # and the results file that scored them (bench_cpu_sample.py checks against it)
        dl.write_json(ROOT / "weights" / "ddpm" / sample.SAMPLE_CONFIG,
                      {"sampler": args.sampler, "steps": args.steps, "guidance": guidance,
                       "speedrun": dl.portable_path(path)})

    files = {p.stem: dl.load_conditions(p) for p in dl.TEST_JSONS}
    part, generated = seeds_stage(generate, judge, files, args.seeds, guidance)
    result.update(part)
    phases.lap("seeds")
    save(path, result)
    result.update(fd_stage(judge, generated, files, len(args.seeds)))
    phases.lap("fd")

    out = ROOT / "results" / f"speedrun-{dev}{args.tag}" if args.ship else run_dir / "images"
    result.update(seed0_stage(judge, ckpt, out, args, guidance))
    phases.lap("seed0_pngs")
    save(path, result)
    if args.ddpm_baseline:  # the ablation table's row: the seed report's sampler
        result.update(ddpm_stage(generate, judge, files, args.ddpm_baseline))
        phases.lap("ddpm")
    save(path, result)
    print_summary(result, files, len(args.seeds), path)
    return result


if __name__ == "__main__":
    dl.run_cli(main)
