"""Train the judge: the lab's ResNet18 classifier, on synthetic renders with 1 to 5 objects.

Sized for one short GPU job (results/judge-h200.json says how long it took), so everything
stays on the device: scenes are rendered straight into memory with render.render_tensor (PNG is
lossless, so these are the pixels a PNG round-trip would give), augmented in batches and fed to
a bf16-autocast ResNet18. Folders of PNGs from elsewhere (the lab's format, e.g. Blender
renders) join the training set with --data or are scored with --held-out; --init fine-tunes a
judge instead of starting from random weights. --max-minutes bounds the training loop: the LR
schedule follows max(step / steps, elapsed / budget), so it anneals to zero however fast the
card is.
--deadline-minutes shortens training when rendering was slow, and Ctrl-C / SIGINT ends training
early; either way the weights are still saved and scored.

    python train_judge.py                    # defaults sized for one H100: ~2 minutes in all
    python train_judge.py --device cpu --train-scenes 16 --val-scenes 4 --steps 5 \\
        --batch-size 16 --bench-renders 0 --out /tmp/judge   # CPU smoke run (~1 minute)
    bash bench/judges_blender.sh             # judges for Blender i-CLEVR (docs/data.md)

Writes weights/judge/ (fp16 shards + judge.json with the held-out metrics), results/
judge-<device>.json and a JSONL log; prints a table of held-out accuracy by the lab's rule.
"""
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2.functional import gaussian_blur

import dataloader
from flags import config_from_flags, option
from dataloader import (ROOT, DataError, command_line, computes_bf16, device_tag, resolve_device,
                        speed_up_cuda, to_float)
from evaluate import reference_renders
from evaluator import (build_judge, evaluation_model, load_weights, save_judge, topk_hits, trunk,
                       write_meta)

TARGETS = {"1-3 objects": 0.995, "4-5 objects": 0.99}
HELD_OUT_TARGETS = {"1-3 objects": 0.99, "4-5 objects": 0.98}  # --held-out: other renderers
RESERVE_S = 15  # of the deadline, kept for saving, scoring the held-out set and benchmark renders


@dataclass
class Config:
    train_scenes: int = option(20000, "training scenes; x5 images (the first 1..5 objects of "
                                      "each); 0: train on --data folders only")
    data: tuple = option((), "also train on these folders of PNGs, each with its labels.json "
                            "(the lab's train.json format; squashed to 64x64)")
    held_out: tuple = option((), "also score these folders of PNGs (each with its labels.json), "
                                "by number of objects")
    init: str = option("", "start from this judge (a weights folder, .pth or .safetensors) "
                           "instead of random weights: fine-tuning")
    val_scenes: int = option(2000, "held-out scenes (x5 images)")
    bench_renders: int = option(16, "also score this many renders of each benchmark condition "
                                    "(evaluate.py's FD reference renders; 0: skip)")
    epochs: float = option(30.0, "passes over the training images (on a GPU --max-minutes "
                                 "usually ends it first)")
    steps: int = option(0, "optimizer steps (> 0 overrides --epochs)")
    max_minutes: float = option(1.4, "time bound of the training loop")
    deadline_minutes: float = option(1.9, "the whole run (rendering, training, scoring; not the "
                                          "imports) ends by then: training is cut short if "
                                          "rendering was slow (0: no deadline)")
    batch_size: int = option(512, "images per optimizer step")
    lr: float = option(2e-3, "AdamW peak learning rate")
    weight_decay: float = option(0.05, "AdamW decay of the weights (not of biases and norms)")
    warmup: float = option(0.05, "fraction of training spent warming up")
    shift: int = option(2, "max translation in pixels (pad + crop)")
    flip: float = option(0.5, "probability of a horizontal flip")
    blur: float = option(0.3, "probability of a mild blur: half gaussian, half 2x down-up "
                              "resampling")
    noise: float = option(0.05, "max std of the gaussian noise added to half the images "
                                "([-1, 1] units)")
    seed: int = option(0, "model init, data order and augmentation")
    data_seed: int = option(1001, "training scenes (kept apart from the generator's training "
                                  "set)")
    val_seed: int = option(2002, "held-out scenes")
    device: str = option("auto", "auto (cuda, mps, cpu) or a torch device")
    precision: str = option("auto", "auto (bf16 autocast where the device computes it: "
                                    "dataloader.computes_bf16), bf16 or fp32")
    out: str = option(str(ROOT / "weights" / "judge"), "weights folder")
    results: str = option("", "metrics file; empty: results/judge-<gpu or device type>.json")
    log: str = option(str(ROOT / "runs" / "judge" / "log.jsonl"),
                      "JSONL log, one record per status line")
    log_every: int = option(100, "steps between status lines")


