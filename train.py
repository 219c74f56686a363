"""Train the conditional DDPM (HF Accelerate: CPU, one GPU, or several via `accelerate launch`).

    python train.py                                       # ground preset, synthetic data
    python train.py --preset tiny --max-steps 4 --run-name demo
    python train.py --run-name demo --resume latest --max-steps 8
    accelerate launch --num_processes 2 train.py ...      # --batch-size is per process

The whole uint8 training set lives on the device and batches are drawn there by random index
(no DataLoader workers). Each rank draws from its own generator (seeded by seed and rank) whose
state is checkpointed, so a resumed run continues exactly. Outputs in runs/NAME/: config.json,
log.jsonl, loss.png, checkpoint-STEP/ (see model.py for the layout).
"""
import copy
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open

import estimate_layouts
from flags import config_parser, option
import render
from dataloader import (DATA_ROOT, TRAIN_JSON, DataError, ICLEVRDataset, _rel, as_png,
                        computes_bf16, encode_batch, first_line, foreground_masks,
                        is_synthetic_name, layout_path, listed_order, load_json, load_spec,
                        portable_path, repo_path, resolve_device, run_cli, speed_up_cuda,
                        to_float, validation_conditions, write_json)
from model import (EMA_DIR, MODEL_DIR, PRESETS, RUNS_DIR, SCHEDULER_DIR, build_model,
                   count_params, derive_seed, list_checkpoints, load_weights,
                   make_noise_scheduler)
from trainstep import TrainStep, diffusion_loss  # noqa: F401 (diffusion_loss: train's API)

# optimizer, LR schedule, step, EMA step and training seconds (torch.load weights_only)
STATE_FILE = "train_state.pt"


# Paths in a TrainConfig (and config.json) are relative to the repository, or absolute; typed on
# the command line, they are relative to the current directory (parse_args converts them).
PATH_FIELDS = ("data_root", "train_json", "runs_dir")


@dataclass
class TrainConfig:
    # data
    data_root: str = option(portable_path(DATA_ROOT), "folder of training PNGs (synthetic ones "
                                                      "are rendered when missing)")
    train_json: str = option(portable_path(TRAIN_JSON), "spec file: image name -> label list")
    # model and diffusion
    # The defaults are the shipped model's recipe (docs/grounded.md): the grounded model with
    # silhouette maps, object pixels weighted 3x, batch 16 (on a CPU, twice the steps of batch
    # 32 for the same images per second), a 40-minute budget whose cosine LR ends with it, bf16
    # autocast where the device computes bf16.
    preset: str = option("ground-shape", "model preset (model.PRESETS); a resumed run keeps "
                                         "its model", choices=list(PRESETS))
    num_train_timesteps: int = option(1000, "DDPM training timesteps")
    beta_schedule: str = option("squaredcos_cap_v2", "DDPM beta schedule (cosine by default)")
    prediction_type: str = option("v_prediction", "what the model predicts",
                                  choices=["epsilon", "v_prediction"])
    snr_gamma: float = option(5.0, "min-SNR-gamma loss weighting (0 = plain MSE)")
    t_sampling: str = option("uniform", "training timesteps: uniform, or logit-normal (SD3's: "
                                        "more of the middle noise levels, where shapes form)",
                             choices=["uniform", "logit-normal"])
    cond_drop: float = option(0.1, "probability of training a sample unconditionally (for CFG)")
    fg_weight: float = option(3.0, "loss weight of object pixels (dataloader.foreground_masks: "
                                   "a few percent of an image) against background ones; 1 = "
                                   "plain MSE")
    # optimization
    max_steps: int = option(1000000, "stop after this many optimizer steps")
    max_minutes: float = option(40.0, "wall-clock budget of the run's training loop (0 = none; "
                                     "a resumed run counts its earlier time); stops cleanly and "
                                     "saves")
    batch_size: int = option(16, "images per step and process")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    lr_schedule: str = option("cosine", "LR schedule after warmup (diffusers get_scheduler name)",
                              choices=["cosine", "linear", "constant_with_warmup"])
    lr_decay_steps: int = option(0, "length of the LR schedule (0 = --max-steps)")
    warmup_steps: int = option(200, "linear LR warmup steps")
    lr_by_time: bool = option(True, "with --max-minutes: cosine-anneal by max(step fraction, time "
                                     "fraction), so the schedule ends with the budget (speedruns)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient norm clip (0 = none)")
    ema_decay: float = option(0.999, "EMA decay cap")
    ema_power: float = option(0.75, "EMA warmup power: decay = 1 - (1 + step)^-power, capped")
    # run
    run_name: str = option("", "runs/NAME (default: a timestamp)")
    runs_dir: str = option(portable_path(RUNS_DIR), "folder of runs")
    resume: str = option("", "'latest' (this run's newest checkpoint) or a checkpoint/run folder")
    save_every: int = option(500, "checkpoint every N steps (and at the end)")
    keep_last: int = option(3, "keep only the newest N checkpoints (0 = all)")
    log_every: int = option(50, "status line and log.jsonl record every N steps")
    eval_every: int = option(0, "score --eval-conditions validation conditions (never the "
                                "benchmark files) with the judge every N steps (0 = never); "
                                "its time does not count towards --max-minutes")
    eval_conditions: int = option(64, "random 1-3-object validation conditions of the eval")
    eval_steps: int = option(25, "dpm++ steps of the eval sampler")
    eval_guidance: float = option(3.0, "CFG scale of the eval sampler")
    seed: int = option(0, "seed of the model init and of the data/noise generators")
    device: str = option("auto", "auto, cpu or cuda (several GPUs: accelerate launch)")
    mixed_precision: str = option("auto", "auto = bf16 where the device computes it (CUDA, CPUs "
                                          "with AVX-512 BF16 or AMX), else no",
                                  choices=["auto", "no", "bf16"])
    channels_last: bool = option(False, "channels_last memory format")
    compile: bool = option(False, "torch.compile the model")
    cuda_graph: bool = option(False, "capture the whole training step (forward, backward, clip, "
                                     "AdamW) in a CUDA graph and replay it: one CUDA process only")


