"""Sample the benchmark conditions (or ad-hoc labels) from a trained conditional UNet.

    python sample.py                  # newest run's latest checkpoint, else weights/ddpm
    python sample.py --checkpoint runs/demo --sampler dpm++ --steps 25 --guidance 2 --out images
    python sample.py --labels "red sphere, cyan cube" --num-images 8

Writes OUT/<file stem>/{i}.png in file order, OUT/<file stem>_grid.png (8 per row) per condition
file, and OUT/denoise_process.png (x_t on top, the model's x0 estimate below) for
["red sphere", "cyan cylinder", "cyan cube"]. Image i's initial and per-step noise come only from
(seed, i), so an image does not depend on the batch size or on the other conditions.
"""
import argparse
import contextlib
import inspect
import math
import os
from pathlib import Path

# On a busy CPU, OpenMP threads that spin while they wait make sampling up to 50x slower;
# sleeping waits cost next to nothing at these batch sizes. Only effective before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataloader import (OBJECTS, ROOT, TEST_JSONS, DataError, _rel, computes_bf16,  # noqa: E402
                        encode, encode_batch, listed_order, load_conditions, load_json,
                        parse_placed_labels, resolve_device, run_cli, speed_up_cuda, to_uint8)
from model import (EMA_DIR, MODEL_DIR, RUNS_DIR, SCHEDULER_DIR, WEIGHTS_DIR,  # noqa: E402
                   derive_seed, is_weights_dir, list_checkpoints, load_weights,
                   resolve_checkpoint)

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler,
            "dpm++sde": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 25, "dpm++": 25, "dpm++sde": 25, "unipc": 25}
GUIDANCE = 2.0
PRECISIONS = ("auto", "fp32", "bf16")
PROCESS_LABELS = ["red sphere", "cyan cylinder", "cyan cube"]
PROCESS_FRAMES = 10
OUT_DIR = ROOT / "images"
SAMPLE_CONFIG = "sample_config.json"  # {"sampler", "steps", "guidance", "speedrun"} beside
# shipped weights: the settings they were scored with and the results file that scored them


# ---------------------------------------------------------------- loading

def latest_checkpoint(run_dir):
    """The newest checkpoint-STEP folder of a run."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise DataError(f"{_rel(run_dir)}: no checkpoint-* folders in this run")
    return ckpts[-1]


def default_checkpoint():
    """The latest checkpoint of the newest run under runs/, else the shipped weights."""
    latest = [ckpts[-1] for run in (RUNS_DIR.iterdir() if RUNS_DIR.is_dir() else [])
              if (ckpts := list_checkpoints(run))]
    if latest:
        return max(latest, key=lambda p: p.stat().st_mtime)
    if WEIGHTS_DIR.exists():
        return WEIGHTS_DIR
    raise DataError(f"no checkpoint: nothing under {_rel(RUNS_DIR)}/*/checkpoint-* and no "
                    f"{_rel(WEIGHTS_DIR)}; train first (python train.py) or pass --checkpoint")


def load_model(checkpoint, device, ema=True):
    """Checkpoint, run or weights folder -> (fp32 eval-mode model on device, scheduler config)."""
    device = torch.device(device)
    ckpt = resolve_checkpoint(checkpoint)
    if is_weights_dir(ckpt):  # shipped weights: one (EMA) set, scheduler config beside it
        if not ema:
            raise DataError(f"{_rel(ckpt)}: a weights folder holds only EMA weights; --no-ema "
                            "needs a training checkpoint (runs/NAME/checkpoint-STEP)")
        weights, sched = ckpt, ckpt
    else:
        weights, sched = ckpt / (EMA_DIR if ema else MODEL_DIR), ckpt / SCHEDULER_DIR
    if not (sched / DDPMScheduler.config_name).is_file():
        raise DataError(f"{_rel(sched)}: missing {DDPMScheduler.config_name}")
    model = load_weights(weights).to(device)
    if device.type == "cpu":  # oneDNN convolutions run faster in NHWC
        model = model.to(memory_format=torch.channels_last)
    return model, DDPMScheduler.load_config(sched)


def sample_config(checkpoint):
    """The sampler, steps and guidance a checkpoint folder was scored with, if it says."""
    path = Path(checkpoint) / SAMPLE_CONFIG
    return load_json(path) if path.is_file() else {}


def scored_settings(checkpoint):
    """{"sampler", "steps", "guidance"} a checkpoint was scored with (sample_config), else the
    defaults: what benches sample a checkpoint with."""
    saved = sample_config(checkpoint)
    sampler = saved.get("sampler", "dpm++")
    return {"sampler": sampler, "steps": saved.get("steps", DEFAULT_STEPS[sampler]),
            "guidance": saved.get("guidance", GUIDANCE)}


def make_sampler(name, scheduler_config):
    """A sampling scheduler built from the training schedule's config (same betas, prediction)."""
    if name not in SAMPLERS:
        raise DataError(f"--sampler: unknown sampler {name!r} (expected one of "
                        f"{', '.join(SAMPLERS)})")
    # "trailing" starts at the last training timestep (t = 999), which few-step samplers need.
    extra = {"timestep_spacing": "trailing"}
    if name in ("dpm++", "dpm++sde"):  # DPM-Solver++(2M), deterministic or with fresh noise
        extra.update(algorithm_type="dpmsolver++" if name == "dpm++" else "sde-dpmsolver++",
                     solver_order=2)
    return SAMPLERS[name].from_config(scheduler_config, **extra)


