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
import argparse
import copy
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

import estimate_layouts
import render
from dataloader import (DATA_ROOT, TRAIN_JSON, DataError, ICLEVRDataset, _rel,
                        encode_batch, foreground_masks, is_synthetic_name, layout_path,
                        load_spec, portable_path, repo_path,
                        resolve_device, run_cli, speed_up_cuda, to_float, to_uint8,
                        validation_conditions, write_json)
from model import (EMA_DIR, MODEL_DIR, PRESETS, RUNS_DIR, SCHEDULER_DIR, build_model,
                   count_params, derive_seed, list_checkpoints, load_weights,
                   make_noise_scheduler, resolve_checkpoint)

# optimizer, LR schedule, step, EMA step and training seconds (torch.load weights_only)
STATE_FILE = "train_state.pt"


def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


# Paths in a TrainConfig (and config.json) are relative to the repository, or absolute; typed on
# the command line, they are relative to the current directory (parse_args converts them).
PATH_FIELDS = ("data_root", "train_json", "runs_dir")


@dataclass
class TrainConfig:
    # data
    data_root: str = _opt(portable_path(DATA_ROOT), "folder of training PNGs (synthetic ones are "
                                          "rendered when missing)")
    train_json: str = _opt(portable_path(TRAIN_JSON), "spec file: image name -> label list")
    # model and diffusion
    # ground: the grounded model (docs/grounded.md), which trains well on a CPU
    preset: str = _opt("ground", "model preset (model.PRESETS); a resumed run keeps its model",
                       choices=list(PRESETS))
    num_train_timesteps: int = _opt(1000, "DDPM training timesteps")
    beta_schedule: str = _opt("squaredcos_cap_v2", "DDPM beta schedule (cosine by default)")
    prediction_type: str = _opt("v_prediction", "what the model predicts",
                                choices=["epsilon", "v_prediction"])
    snr_gamma: float = _opt(5.0, "min-SNR-gamma loss weighting (0 = plain MSE)")
    cond_drop: float = _opt(0.1, "probability of training a sample unconditionally (for CFG)")
    fg_weight: float = _opt(1.0, "loss weight of object pixels (dataloader.foreground_masks: "
                                 "3-8%% of an image) against background ones; 1 = plain MSE")
    # optimization
    max_steps: int = _opt(20000, "stop after this many optimizer steps")
    max_minutes: float = _opt(0.0, "wall-clock budget of the run's training loop (0 = none; "
                                   "a resumed run counts its earlier time); stops cleanly and "
                                   "saves")
    batch_size: int = _opt(128, "images per step and process")
    lr: float = _opt(3e-4, "peak learning rate (AdamW)")
    lr_schedule: str = _opt("cosine", "LR schedule after warmup (diffusers get_scheduler name)",
                            choices=["cosine", "linear", "constant_with_warmup"])
    lr_decay_steps: int = _opt(0, "length of the LR schedule (0 = --max-steps)")
    warmup_steps: int = _opt(500, "linear LR warmup steps")
    lr_by_time: bool = _opt(False, "with --max-minutes: cosine-anneal by max(step fraction, time "
                                   "fraction), so the schedule ends with the budget (speedruns)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "gradient norm clip (0 = none)")
    ema_decay: float = _opt(0.999, "EMA decay cap")
    ema_power: float = _opt(0.75, "EMA warmup power: decay = 1 - (1 + step)^-power, capped")
    # run
    run_name: str = _opt("", "runs/NAME (default: a timestamp)")
    runs_dir: str = _opt(portable_path(RUNS_DIR), "folder of runs")
    resume: str = _opt("", "'latest' (this run's newest checkpoint) or a checkpoint/run folder")
    save_every: int = _opt(1000, "checkpoint every N steps (and at the end)")
    keep_last: int = _opt(3, "keep only the newest N checkpoints (0 = all)")
    log_every: int = _opt(50, "status line and log.jsonl record every N steps")
    eval_every: int = _opt(0, "score --eval-conditions validation conditions (never the "
                               "benchmark files) with the judge every N steps (0 = never); "
                               "its time does not count towards --max-minutes")
    eval_conditions: int = _opt(128, "random 1-3-object validation conditions of the eval")
    eval_steps: int = _opt(25, "dpm++ steps of the eval sampler")
    eval_guidance: float = _opt(3.0, "CFG scale of the eval sampler")
    seed: int = _opt(0, "seed of the model init and of the data/noise generators")
    device: str = _opt("auto", "auto, cpu or cuda (several GPUs: accelerate launch)")
    mixed_precision: str = _opt("auto", "auto = bf16 on CUDA, no elsewhere",
                                choices=["auto", "no", "bf16"])
    channels_last: bool = _opt(False, "channels_last memory format")
    compile: bool = _opt(False, "torch.compile the model")
    cuda_graph: bool = _opt(False, "capture the whole training step (forward, backward, clip, "
                                   "AdamW) in a CUDA graph and replay it: one CUDA process only")


class NonFiniteLoss(RuntimeError):
    """Training diverged; the message names the steps and the last good checkpoint."""


# ---------------------------------------------------------------- config and flags

def _parser():
    """TrainConfig's fields as flags. Only the flags given land in the namespace (the dataclass,
    or a resumed run's config.json, supplies the rest); --help shows each default."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%")
        if f.type is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            ap.add_argument(flag, type=f.type, choices=f.metadata.get("choices"), help=text)
    return ap


def _find_resume(cfg):
    """(run_dir, checkpoint or None) for cfg.resume; None when not resuming."""
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        runs = repo_path(cfg.runs_dir)
        if cfg.run_name:
            run_dir = runs / cfg.run_name
        else:  # no name: the run with the newest checkpoint
            latest = [c[-1] for r in (runs.iterdir() if runs.is_dir() else [])
                      if (c := list_checkpoints(r))]
            run_dir = max(latest, key=lambda p: p.stat().st_mtime).parent if latest else None
        ckpts = list_checkpoints(run_dir) if run_dir else []
        return run_dir, (ckpts[-1] if ckpts else None)
    ckpt = resolve_checkpoint(cfg.resume)
    if not (ckpt / STATE_FILE).is_file():
        raise DataError(f"{_rel(ckpt)}: not a training checkpoint (no {STATE_FILE})")
    return ckpt.parent, ckpt


def parse_args(argv=None):
    """Flags -> TrainConfig. When resuming, the run's saved config.json is the base and only the
    flags given on the command line override it (so `--resume latest --max-steps 8` keeps the
    run's preset, batch size, ...)."""
    given = vars(_parser().parse_args(argv))
    for name in set(PATH_FIELDS) & set(given):  # typed: relative to the current directory
        given[name] = portable_path(given[name])
    cfg = TrainConfig(**given)
    found = _find_resume(cfg)
    if found and found[0] is not None and (found[0] / "config.json").is_file():
        saved = json.loads((found[0] / "config.json").read_text())
        known = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **given})
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