class NonFiniteLoss(RuntimeError):
    """Training diverged; the message names the steps and the last good checkpoint."""


# ---------------------------------------------------------------- config and flags

def _parser():
    return config_parser(TrainConfig, __doc__.split("\n")[0], only_given=True)


def _resume_run_dir(cfg):
    """The run folder --resume names: --resume latest -> --run-name's, else the run with the
    newest checkpoint; a checkpoint folder -> its run; a run folder -> itself."""
    if cfg.resume == "latest":
        runs = repo_path(cfg.runs_dir)
        if cfg.run_name:
            return runs / cfg.run_name
        latest = [c[-1] for r in (runs.iterdir() if runs.is_dir() else [])
                  if (c := list_checkpoints(r))]
        return max(latest, key=lambda p: p.stat().st_mtime).parent if latest else None
    path = Path(cfg.resume)
    if not path.exists():
        raise DataError(f"--resume {cfg.resume}: not found")
    return path if list_checkpoints(path) else path.parent


def _find_resume(cfg, say=print):
    """(run_dir, checkpoint or None) for cfg.resume; None when not resuming. A run's newest
    checkpoint that is broken (checkpoint_problem) is skipped, saying so, for the newest
    complete one; a checkpoint named explicitly must be complete."""
    if not cfg.resume:
        return None
    run_dir = _resume_run_dir(cfg)
    if cfg.resume != "latest" and not list_checkpoints(cfg.resume):  # one checkpoint named
        ckpt = Path(cfg.resume)
        problem = checkpoint_problem(ckpt)
        if problem:
            raise DataError(f"cannot resume from {_rel(ckpt)}: {problem}")
        return run_dir, ckpt
    ckpts = list_checkpoints(run_dir) if run_dir else []
    problems = []
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return run_dir, ckpt
        problems.append(problem)
        say(f"--resume: skipping {_rel(ckpt)} ({problem})")
    if ckpts:
        raise DataError(f"{_rel(run_dir)}: no complete checkpoint to resume from (newest: "
                        f"{problems[0]})")
    return run_dir, None


def checkpoint_problem(ckpt):
    """Why a training checkpoint cannot be resumed, as one line naming the file, or None: each
    part must be there and readable (model/, ema/, scheduler/, train_state.pt)."""
    if not (ckpt / STATE_FILE).is_file() and not (ckpt / EMA_DIR).is_dir():
        return f"{_rel(ckpt)}: not a training checkpoint (no {STATE_FILE})"
    for sub, name in ((MODEL_DIR, "config.json"), (EMA_DIR, "config.json"),
                      (SCHEDULER_DIR, "scheduler_config.json")):
        path = ckpt / sub / name
        try:
            if not isinstance(json.loads(path.read_text()), dict):
                return f"{_rel(path)}: expected a JSON object"
        except FileNotFoundError:
            return f"{_rel(path)}: missing"
        except (ValueError, UnicodeDecodeError):
            return f"{_rel(path)}: not valid JSON (truncated or corrupt)"
    for sub in (MODEL_DIR, EMA_DIR):
        shards = sorted((ckpt / sub).glob("*.safetensors"))
        if not shards:
            return f"{_rel(ckpt / sub)}: no *.safetensors weights"
        for shard in shards:
            try:
                with safe_open(shard, "pt") as f:
                    list(f.keys())
            except Exception as e:  # safetensors raises its own error type for a bad header
                return f"{_rel(shard)}: unreadable weights ({first_line(e)})"
    try:  # mmap: the zip's index and the pickle are read, the tensors only mapped (restore
        # reads them once)
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        return f"{_rel(ckpt / STATE_FILE)}: missing"
    except Exception as e:  # a truncated zip or pickle: torch raises several kinds
        return f"{_rel(ckpt / STATE_FILE)}: unreadable ({first_line(e)[:120]})"
    missing = {"optimizer", "lr_scheduler", "step", "ema_step"} - set(state)
    if missing:
        return f"{_rel(ckpt / STATE_FILE)}: lacks {', '.join(sorted(missing))}"
    return None