# ---------------------------------------------------------------- sampling

def _x0_estimate(sched, x, out, t):
    """The clean image implied by the model output at x_t (for the denoising strip)."""
    ac = sched.alphas_cumprod[int(t)].to(x.device)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - ac).sqrt() * out) / ac.sqrt()
    if kind == "v_prediction":
        return ac.sqrt() * x - (1 - ac).sqrt() * out
    return out  # "sample"


def use_bf16(precision, device):
    """precision 'auto': bf16 autocast on CUDA and on CPUs that compute bf16 in hardware
    (AVX-512 BF16, AMX), where it is much faster than fp32; 'fp32' or 'bf16' as said."""
    if precision not in PRECISIONS:
        raise DataError(f"--precision: expected one of {', '.join(PRECISIONS)}, got "
                        f"{precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return computes_bf16(device)


def _sample_batch(model, y, layout, gens, sampler, steps, guidance, scheduler_config,
                  trajectory, progress, interval=None, precision="auto"):
    device = y.device
    size = model.config.image_size
    sched = make_sampler(sampler, scheduler_config)
    sched.set_timesteps(steps)  # timesteps stay on the CPU, as in diffusers' DDPMPipeline
    # per-image generators for stochastic steps (ddpm); the others take none or ignore them
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    step_kw = {"generator": gens} if takes_gen else {}
    x = randn_tensor((len(y), 3, size, size), generator=gens, device=device,
                     dtype=torch.float32) * sched.init_noise_sigma
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(precision, device)
           else contextlib.nullcontext())
    y2 = torch.cat([y, torch.zeros_like(y)])  # cond half, then uncond half (no objects)
    layout2 = torch.cat([layout, torch.full_like(layout, -1.0)])
    lo, hi = interval if interval is not None else (-1, float("inf"))
    xs, x0s = ([x.cpu()] if trajectory else []), []
    for t in tqdm(sched.timesteps, desc=f"{sampler} x{len(y)}", leave=False, disable=not progress):
        guided = guidance != 1.0 and lo <= int(t) <= hi
        y_in, layout_in = (y2, layout2) if guided else (y, layout)
        x_in = sched.scale_model_input(x, t)
        x_in = torch.cat([x_in, x_in]) if guided else x_in
        with amp:
            out = model(x_in, t.to(device).expand(len(x_in)), y_in, layout_in).float()
        if guided:
            out_c, out_u = out.chunk(2)
            out = out_u + guidance * (out_c - out_u)
        if trajectory:
            x0s.append(_x0_estimate(sched, x, out, t).clamp(-1, 1).cpu())
        x = sched.step(out, t, x, **step_kw).prev_sample
        if trajectory:
            xs.append(x.cpu())
    return x.clamp(-1, 1), xs, x0s