def parse_args(argv=None):
    cfg = config_from_flags(Config, argv, __doc__.split("\n\n")[0])
    for name in ("val_scenes", "batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise DataError(f"--{name.replace('_', '-')}: expected a positive integer")
    if cfg.train_scenes < 0 or (cfg.train_scenes == 0 and not cfg.data):
        raise DataError("--train-scenes: expected a positive integer (0 only with --data)")
    for name in ("epochs", "max_minutes", "lr"):
        if not getattr(cfg, name) > 0:
            raise DataError(f"--{name.replace('_', '-')}: expected a positive number")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise DataError(f"--precision: expected auto, bf16 or fp32, got {cfg.precision!r}")
    return cfg


def render_split(n_scenes, seed, prefix, device):
    """n_scenes scenes of 5 distinct objects -> 5 * n_scenes images (uint8, on device), labels."""
    import render  # the renderer is only needed here

    spec = render.make_spec(n_scenes, objects=5, min_objects=1, seed=seed, prefix=prefix)
    images = render.render_tensor(spec, seed=seed, device=str(device), progress=True)
    return images.to(device), dataloader.encode_batch(list(spec.values()), prefix).to(device)


def load_folder(folder, device):
    """A folder of PNGs with its labels.json -> (uint8 images (N, 3, 64, 64), labels) on device."""
    ds = dataloader.ICLEVRDataset(folder, Path(folder) / "labels.json", in_memory=True)
    return ds.images.to(device), ds.labels.to(device)


def training_set(cfg, device):
    """The synthetic renders (--train-scenes) and the --data folders, together."""
    parts = [render_split(cfg.train_scenes, cfg.data_seed, "SYN_judgetrain_", device)
             ] if cfg.train_scenes else []
    parts += [load_folder(folder, device) for folder in cfg.data]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def augment(x, cfg, gen, cpu_gen):
    """Label-preserving augmentation of a float batch in [-1, 1], on its device.

    Nothing that changes what the labels say: no color jitter, shifts small enough to keep
    objects in view. Blur, 2x resampling and noise make the judge robust to generated images.
    """
    b, dev = len(x), x.device

    def coin(p):
        return (torch.rand(b, 1, 1, 1, device=dev, generator=gen) < p)

    if cfg.shift > 0:
        s, n = cfg.shift, x.shape[-1]
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        dy, dx = torch.randint(0, 2 * s + 1, (2, b, 1), device=dev, generator=gen)
        ar = torch.arange(n, device=dev)
        rows, cols = (dy + ar)[:, None, :, None], (dx + ar)[:, None, None, :]
        x = padded[torch.arange(b, device=dev)[:, None, None, None],
                   torch.arange(3, device=dev)[None, :, None, None], rows, cols]
    if cfg.flip > 0:
        x = torch.where(coin(cfg.flip), x.flip(3), x)
    if cfg.blur > 0:
        sigma = 0.4 + 0.6 * torch.rand((), generator=cpu_gen).item()  # one per batch: no sync
        blurred = gaussian_blur(x, [5, 5], [sigma, sigma])
        resampled = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear",
                                  align_corners=False)
        u = torch.rand(b, 1, 1, 1, device=dev, generator=gen)
        x = torch.where(u < cfg.blur / 2, blurred, torch.where(u < cfg.blur, resampled, x))
    if cfg.noise > 0:
        std = cfg.noise * torch.rand(b, 1, 1, 1, device=dev, generator=gen) * coin(0.5)
        x = x + std * torch.randn(x.shape, device=dev, generator=gen)
    return x.clamp(-1, 1)