def saved_config(path):
    """A run's config.json -> {field: value} of the TrainConfig fields it holds, type-checked,
    so that a malformed file stops the resume with one line instead of failing later."""
    saved = load_json(path)
    if not isinstance(saved, dict):
        raise DataError(f"{_rel(path)}: expected a JSON object of training options")
    out = {}
    for f in fields(TrainConfig):
        if f.name not in saved:
            continue
        v = saved[f.name]
        if f.type is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not f.type:
            raise DataError(f"{_rel(path)}: {f.name} = {json.dumps(v)} (expected "
                            f"{f.type.__name__})")
        out[f.name] = v
    return out


def parse_args(argv=None):
    """Flags -> TrainConfig. When resuming, the run's saved config.json is the base and only the
    flags given on the command line override it (so `--resume latest --max-steps 8` keeps the
    run's preset, batch size, ...)."""
    given = vars(_parser().parse_args(argv))
    for name in set(PATH_FIELDS) & set(given):  # typed: relative to the current directory
        given[name] = portable_path(given[name])
    cfg = TrainConfig(**given)
    run_dir = _resume_run_dir(cfg) if cfg.resume else None
    if run_dir is not None and (run_dir / "config.json").is_file():
        cfg = TrainConfig(**{**saved_config(run_dir / "config.json"), **given})
    return cfg


def _check(cfg):
    for name in ("max_steps", "batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise DataError(f"--{name.replace('_', '-')}: expected a positive number, "
                            f"got {getattr(cfg, name)}")
    if not cfg.fg_weight > 0:
        raise DataError(f"--fg-weight: expected a positive weight, got {cfg.fg_weight}")
    if not 0.0 <= cfg.cond_drop < 1.0:
        raise DataError(f"--cond-drop: expected a probability in [0, 1), got {cfg.cond_drop}")
    if cfg.cuda_graph and (device := resolve_device(cfg.device)).type != "cuda":
        raise DataError(f"--cuda-graph: needs a CUDA device (--device {cfg.device} resolves to "
                        f"{device})")


# ---------------------------------------------------------------- helpers