@torch.no_grad()
def generate(model, labels, *, sampler="dpm++", steps=None, guidance=GUIDANCE, seed=0,
             device=None, batch_size=64, scheduler_config, return_trajectory=False,
             progress=True, guidance_interval=None, layouts=None, order=None, precision="auto"):
    """labels (N, 24) multi-hot -> images (N, 3, 64, 64) in [-1, 1] on the CPU.

    A grounded model draws where its objects go: layouts (N, K, 5) as model.py describes, or,
    when None, one drawn from the model's layout prior per image (from (seed, i) alone) that
    puts the objects where their place in order (dataloader.listed_order of the conditions)
    says (model.draw_layouts).

    CFG doubles each batch (condition + all-zero "no condition"): out = u + w (c - u); w = 1
    skips the unconditional half. guidance_interval=(lo, hi) guides only the steps whose
    training timestep t has lo <= t <= hi (Kynkaanniemi et al. 2024); the others run the
    conditional half alone (bench/bench_guidance.py: no gain here). steps=None: 1000 for
    ddpm, else 25. With return_trajectory, also returns {"x_t": (steps + 1, N, 3, H, W),
    "x0": (steps, N, 3, H, W)} (noise first).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    steps = steps or DEFAULT_STEPS.get(sampler, 25)
    labels = torch.as_tensor(labels, dtype=torch.float32)
    # One CPU generator per image: its noise depends on (seed, i) only, never on the batch.
    gens = [torch.Generator().manual_seed(derive_seed(seed, i)) for i in range(len(labels))]
    layouts = layouts_for(model, labels, layouts, seed, order)
    images, xs, x0s = [], [], []
    for s in range(0, len(labels), batch_size):
        img, bx, bx0 = _sample_batch(model, labels[s:s + batch_size].to(device),
                                     layouts[s:s + batch_size].to(device),
                                     gens[s:s + batch_size], sampler, steps, guidance,
                                     scheduler_config, return_trajectory, progress,
                                     guidance_interval, precision)
        images.append(img.cpu())
        xs.append(bx)
        x0s.append(bx0)
    images = torch.cat(images)
    if not return_trajectory:
        return images
    traj = {"x_t": torch.stack([torch.cat(f) for f in zip(*xs)]),
            "x0": torch.stack([torch.cat(f) for f in zip(*x0s)])}
    return images, traj


def is_grounded(model):
    return model.config.conditioning == "ground"


def layouts_for(model, labels, layouts, seed, order=None):
    """The layouts a batch samples with: the given ones, the prior's for the labels in order
    (grounded models), or none (K = 0) for label-only models."""
    if not is_grounded(model):
        if layouts is not None:
            raise DataError(f"object positions need a grounded model (this one is "
                            f"{model.config.conditioning!r}; see docs/grounded.md)")
        return torch.zeros(len(labels), 0, 5)
    if layouts is not None:
        return torch.as_tensor(layouts, dtype=torch.float32)
    return prior_layouts(model, labels, seed, order=order)


def placed_layouts(model, labels, positions, n, where="the checkpoint"):
    """Layouts (n, K, 5) that put label k at positions[k] (x, y in pixels) in each of n images,
    as dataloader.parse_placed_labels reads them; None without positions (the prior's)."""
    if positions is None:
        return None
    if not is_grounded(model):
        raise DataError(f"positions (label@x,y) need a grounded model; {where} is "
                        f"{model.config.conditioning!r}")
    return model.place([OBJECTS[name] for name in labels], positions).repeat(n, 1, 1)


def prior_layouts(model, labels, seed, apart_only=False, order=None):
    """The layouts a grounded model draws from its prior for labels (in order) at seed: image
    i from a generator of (seed, i) of its own, so the noise stays that of (seed, i) as for
    any model."""
    gens = [torch.Generator().manual_seed(derive_seed(seed, i, 1)) for i in range(len(labels))]
    return model.draw_layouts(labels, gens, apart_only=apart_only, order=order)


# ---------------------------------------------------------------- writing

def save_png(image, path):
    """uint8 (3, H, W) -> PNG, written to a temporary name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_grid(images, path, nrow=8):
    save_png(make_grid(to_uint8(images), nrow=nrow, padding=2, pad_value=255), path)


def process_strip(final, trajectory, frames=PROCESS_FRAMES, index=0):
    """Denoising strip of image index (2 * frames, 3, H, W) from generate(...,
    return_trajectory=True): x_t from noise to image on top, the model's x0 estimate below."""
    steps = len(trajectory["x0"])
    pick = np.linspace(0, steps, frames).round().astype(int).tolist()
    # x0 estimate from each x_t, and the image itself at the end
    x0 = torch.cat([trajectory["x0"][:, index], final[index:index + 1]])
    return torch.cat([trajectory["x_t"][pick, index], x0[pick]])


def save_process(model, out_dir, *, sampler, steps, guidance, seed, scheduler_config,
                 precision="auto", frames=PROCESS_FRAMES):
    """Denoising strip of PROCESS_LABELS (process_strip), as OUT/denoise_process.png."""
    steps = max(steps, frames - 1)  # enough states for the frames
    y = encode(PROCESS_LABELS)[None]
    final, traj = generate(model, y, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                           scheduler_config=scheduler_config, precision=precision,
                           order=listed_order([PROCESS_LABELS]),
                           return_trajectory=True, progress=False)
    save_grid(process_strip(final, traj, frames), Path(out_dir) / "denoise_process.png",
              nrow=frames)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="checkpoint-STEP, run or weights folder (default: newest run's latest "
                         "checkpoint, else weights/ddpm)")
    ap.add_argument("--no-ema", action="store_true", help="raw weights instead of EMA")
    ap.add_argument("--conditions", type=Path, nargs="+", default=list(TEST_JSONS),
                    help="condition files (default: test.json new_test.json)")
    ap.add_argument("--labels", default=None,
                    help='one ad-hoc condition, e.g. "red sphere,cyan cube" (writes '
                         "OUT/custom_*.png instead of the condition files)")
    ap.add_argument("--num-images", type=int, default=8, help="images for --labels")
    ap.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                    help="default: the checkpoint's sample_config.json, else dpm++")
    ap.add_argument("--steps", type=int, default=None,
                    help="default: the checkpoint's sample_config.json, else 1000 for ddpm, "
                         "else 25")
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale w (1 = none; default: the "
                         f"checkpoint's sample_config.json, else {GUIDANCE})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="auto: bf16 on CUDA and on CPUs with bf16 instructions, else fp32")
    ap.add_argument("--batch-size", type=int, default=64, help="images per batch")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise DataError(f"--steps: expected a positive number, got {args.steps}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise DataError(f"--guidance: expected a finite scale >= 0 (0 = unconditional, 1 = no "
                        f"guidance), got {args.guidance}")
    for flag in ("batch_size", "num_images"):
        if getattr(args, flag) < 1:
            raise DataError(f"--{flag.replace('_', '-')}: expected a positive number, "
                            f"got {getattr(args, flag)}")
    custom, positions = (parse_placed_labels(args.labels) if args.labels is not None
                         else (None, None))
    conditions = {} if custom else {p: load_conditions(p) for p in args.conditions}

    device = resolve_device(args.device)
    speed_up_cuda(device)  # as in training, so standalone and in-run (speedrun.py) sampling agree
    ckpt = resolve_checkpoint(args.checkpoint) if args.checkpoint else default_checkpoint()
    model, sched_cfg = load_model(ckpt, device, ema=not args.no_ema)
    # Defaults the checkpoint was scored with (speedrun.py writes them beside shipped weights).
    saved = sample_config(ckpt)
    args.sampler = args.sampler or saved.get("sampler", "dpm++")
    args.guidance = args.guidance if args.guidance is not None else saved.get("guidance", GUIDANCE)
    same = args.sampler == saved.get("sampler")  # saved steps belong to the saved sampler
    steps = args.steps or (saved.get("steps") if same else None) or DEFAULT_STEPS[args.sampler]
    print(f"checkpoint: {_rel(ckpt)} ({'raw' if args.no_ema else 'EMA'} weights) | "
          f"{args.sampler} {steps} steps, guidance {args.guidance}, seed {args.seed} | {device}")
    kw = dict(sampler=args.sampler, steps=steps, guidance=args.guidance, seed=args.seed,
              scheduler_config=sched_cfg, precision=args.precision)

    out = args.out
    if custom:
        y = encode(custom)[None].repeat(args.num_images, 1)
        layouts = placed_layouts(model, custom, positions, args.num_images, _rel(ckpt))
        images = generate(model, y, batch_size=args.batch_size, layouts=layouts,
                          order=listed_order([custom] * args.num_images), **kw)
        for i, img in enumerate(to_uint8(images)):
            save_png(img, out / f"custom_{i}.png")
        save_grid(images, out / "custom_grid.png")
        print(f"wrote {len(images)} images of {', '.join(custom)} to {_rel(out)}/custom_*.png")
        return
    for path, conds in conditions.items():
        images = generate(model, encode_batch(conds, _rel(path)), batch_size=args.batch_size,
                          order=listed_order(conds), **kw)
        for i, img in enumerate(to_uint8(images)):
            save_png(img, out / path.stem / f"{i}.png")
        save_grid(images, out / f"{path.stem}_grid.png")
        print(f"wrote {len(images)} images to {_rel(out / path.stem)}/ and "
              f"{_rel(out / path.stem)}_grid.png")
    save_process(model, out, **kw)
    print(f"wrote {_rel(out / 'denoise_process.png')}")


if __name__ == "__main__":
    run_cli(main)