def lr_factor(progress, warmup):
    """Linear warmup, then cosine to zero; progress in [0, 1]."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train(cfg, images, labels, device, bf16, log, budget):
    """Train a fresh judge for --steps/--epochs or budget seconds, whichever ends first.

    Ctrl-C (or the SIGINT of a `timeout`) ends training early; the caller still saves and
    scores what was trained.
    """
    torch.manual_seed(cfg.seed)  # the init depends on the seed only, not on what ran before
    net = build_judge()
    if cfg.init:
        load_weights(net, cfg.init)
    net = net.to(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net = net.to(memory_format=fmt).train()
    params = list(net.parameters())  # no weight decay on biases and BatchNorm scales
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1]},
                             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    n, bs = len(images), min(cfg.batch_size, len(images))
    per_epoch = n // bs
    total = cfg.steps or max(1, round(cfg.epochs * per_epoch))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    cpu_gen = torch.Generator().manual_seed(cfg.seed)
    step, progress, loss_sum, t0 = 0, 0.0, torch.zeros((), device=device), time.perf_counter()
    print(f"training: {n} images, batch {bs}, up to {total} steps or {budget:.0f}s")
    try:
        while progress < 1:
            if step % per_epoch == 0:
                perm = torch.randperm(n, generator=cpu_gen).to(device)
            idx = perm[(step % per_epoch) * bs:(step % per_epoch + 1) * bs]
            x = augment(to_float(images[idx]), cfg, gen, cpu_gen).contiguous(memory_format=fmt)
            lr = cfg.lr * lr_factor(progress, cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = net.fc[0](trunk(net, x))  # BCE on logits: stable, allowed in autocast
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step += 1
            elapsed = time.perf_counter() - t0
            progress = max(step / total, elapsed / budget)
            if step % cfg.log_every == 0 or progress >= 1:
                count = (step - 1) % cfg.log_every + 1  # steps since the last status line
                rec = {"step": step, "epoch": round(step / per_epoch, 3),
                       "loss": loss_sum.item() / count, "lr": lr,
                       "images_per_s": round(step * bs / elapsed), "elapsed_s": round(elapsed, 2)}
                loss_sum.zero_()
                print(f"step {step:5d} | epoch {rec['epoch']:6.2f} | loss {rec['loss']:.5f} | "
                      f"lr {lr:.2e} | {rec['images_per_s']} img/s | {elapsed:.1f}s", flush=True)
                log.write(json.dumps(rec) + "\n")
                log.flush()
    except KeyboardInterrupt:
        print(f"interrupted at step {step}: saving and scoring what was trained", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return net.to(memory_format=torch.contiguous_format).eval(), {
        "steps": step, "epochs": round(step / per_epoch, 3), "images_seen": step * bs,
        "train_seconds": round(seconds, 2), "images_per_second": round(step * bs / seconds),
        "interrupted": progress < 1}


def metrics(judge, images, labels, groups):
    """The lab's accuracy, exact top-k sets and exact thresholded sets, per group of images."""
    scores, labels = judge.scores(images), labels.cpu()
    ks, hits, _ = topk_hits(scores, labels)
    exact_threshold = ((scores > 0.5) == (labels > 0.5)).all(1)
    out = {}
    for name, mask in groups(ks).items():
        if mask.any():
            out[name] = {"images": int(mask.sum()), "correct": int(hits[mask].sum()),
                         "total": int(ks[mask].sum()),
                         "accuracy": hits[mask].sum().item() / ks[mask].sum().item(),
                         "exact_topk": (hits[mask] == ks[mask]).float().mean().item(),
                         "exact_threshold": exact_threshold[mask].float().mean().item()}
    return out