def plot_loss(run_dir):
    """runs/NAME/log.jsonl -> runs/NAME/loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in _read_log(run_dir / "log.jsonl") if "loss" in r]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1)
    ax.set(xlabel="step", ylabel="loss", title=run_dir.name)
    if min(r["loss"] for r in recs) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")


def _read_log(path):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_log(path, step):
    """Resuming from step N: drop records of the abandoned steps after N."""
    if not path.is_file():
        return
    recs = [r for r in _read_log(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    os.replace(tmp, path)


class _StopFlag:
    """SIGINT/SIGTERM ask for a clean stop (checkpoint, then exit); a second Ctrl-C aborts."""

    def __init__(self):
        self.reason, self._old = None, {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.reason = signal.Signals(signum).name
        print(f"\n{self.reason}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to abort)", flush=True)
        # the second Ctrl-C raises KeyboardInterrupt, even where SIGINT was ignored before
        # (a job started with & in a script inherits an ignored SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- set-up

@dataclass
class Data:
    """The whole training set on the device (batches are drawn there by random index)."""
    images: torch.Tensor     # (N, 3, 64, 64) uint8
    labels: torch.Tensor     # (N, 24) multi-hot
    layouts: torch.Tensor    # (N, K, 5) object layouts; K = 0 for label-only models
    fg: torch.Tensor | None  # (N, 1, 64, 64) bool object pixels with --fg-weight, else None


@dataclass
class Run:
    """What the training loop reads and updates; the functions it calls take this one object."""
    cfg: TrainConfig
    acc: Accelerator
    run_dir: Path
    net: torch.nn.Module       # the raw weights the optimizer steps
    ema_net: torch.nn.Module   # a plain contiguous copy that the EMA (and, to save, the raw)
    ema: EMAModel              # weights are copied into: what is saved and evaluated
    optimizer: torch.optim.Optimizer
    lr_sched: object
    noise_scheduler: object
    train_step: TrainStep
    gen: torch.Generator       # this rank's data and noise generator (checkpointed)
    step: int = 0              # optimizer steps so far
    train_s: float = 0.0       # training seconds of the run before this process (resumed)
    t_start: float = 0.0       # time.time() - t_start = training seconds so far (evals excluded)
    good_ckpt: Path | None = None  # the newest checkpoint known to hold finite weights
    checked: int = 0           # the last step whose losses are known to be finite
    bad: torch.Tensor | None = None       # non-finite losses or grad norms since, summed on
    loss_sum: torch.Tensor | None = None  # the device without a sync (as is the loss)
    loss_floor: float = math.inf  # the lowest status-line mean loss of this process
    loss_high: int = 0         # status lines in a row far above it (check_diverging)
    judge: object = None       # the eval's judge and conditions, loaded at the first eval
    eval_conds: list | None = None


def open_run(cfg):
    """The run folder (the resumed one, the named one, or a timestamp agreed on by all ranks),
    Accelerate, and config.json written -> (acc, run_dir, checkpoint to resume or None). Fills
    in cfg's run name."""
    device = resolve_device(cfg.device)
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else (
        "bf16" if computes_bf16(device) else "no")
    run_dir, ckpt = _find_resume(cfg) or (None, None)
    if run_dir is None and cfg.run_name:
        run_dir = repo_path(cfg.runs_dir) / cfg.run_name
    if run_dir is not None and not ckpt and list_checkpoints(run_dir):
        raise DataError(f"{_rel(run_dir)}: already has checkpoints; continue it with --resume "
                        "latest or pick another --run-name")
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=mp)
    speed_up_cuda(acc.device)
    if cfg.resume and ckpt is None:
        acc.print(f"--resume {cfg.resume}: no checkpoint found, starting a new run")
    if run_dir is None:
        name = [time.strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(name)
        run_dir = repo_path(cfg.runs_dir) / name[0]
    cfg.run_name, cfg.runs_dir = run_dir.name, portable_path(run_dir.parent)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", asdict(cfg))
    acc.print(f"config: {json.dumps(asdict(cfg))}")
    return acc, run_dir, ckpt


def load_data(cfg, acc, run_dir, grounded):
    """The training set on the device; rank 0 renders missing synthetic images (and finds or
    estimates the layouts a grounded model needs) first."""
    with acc.main_process_first():
        root, spec_path = repo_path(cfg.data_root), repo_path(cfg.train_json)
        render.ensure_images(root, load_spec(spec_path), spec_path, cfg.device)
        ds = ICLEVRDataset(root, spec_path, in_memory=True)
        if grounded:
            dropped = ds.attach_layouts(find_layouts(ds, run_dir, cfg.device, acc.print))
            if dropped:
                acc.print(f"training on {len(ds):,} images ({dropped:,} without a layout)")
    images = ds.images.to(acc.device)
    return Data(images, ds.labels.to(acc.device), ds.layouts.to(acc.device),
                foreground_masks(images) if cfg.fg_weight != 1 else None)


def find_layouts(ds, run_dir, device, say=print):
    """The layout file of a dataset's images (docs/layouts.md): the one beside the images; for
    the project's renders, the renderer's placement; for other images (the lab's), estimated
    from the images themselves (estimate_layouts.py) and cached in the run folder."""
    if all(is_synthetic_name(n) for n in ds.spec):
        return render.ensure_layouts(ds.spec, ds.spec_path, ds.root, device=device)
    beside = layout_path(ds.root, ds.spec_path)
    if beside.is_file():
        return beside
    cached = run_dir / beside.name
    if not cached.is_file():
        say(f"{estimate_layouts.estimate_dataset(ds, cached)}; wrote {_rel(cached)}")
    return cached


def build_run(cfg, acc, run_dir, ckpt, data):
    """Model (a resumed run keeps its checkpoint's architecture), EMA, optimizer, LR schedule,
    the step function and the generator, restored from ckpt when resuming -> Run."""
    device = acc.device
    torch.manual_seed(cfg.seed)
    net = load_weights(ckpt / MODEL_DIR) if ckpt else build_model(cfg.preset)
    if data.layouts.shape[1] and not ckpt:  # the prior sample.py draws layouts from
        net.set_layout_prior(data.layouts.cpu())
    net.to(device).train()
    ema_net = (load_weights(ckpt / EMA_DIR) if ckpt else copy.deepcopy(net)).to(device).eval()
    ema_net.requires_grad_(False)
    ema = EMAModel(ema_net.parameters(), decay=cfg.ema_decay, use_ema_warmup=True,
                   power=cfg.ema_power, foreach=True)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    noise_scheduler = make_noise_scheduler(cfg.num_train_timesteps, cfg.beta_schedule,
                                           cfg.prediction_type)
    ac = noise_scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda", capturable=cfg.cuda_graph)
    lr_sched = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.lr_decay_steps or cfg.max_steps)
    if cfg.cuda_graph:  # the graph steps the raw model and optimizer (see TrainStep)
        model = net
    else:
        model, optimizer = acc.prepare(net, optimizer)
    if cfg.compile:
        model = torch.compile(model)
    train_step = TrainStep(acc, model, optimizer, noise_scheduler, ac / (1 - ac), cfg.snr_gamma,
                           cfg.grad_clip, cuda_graph=cfg.cuda_graph)
    gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, acc.process_index))
    run = Run(cfg, acc, run_dir, net, ema_net, ema, optimizer, lr_sched, noise_scheduler,
              train_step, gen, good_ckpt=ckpt, bad=torch.zeros((), device=device),
              loss_sum=torch.zeros((), device=device))
    if ckpt:
        restore(run, ckpt)
    return run