def diffusion_loss(model, noise_scheduler, x0, y, layout, noise, t, snr=None, snr_gamma=0.0,
                   weight=None):
    """MSE to the noise (epsilon) or to v, optionally min-SNR-gamma weighted per sample. weight
    (B, 1, H, W) makes each sample's MSE a weighted mean over its pixels (--fg-weight); layout
    (B, K, 5) is what a grounded model reads (K = 0 for the others)."""
    x_t = noise_scheduler.add_noise(x0, noise, t)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(x0, noise, t)
    pred = model(x_t, t, y, layout).float()
    err = F.mse_loss(pred, target, reduction="none")
    if weight is None:
        loss = err.mean(dim=(1, 2, 3))
    else:
        loss = (err * weight).mean(dim=(1, 2, 3)) / weight.mean(dim=(1, 2, 3))
    if snr_gamma > 0:  # Hang et al. 2023: weight min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v)
        s = snr[t]
        w = s.clamp(max=snr_gamma)
        eps = noise_scheduler.config.prediction_type == "epsilon"
        loss = loss * (w / s if eps else w / (s + 1))
    return loss.mean()


class TrainStep:
    """One optimizer step on a batch: diffusion loss, backward, gradient clip, AdamW.

    Eager: through Accelerate (autocast, DDP). With cuda_graph=True (one CUDA process): a few
    eager warm-up steps on a side stream, then the whole step is captured once into a CUDA graph
    and every later call copies its batch into the graph's static inputs and replays it. Why: at
    batch <= 256 the default preset's step costs the same 78 ms on an H200 at batch 128 and 256,
    i.e. it is bound by Python and kernel launches, which a replay skips. Every call is exactly
    one optimizer step on its own batch, in both modes. The learning rate lives in a device
    tensor (read by the captured AdamW); call sync_lr() after changing param_groups' "lr".
    A capture that fails prints one warning line and the run goes on eagerly.
    """

    WARMUP = 3  # eager steps before capture (cuDNN autotuning, optimizer state, lazy inits)

    def __init__(self, acc, model, optimizer, noise_scheduler, snr, snr_gamma, grad_clip,
                 cuda_graph=False):
        self.acc, self.model, self.optimizer = acc, model, optimizer
        self.noise_scheduler, self.snr, self.snr_gamma = noise_scheduler, snr, snr_gamma
        self.clip = grad_clip or float("inf")
        self.cuda_graph, self.calls, self.graph = cuda_graph, 0, None
        if cuda_graph:
            device = next(model.parameters()).device
            if device.type != "cuda" or acc.num_processes != 1:
                raise DataError(f"--cuda-graph: needs one CUDA process (got {device.type} x "
                                f"{acc.num_processes})")
            for g in optimizer.param_groups:
                if not (g.get("capturable") and g.get("fused")):
                    raise DataError("--cuda-graph: the optimizer must be AdamW(fused=True, "
                                    "capturable=True)")
            self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
            self.sync_lr()

    def sync_lr(self):
        """Point every param group at the one lr tensor, set to the group's current value (a
        scheduler may have stored a float). No host sync: fill_ is an asynchronous kernel."""
        if not self.cuda_graph:
            return
        for g in self.optimizer.param_groups:
            if g["lr"] is not self.lr:
                self.lr.fill_(float(g["lr"]))
                g["lr"] = self.lr

    def _step(self, x0, y, layout, noise, t, weight=None):
        args = (self.model, self.noise_scheduler, x0, y, layout, noise, t, self.snr,
                self.snr_gamma, weight)
        if self.cuda_graph:  # no Accelerate wrappers: autocast (as --mixed-precision says)
            # without its weight cache, which must not outlive a capture
            bf16 = self.acc.mixed_precision == "bf16"
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                loss = diffusion_loss(*args)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        else:
            loss = diffusion_loss(*args)
            self.acc.backward(loss)
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return loss.detach(), grad_norm

    def __call__(self, *batch):
        """batch = (x0, y, layout, noise, t[, weight]), the same fields at every call -> (loss, grad
        norm) as device tensors (no host sync)."""
        self.calls += 1
        if self.cuda_graph and self.graph is None and self.calls > self.WARMUP:
            self._capture(*batch)
        if self.replaying:
            for dst, src in zip(self.static, batch, strict=True):
                dst.copy_(src)
            self.graph.replay()
            return self.static_out
        # Eager: every step without graphs; with them, the warm-up steps (on a side stream, as
        # capture wants) and every step after a failed capture.
        side = torch.cuda.Stream() if self.cuda_graph and self.graph is None else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # (a no-op for None)
            out = self._step(*batch)
            self.optimizer.zero_grad(set_to_none=True)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, *batch):
        """Record one step into self.graph (nothing runs: the caller's replay is the step); on
        failure, one warning line and self.graph = False (eager from now on)."""
        self.static = [v.clone() for v in batch]
        self.optimizer.zero_grad(set_to_none=True)  # grads are (re)written by the graph
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.static_out = self._step(*self.static)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"warning: CUDA graph capture failed ({first[:200]}); continuing without it",
                  flush=True)
            self.graph = False
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def replaying(self):
        """True once the step runs as a CUDA graph replay."""
        return self.graph is not None and self.graph is not False

    def optimizer_state(self):
        """optimizer.state_dict() with float learning rates, loadable with or without graphs."""
        state = self.optimizer.state_dict()
        for g in state["param_groups"]:  # (initial_lr stays a float: the scheduler saw floats)
            g["lr"] = float(g["lr"])
        return state


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
        signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- training