def print_table(results):
    print(f"{'':28s} {'images':>7s} {'accuracy':>9s} {'exact top-k':>12s} {'exact >0.5':>11s}"
          "  target")
    for name, m in results.items():
        target = TARGETS.get(name) or next((t for k, t in HELD_OUT_TARGETS.items()
                                            if name.endswith(" " + k)), None)
        verdict = "" if target is None else \
            f"  >= {target} {'met' if m['accuracy'] >= target else 'MISSED'}"
        print(f"{name:28s} {m['images']:7d} {m['accuracy']:9.4f} {m['exact_topk']:12.4f} "
              f"{m['exact_threshold']:11.4f}{verdict}")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def main(argv=None):
    t0 = time.perf_counter()
    cfg = parse_args(argv)
    device = resolve_device(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and computes_bf16(device))
    speed_up_cuda(device)
    out = Path(cfg.out)
    results_path = Path(cfg.results or ROOT / "results" / f"judge-{device_tag(device)}.json")
    log_path = Path(cfg.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    train_x, train_y = training_set(cfg, device)
    val_x, val_y = render_split(cfg.val_scenes, cfg.val_seed, "SYN_judgeval_", device)
    render_s = time.perf_counter() - t0
    print(f"rendered {len(train_x)} training + {len(val_x)} held-out images in {render_s:.1f}s")

    budget = cfg.max_minutes * 60
    if cfg.deadline_minutes > 0:
        left = cfg.deadline_minutes * 60 - (time.perf_counter() - t0) - RESERVE_S
        if left < budget:
            budget = max(left, 5.0)
            print(f"note: training for {budget:.0f}s only, to end by --deadline-minutes "
                  f"{cfg.deadline_minutes:g}")
    with open(log_path, "w") as log:
        net, stats = train(cfg, train_x, train_y, device, bf16, log, budget)
    del train_x, train_y

    # Measure what ships: save the fp16 weights and load them back through the lab's interface.
    config = {**asdict(cfg), "out": dataloader._rel(out), "results": dataloader._rel(results_path),
              "log": dataloader._rel(log_path)}
    meta = {"config": config, "command": command_line()}
    save_judge(net, out, meta)
    judge = evaluation_model(out, device)
    held_out = metrics(judge, val_x, val_y, lambda ks: {
        "1-3 objects": ks <= 3, "4-5 objects": ks >= 4, "all held-out": ks > 0})
    for folder in cfg.held_out:
        name = Path(folder).name
        x, y = load_folder(folder, device)
        held_out.update(metrics(judge, x, y, lambda ks, name=name: {
            f"{name} 1-3 objects": ks <= 3, f"{name} 4-5 objects": ks >= 4}))
    if cfg.bench_renders > 0:  # the very renders evaluate.py uses as its FD reference
        conds = [c for p in dataloader.TEST_JSONS for c in dataloader.load_conditions(p)]
        bench_x = reference_renders(conds, cfg.bench_renders, device=device)
        bench_y = dataloader.encode_batch([c for c in conds for _ in range(cfg.bench_renders)])
        held_out.update(metrics(judge, bench_x, bench_y, lambda ks: {
            f"benchmark conditions x{cfg.bench_renders}": ks > 0}))
    print_table(held_out)

    report = {"name": "judge", "device": device_name(device),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "torchvision": torchvision.__version__,
                           "cuda": torch.version.cuda},
              "command": meta["command"], "config": meta["config"], "metrics": held_out,
              "render_seconds": round(render_s, 2),
              "total_seconds": round(time.perf_counter() - t0, 2), **stats}
    write_meta(out, {**judge.meta, **{k: report[k] for k in ("device", "versions", "metrics")},
                     **stats})
    dataloader.write_json(results_path, report)
    print(f"saved {dataloader._rel(out)}/ and {dataloader._rel(results_path)} "
          f"({stats['images_seen']} images seen in {stats['train_seconds']:.1f}s)")


if __name__ == "__main__":
    dataloader.run_cli(main)