def restore(run, ckpt):
    """Optimizer, LR schedule, step counters, training time and this rank's generator from a
    checkpoint."""
    saved = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    _load_optimizer(run.optimizer, saved["optimizer"])
    run.lr_sched.load_state_dict(saved["lr_scheduler"])
    run.step = run.checked = saved["step"]
    run.ema.optimization_step = saved["ema_step"]
    run.train_s = saved.get("train_seconds", 0.0)  # the budget and --lr-by-time go on from it
    rank = run.acc.process_index
    rng = ckpt / f"rng-{rank}.pt"
    if rng.is_file():
        _set_rng_state(run.gen, torch.load(rng, weights_only=True))
    else:  # resumed with more processes than saved: a fresh stream for this rank
        run.gen.manual_seed(derive_seed(run.cfg.seed, rank, run.step))
    run.acc.print(f"resumed from {_rel(ckpt)} at step {run.step}")


# ---------------------------------------------------------------- what the loop calls

def draw_batch(cfg, data, gen):
    """A random batch with its noise and timesteps -> (x0, y, layout, noise, t[, weight]);
    cfg.cond_drop of the samples lose their condition (all-zero labels, no objects in the
    maps), which is what classifier-free guidance samples against."""
    n = cfg.batch_size
    idx = torch.randint(len(data.images), (n,), generator=gen, device=gen.device)
    x0 = to_float(data.images[idx])
    if cfg.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    noise = torch.randn(x0.shape, generator=gen, device=gen.device)
    t = draw_timesteps(cfg, n, gen)
    drop = torch.rand(n, generator=gen, device=gen.device) < cfg.cond_drop
    y = data.labels[idx].masked_fill(drop[:, None], 0.0)
    layout = data.layouts[idx]
    if layout.shape[1]:
        layout = torch.cat([torch.where(drop[:, None, None], -1.0, layout[..., :1]),
                            layout[..., 1:]], -1)
    batch = (x0, y, layout, noise, t)
    if data.fg is not None:  # object pixels weigh fg_weight, background ones 1
        batch += (1 + (cfg.fg_weight - 1) * data.fg[idx].float(),)
    return batch


def draw_timesteps(cfg, n, gen):
    """n training timesteps: uniform, or t / T = sigmoid(a standard normal) (logit-normal)."""
    T = cfg.num_train_timesteps
    if cfg.t_sampling == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=gen, device=gen.device))
        return (u * T).long().clamp_(0, T - 1)
    return torch.randint(0, T, (n,), generator=gen, device=gen.device)


def update_lr(run):
    """One LR schedule step; with --lr-by-time, the budget's cosine instead."""
    cfg = run.cfg
    run.lr_sched.step()
    if cfg.lr_by_time and cfg.max_minutes:
        for g in run.optimizer.param_groups:
            g["lr"] = cfg.lr * _budget_lr_factor(cfg, run.step, time.time() - run.t_start)
    run.train_step.sync_lr()