def train(cfg):
    """Train with cfg; returns the run folder. Raises NonFiniteLoss if the loss diverges."""
    cfg = replace(cfg)  # filled in below (run name); the caller's copy stays as given
    _check(cfg)
    device_kind = resolve_device(cfg.device).type
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else (
        "bf16" if device_kind == "cuda" else "no")
    # Run folder: the resumed one, the named one, or a timestamp agreed on by all ranks.
    run_dir, ckpt = _find_resume(cfg) or (None, None)
    if run_dir is None and cfg.run_name:
        run_dir = repo_path(cfg.runs_dir) / cfg.run_name
    if run_dir is not None and not ckpt and list_checkpoints(run_dir):
        raise DataError(f"{_rel(run_dir)}: already has checkpoints; continue it with --resume "
                        "latest or pick another --run-name")
    acc = Accelerator(cpu=device_kind == "cpu", mixed_precision=mp)
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    main = acc.is_main_process
    speed_up_cuda(device)
    if cfg.resume and ckpt is None:
        acc.print(f"--resume {cfg.resume}: no checkpoint found, starting a new run")
    if run_dir is None:
        name = [time.strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(name)
        run_dir = repo_path(cfg.runs_dir) / name[0]
    cfg.run_name, cfg.runs_dir = run_dir.name, portable_path(run_dir.parent)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", asdict(cfg))
    acc.print(f"config: {json.dumps(asdict(cfg))}")

    # Data: the whole uint8 set on the device; rank 0 renders missing synthetic images first.
    grounded = _conditioning(cfg, ckpt) == "ground"
    with acc.main_process_first():
        ds = ICLEVRDataset(repo_path(cfg.data_root), repo_path(cfg.train_json), in_memory=True,
                           device=cfg.device)
        if grounded:
            dropped = ds.attach_layouts(find_layouts(ds, run_dir, cfg.device, acc.print))
            if dropped:
                acc.print(f"training on {len(ds):,} images ({dropped:,} without a layout)")
    images, labels, layouts = ds.images.to(device), ds.labels.to(device), ds.layouts.to(device)
    n_images = len(ds)
    del ds
    fg = foreground_masks(images) if cfg.fg_weight != 1 else None  # (N, 1, 64, 64) bool

    # Model (a resumed run keeps its checkpoint's architecture), EMA, optimizer, schedule.
    # ema_net is a plain contiguous copy that the EMA weights (and, for saving, the raw weights)
    # are copied into: it is what gets saved and evaluated.
    torch.manual_seed(cfg.seed)
    net = load_weights(ckpt / MODEL_DIR) if ckpt else build_model(cfg.preset)
    if grounded and not ckpt:  # the prior sample.py draws layouts from
        net.set_layout_prior(layouts.cpu())
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
    snr = ac / (1 - ac)
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
    gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, rank))

    step, train_s = 0, 0.0  # optimizer steps and training seconds so far
    if ckpt:
        saved = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        _load_optimizer(optimizer, saved["optimizer"])
        lr_sched.load_state_dict(saved["lr_scheduler"])
        step, ema.optimization_step = saved["step"], saved["ema_step"]
        train_s = saved.get("train_seconds", 0.0)  # the budget and --lr-by-time go on from it
        rng = ckpt / f"rng-{rank}.pt"
        if rng.is_file():
            _set_rng_state(gen, torch.load(rng, weights_only=True))
        else:  # resumed with more processes than saved: a fresh stream for this rank
            gen.manual_seed(derive_seed(cfg.seed, rank, step))
        acc.print(f"resumed from {_rel(ckpt)} at step {step}")
    train_step = TrainStep(acc, model, optimizer, noise_scheduler, snr, cfg.snr_gamma,
                           cfg.grad_clip, cuda_graph=cfg.cuda_graph)
    if main:  # drop log records of steps after the checkpoint (or of an earlier failed start)
        _truncate_log(run_dir / "log.jsonl", step)

    n_params = count_params(net)
    log_path = run_dir / "log.jsonl"

    def log(rec):
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    log({"event": "start", "step": step, "device": str(device), "world_size": world,
         "mixed_precision": mp, "params": n_params, "images": n_images})
    acc.print(f"run {_rel(run_dir)} | {n_params / 1e6:.2f}M params | {n_images} images | "
              f"{device} x{world} | {mp} | global batch {cfg.batch_size * world}")

    bad = torch.zeros((), device=device)  # non-finite losses/grad norms, summed without a sync
    loss_sum = torch.zeros((), device=device)
    state = {"checked": step, "good_ckpt": ckpt}

    def check_finite():
        if bad.item() > 0:
            good = state["good_ckpt"]
            first = state["checked"] + 1
            where = f"step {step}" if first == step else f"steps {first}-{step}"
            raise NonFiniteLoss(f"non-finite loss or gradient at {where} (try a lower --lr); "
                                f"last good checkpoint: {_rel(good) if good else 'none'}")
        state["checked"] = step

    def save_checkpoint():
        check_finite()  # never write a poisoned checkpoint
        final, tmp = run_dir / f"checkpoint-{step}", run_dir / f".tmp-checkpoint-{step}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        torch.save(_rng_state(gen), tmp / f"rng-{rank}.pt")
        if main:  # through ema_net: safetensors needs contiguous (not channels_last) tensors
            ema_net.load_state_dict(net.state_dict())
            ema_net.save_pretrained(tmp / MODEL_DIR)
            ema.copy_to(ema_net.parameters())
            ema_net.save_pretrained(tmp / EMA_DIR)
            noise_scheduler.save_config(tmp / SCHEDULER_DIR)
            torch.save({"optimizer": train_step.optimizer_state(),
                        "lr_scheduler": lr_sched.state_dict(),
                        "step": step, "ema_step": ema.optimization_step,
                        "train_seconds": time.time() - t_start}, tmp / STATE_FILE)
        acc.wait_for_everyone()
        if main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in list_checkpoints(run_dir)[:-cfg.keep_last] if cfg.keep_last else []:
                shutil.rmtree(old, ignore_errors=True)
            plot_loss(run_dir)
            print(f"saved {_rel(final)}", flush=True)
        state["good_ckpt"] = final
        acc.wait_for_everyone()

    eval_cache = {}  # the judge and the conditions, loaded at the first eval

    def evaluate():
        if main:
            if "model" not in eval_cache:  # the same conditions at every eval
                eval_cache["model"] = _load_judge(device)
                eval_cache["conds"] = encode_batch(validation_conditions(cfg.eval_conditions))
            if eval_cache["model"] is not None:
                from evaluator import by_objects, by_objects_text, per_image
                from sample import generate

                conds = eval_cache["conds"]
                ema.copy_to(ema_net.parameters())
                imgs = generate(ema_net, conds, sampler="dpm++", steps=cfg.eval_steps,
                                guidance=cfg.eval_guidance, seed=0, batch_size=256,
                                scheduler_config=noise_scheduler.config, progress=False)
                imgs = to_float(to_uint8(imgs))  # score what a PNG would hold
                judge = eval_cache["model"]
                scores = judge.scores(imgs)
                score = float(judge.compute_acc(scores, conds))
                by_k = by_objects(per_image(scores, conds))
                print(f"eval step {step}: validation accuracy {score:.4f} ({len(conds)} "
                      f"conditions, guidance {cfg.eval_guidance}) | by number of objects "
                      f"{by_objects_text(by_k)}", flush=True)
                log({"step": step, "elapsed_s": time.time() - t_start, "eval_val_acc": score,
                     "eval_val_by_objects": by_k})
        acc.wait_for_everyone()

    stop = _StopFlag()
    t_last = time.time()
    t_start = t_last - train_s  # elapsed training time = now - t_start (evals excluded)
    first_step = last_step = step
    spent = bool(cfg.max_minutes) and train_s >= cfg.max_minutes * 60  # a resumed, finished run
    if spent:
        acc.print(f"the time budget of {cfg.max_minutes} min was spent before step {step} "
                  f"({_hms(train_s)} of training): nothing to train")
    with stop:
        while step < cfg.max_steps and not spent:
            step += 1
            idx = torch.randint(n_images, (cfg.batch_size,), generator=gen, device=device)
            x0 = to_float(images[idx])
            if cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            y, layout = labels[idx], layouts[idx]
            noise = torch.randn(x0.shape, generator=gen, device=device)
            t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen,
                              device=device)
            drop = torch.rand(cfg.batch_size, generator=gen, device=device) < cfg.cond_drop
            y = y.masked_fill(drop[:, None], 0.0)  # all-zero = "no condition" (CFG)
            if layout.shape[1]:  # ... and no objects in the maps
                layout = torch.cat([torch.where(drop[:, None, None], -1.0, layout[..., :1]),
                                    layout[..., 1:]], -1)

            batch = (x0, y, layout, noise, t)
            if fg is not None:  # object pixels weigh fg_weight, background ones 1
                batch += (1 + (cfg.fg_weight - 1) * fg[idx].float(),)
            loss, grad_norm = train_step(*batch)
            lr_sched.step()
            if cfg.lr_by_time and cfg.max_minutes:  # overrides the step-based schedule
                for g in optimizer.param_groups:
                    g["lr"] = cfg.lr * _budget_lr_factor(cfg, step, time.time() - t_start)
            train_step.sync_lr()
            ema.step(net.parameters())
            bad += (~torch.isfinite(loss)).float() + (~torch.isfinite(grad_norm)).float()
            loss_sum += loss

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                mean_loss = acc.reduce(loss_sum / (step - last_step), "mean").item()
                check_finite()
                now = time.time()
                ips = (step - last_step) * cfg.batch_size * world / (now - t_last)
                lr = float(optimizer.param_groups[0]["lr"])
                rec = {"step": step, "loss": mean_loss, "lr": lr,
                       "images_per_s": ips, "elapsed_s": now - t_start}
                log(rec)
                acc.print(f"step {step}/{cfg.max_steps} | loss {mean_loss:.4f} | "
                          f"lr {rec['lr']:.2e} | {ips:.0f} img/s | {_hms(rec['elapsed_s'])}",
                          flush=True)
                loss_sum.zero_()
                t_last, last_step = now, step
            if step == first_step + 1:  # time step 2 alone: step 1 also allocates, autotunes
                t_first = time.time()
            elif step == first_step + 2 and step % cfg.log_every:  # a slow device: say so now
                per_step = time.time() - t_first
                nxt = min(cfg.max_steps, (step // cfg.log_every + 1) * cfg.log_every)
                if per_step * (nxt - step) > 60:
                    acc.print(f"{per_step:.1f} s/step on {device}: the next status line comes at "
                              f"step {nxt}, in about {_hms(per_step * (nxt - step))}"
                              + ("; on a CPU, try --preset tiny" if device.type == "cpu"
                                 and cfg.preset != "tiny" else ""), flush=True)

            reason = _stop_reason(acc, stop, cfg, t_start, step)
            pause = time.time()
            if (cfg.save_every and step % cfg.save_every == 0) or reason or step == cfg.max_steps:
                save_checkpoint()
            if cfg.eval_every and step % cfg.eval_every == 0 and not reason:
                t_eval = time.time()
                evaluate()
                t_start += time.time() - t_eval  # evaluating is not training: off the budget
            t_last += time.time() - pause  # img/s counts training time only
            if reason:
                acc.print(f"stopped at step {step}: {reason}")
                break

    if world > 1:  # every rank must hold the weights rank 0 saved
        sums = acc.gather(param_checksum(net)[None]).tolist()
        log({"event": "ranks", "step": step, "param_checksums": sums,
             "in_sync": len(set(sums)) == 1})
    log({"event": "end", "step": step, "elapsed_s": time.time() - t_start,
         "cuda_graph_replayed": train_step.replaying})
    if main:
        plot_loss(run_dir)
    acc.wait_for_everyone()
    return run_dir


def find_layouts(ds, run_dir, device, say=print):
    """The layout file of a dataset's images (docs/layouts.md): the one beside the images; for
    the project's renders, the renderer's placement; for other images (the lab's), estimated
    from the images themselves (estimate_layouts.py) and cached in the run folder."""
    beside = layout_path(ds.root, ds.spec_path)
    spec = load_spec(ds.spec_path)
    if beside.is_file():
        return beside
    if all(is_synthetic_name(n) for n in spec):
        return render.ensure_layouts(spec, ds.spec_path, ds.root, device=device)
    cached = run_dir / beside.name
    if not cached.is_file():
        layouts, skipped, moved = estimate_layouts.estimate(ds.images, spec, ds.names)
        if len(skipped) == len(spec):
            raise DataError(f"{_rel(ds.spec_path)}: no image could be placed by "
                            f"estimate_layouts.py (first: {next(iter(skipped.values()))})")
        estimate_layouts.write_estimate(cached, layouts, skipped)
        say(f"{estimate_layouts.summary(len(spec), skipped, moved)}; wrote {_rel(cached)}")
    return cached


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
    """Linear warmup, then cosine to zero over whichever runs out first: steps or minutes."""
    frac = min(1.0, max(step / cfg.max_steps, elapsed / (cfg.max_minutes * 60)))
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
        print(f"eval: skipped ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
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