def log(run, rec):
    """One record of runs/NAME/log.jsonl (rank 0 writes)."""
    if run.acc.is_main_process:
        with open(run.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def status(run, last_step, t_last):
    """The status line and log record of the steps since last_step (the mean loss over all
    ranks); raises NonFiniteLoss if any of them diverged. Returns the time it was taken."""
    cfg, acc = run.cfg, run.acc
    mean_loss = acc.reduce(run.loss_sum / (run.step - last_step), "mean").item()
    check_finite(run)
    check_diverging(run, mean_loss, last_step)
    now = time.time()
    ips = (run.step - last_step) * cfg.batch_size * acc.num_processes / (now - t_last)
    rec = {"step": run.step, "loss": mean_loss, "lr": float(run.optimizer.param_groups[0]["lr"]),
           "images_per_s": ips, "elapsed_s": now - run.t_start}
    log(run, rec)
    acc.print(f"step {run.step}/{cfg.max_steps} | loss {mean_loss:.4f} | lr {rec['lr']:.2e} | "
              f"{ips:.0f} img/s | {_hms(rec['elapsed_s'])}", flush=True)
    run.loss_sum.zero_()
    return now


def slow_device_note(run, per_step):
    """When the next status line is more than a minute away, say when it comes."""
    cfg = run.cfg
    nxt = min(cfg.max_steps, (run.step // cfg.log_every + 1) * cfg.log_every)
    if run.step % cfg.log_every and per_step * (nxt - run.step) > 60:
        device = run.acc.device
        hint = ("; --preset tiny --max-steps 200 is a quick CPU demo" if device.type == "cpu"
                and not cfg.max_minutes and not cfg.preset.startswith("tiny") else "")
        run.acc.print(f"{per_step:.1f} s/step on {device}: the next status line comes at step "
                      f"{nxt}, in about {_hms(per_step * (nxt - run.step))}{hint}", flush=True)


def last_good(run):
    """The newest checkpoint known to be good, as error lines name it."""
    return _rel(run.good_ckpt) if run.good_ckpt else "none"


def check_finite(run):
    """Raise NonFiniteLoss if a loss or gradient since the last check was not finite."""
    if run.bad.item() > 0:
        first = run.checked + 1
        where = f"step {run.step}" if first == run.step else f"steps {first}-{run.step}"
        raise NonFiniteLoss(f"non-finite loss or gradient at {where} (try a lower --lr); last "
                            f"good checkpoint: {last_good(run)}")
    run.checked = run.step


# A network can blow up without a non-finite number: its activations grow by orders of
# magnitude, the group norms hide that from the loss but scale every gradient down with it,
# and the loss stays at a level it left long before. Three status lines in a row at 5x the
# lowest mean are that, not the noise of a mean over DIVERGED_MIN_STEPS batches or more.
DIVERGED_FACTOR = 5.0
DIVERGED_LINES = 3
DIVERGED_MIN_STEPS = 20


def check_diverging(run, mean_loss, last_step):
    """Raise NonFiniteLoss when the mean loss of DIVERGED_LINES status lines in a row is over
    DIVERGED_FACTOR times the lowest one before (status lines of DIVERGED_MIN_STEPS steps or
    more; a resumed run starts its own record)."""
    if run.step - last_step < DIVERGED_MIN_STEPS:
        return
    if mean_loss <= DIVERGED_FACTOR * run.loss_floor:
        run.loss_floor, run.loss_high = min(run.loss_floor, mean_loss), 0
        return
    run.loss_high += 1
    if run.loss_high >= DIVERGED_LINES:
        raise NonFiniteLoss(
            f"the loss diverged: {mean_loss:.4f} at step {run.step}, {DIVERGED_LINES} status "
            f"lines in a row over {DIVERGED_FACTOR:g}x its lowest mean {run.loss_floor:.4f} "
            f"(try a lower --lr or another --seed); last good checkpoint: {last_good(run)}")


def save_checkpoint(run):
    """runs/NAME/checkpoint-STEP/, written under a temporary name and renamed (an interrupted
    save leaves the previous checkpoints as they were); then the oldest beyond --keep-last go."""
    check_finite(run)  # never write a poisoned checkpoint
    acc, main = run.acc, run.acc.is_main_process
    final = run.run_dir / f"checkpoint-{run.step}"
    tmp = run.run_dir / f".tmp-checkpoint-{run.step}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()
    try:
        write_checkpoint(run, tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk (torch.save raises
        # RuntimeError, safetensors its own error): no half-written folder stays, older ones do
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{_rel(final)}: cannot write the checkpoint "
                        f"({getattr(e, 'strerror', None) or first_line(e)}); last good "
                        f"checkpoint: {last_good(run)}") from None
    except BaseException:  # a second Ctrl-C: the same
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc.wait_for_everyone()
    if main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(run.run_dir, run.step, run.cfg.keep_last)
        plot_loss(run.run_dir)
        print(f"saved {_rel(final)}", flush=True)
    if not run.loss_high:  # a checkpoint written while the loss is high may hold a blown-up net
        run.good_ckpt = final
    acc.wait_for_everyone()


def write_checkpoint(run, folder):
    """Every part of a checkpoint into folder: this rank's generator; on rank 0 the raw and EMA
    weights, the noise schedule and the training state."""
    torch.save(_rng_state(run.gen), folder / f"rng-{run.acc.process_index}.pt")
    if run.acc.is_main_process:  # through ema_net: safetensors needs contiguous tensors
        run.ema_net.load_state_dict(run.net.state_dict())
        run.ema_net.save_pretrained(folder / MODEL_DIR)
        run.ema.copy_to(run.ema_net.parameters())
        run.ema_net.save_pretrained(folder / EMA_DIR)
        run.noise_scheduler.save_config(folder / SCHEDULER_DIR)
        torch.save({"optimizer": run.train_step.optimizer_state(),
                    "lr_scheduler": run.lr_sched.state_dict(), "step": run.step,
                    "ema_step": run.ema.optimization_step,
                    "train_seconds": time.time() - run.t_start}, folder / STATE_FILE)


def prune_checkpoints(run_dir, step, keep):
    """--keep-last: the checkpoint of step and the newest keep - 1 before it stay; checkpoints
    of later steps (left by a run resumed from an earlier one) are never touched."""
    if keep:
        older = [c for c in list_checkpoints(run_dir) if int(c.name.split("-")[1]) < step]
        for old in older[:len(older) - (keep - 1)]:
            shutil.rmtree(old, ignore_errors=True)


def evaluate(run):
    """Score --eval-conditions validation conditions (never the benchmark files) with the
    judge, sampled from the EMA weights: one status line and one log record (rank 0)."""
    cfg = run.cfg
    if run.acc.is_main_process:
        if run.eval_conds is None:  # the same conditions at every eval
            run.judge = _load_judge(run.acc.device)
            run.eval_conds = validation_conditions(cfg.eval_conditions)
        if run.judge is not None:
            from evaluator import by_objects, by_objects_text, per_image
            from sample import generate

            run.ema.copy_to(run.ema_net.parameters())
            labels = encode_batch(run.eval_conds)
            imgs = generate(run.ema_net, labels, sampler="dpm++", steps=cfg.eval_steps,
                            guidance=cfg.eval_guidance, seed=0, batch_size=256,
                            order=listed_order(run.eval_conds),
                            scheduler_config=run.noise_scheduler.config, progress=False)
            scores = run.judge.scores(as_png(imgs))
            score = float(run.judge.compute_acc(scores, labels))
            by_k = by_objects(per_image(scores, labels))
            print(f"eval step {run.step}: validation accuracy {score:.4f} "
                  f"({len(run.eval_conds)} conditions, guidance {cfg.eval_guidance}) | by "
                  f"number of objects {by_objects_text(by_k)}", flush=True)
            log(run, {"step": run.step, "elapsed_s": time.time() - run.t_start,
                      "eval_val_acc": score, "eval_val_by_objects": by_k})
    run.acc.wait_for_everyone()


def finish(run):
    """The end record (and, with several ranks, proof they hold the same weights), loss.png."""
    acc = run.acc
    if acc.num_processes > 1:  # every rank must hold the weights rank 0 saved
        sums = acc.gather(param_checksum(run.net)[None]).tolist()
        log(run, {"event": "ranks", "step": run.step, "param_checksums": sums,
                  "in_sync": len(set(sums)) == 1})
    log(run, {"event": "end", "step": run.step, "elapsed_s": time.time() - run.t_start,
              "cuda_graph_replayed": run.train_step.replaying})
    if acc.is_main_process:
        plot_loss(run.run_dir)
    acc.wait_for_everyone()


# ---------------------------------------------------------------- training

def train(cfg):
    """Train with cfg; returns the run folder. Raises NonFiniteLoss if the loss diverges."""
    cfg = replace(cfg)  # open_run fills in the run name; the caller's copy stays as given
    _check(cfg)
    acc, run_dir, ckpt = open_run(cfg)
    data = load_data(cfg, acc, run_dir, _conditioning(cfg, ckpt) == "ground")
    run = build_run(cfg, acc, run_dir, ckpt, data)
    if acc.is_main_process:  # drop log records of steps after the checkpoint
        _truncate_log(run_dir / "log.jsonl", run.step)
    n_params = count_params(run.net)
    log(run, {"event": "start", "step": run.step, "device": str(acc.device),
              "world_size": acc.num_processes, "mixed_precision": acc.mixed_precision,
              "params": n_params, "images": len(data.images)})
    acc.print(f"run {_rel(run_dir)} | {n_params / 1e6:.2f}M params | {len(data.images)} images "
              f"| {acc.device} x{acc.num_processes} | {acc.mixed_precision} | global batch "
              f"{cfg.batch_size * acc.num_processes}")

    t_last = time.time()
    run.t_start = t_last - run.train_s
    first_step = last_step = run.step
    spent = bool(cfg.max_minutes) and run.train_s >= cfg.max_minutes * 60  # resumed, ended
    if spent:
        acc.print(f"the time budget of {cfg.max_minutes} min was spent before step {run.step} "
                  f"({_hms(run.train_s)} of training): nothing to train")
    with _StopFlag() as stop:
        while run.step < cfg.max_steps and not spent:
            run.step += 1
            loss, grad_norm = run.train_step(*draw_batch(cfg, data, run.gen))
            update_lr(run)
            run.ema.step(run.net.parameters())
            run.bad += (~torch.isfinite(loss)).float() + (~torch.isfinite(grad_norm)).float()
            run.loss_sum += loss

            if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
                t_last, last_step = status(run, last_step, t_last), run.step
            if run.step == first_step + 1:  # time step 2 alone: step 1 also allocates, tunes
                t_first = time.time()
            elif run.step == first_step + 2:
                slow_device_note(run, time.time() - t_first)

            reason = _stop_reason(acc, stop, cfg, run.t_start, run.step)
            pause = time.time()
            if (cfg.save_every and run.step % cfg.save_every == 0) or reason \
                    or run.step == cfg.max_steps:
                save_checkpoint(run)
            if cfg.eval_every and run.step % cfg.eval_every == 0 and not reason:
                t_eval = time.time()
                evaluate(run)
                run.t_start += time.time() - t_eval  # evaluating is not training: off the budget
            t_last += time.time() - pause  # img/s counts training time only
            if reason:
                acc.print(f"stopped at step {run.step}: {reason}")
                break
    finish(run)
    return run_dir


# ---------------------------------------------------------------- helpers of the above

def _conditioning(cfg, ckpt):
    """The conditioning of the model a run trains: its checkpoint's, else its preset's."""
    if ckpt:
        return json.loads((ckpt / MODEL_DIR / "config.json").read_text())["conditioning"]
    return PRESETS[cfg.preset]["conditioning"]


def param_checksum(model):
    """One float64 that differs when any weight differs (sum and sum of squares)."""
    return sum(p.detach().double().sum() + p.detach().double().square().sum()
               for p in model.parameters())


def _load_optimizer(optimizer, state):
    """Load a saved AdamW state but keep this run's fused/capturable flags (a checkpoint may
    come from a CPU or an eager run); those flags keep their step counters on the device."""
    flags = [{k: g[k] for k in ("fused", "capturable")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for g, f in zip(optimizer.param_groups, flags):
        g.update(f)
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            if "step" in st and (f["fused"] or f["capturable"]):
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


def _budget_lr_factor(cfg, step, elapsed):
    """Linear warmup, then cosine to zero over whichever runs out first: the schedule's steps
    (--lr-decay-steps, else --max-steps) or minutes."""
    frac = min(1.0, max(step / (cfg.lr_decay_steps or cfg.max_steps),
                        elapsed / (cfg.max_minutes * 60)))
    return min(1.0, step / max(1, cfg.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * frac))


def _stop_reason(acc, stop, cfg, t_start, step):
    """A signal or the time budget; all ranks must agree, or DDP would hang."""
    reason = stop.reason
    if not reason and cfg.max_minutes and time.time() - t_start > cfg.max_minutes * 60:
        reason = f"time budget of {cfg.max_minutes} min"
    if acc.num_processes == 1:
        return reason
    if step % 10:  # agree every 10 steps only: a collective per step would cost a sync each
        return None
    flag = acc.reduce(torch.tensor([float(bool(reason))], device=acc.device), "sum").item()
    return (reason or "another rank stopped") if flag > 0 else None


def _rng_state(gen):
    """This rank's data/noise generator, plus torch's global RNGs (dropout, if any)."""
    state = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(gen, state):
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _hms(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _load_judge(device):
    """The evaluator's judge, or None (one line) when it or its weights are missing."""
    try:
        from evaluator import evaluation_model

        return evaluation_model(device=device)
    except (ImportError, FileNotFoundError, DataError) as e:
        print(f"eval: skipped ({first_line(e)})")
        return None


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
