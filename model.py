"""The conditional denoiser: one diffusers UNet plus the label projection, as one model.

ConditionalUNet(x, t, y) predicts the noise (or v) of x (B, 3, 64, 64) in [-1, 1]-space at
timesteps t (B,) given multi-hot labels y (B, 24); y = all zeros is the "no condition" input that
classifier-free guidance trains and samples with. Three ways to feed y:
  embed  (default) Linear -> SiLU -> Linear to the time-embedding size, added to the time
         embedding (class_embed_type="identity") and applied through AdaGN ("scale_shift").
  concat the seed report's method: Linear(24, 64*64) as one extra input channel.
  xattn  embed's global vector plus 24 label tokens, class_embedding[c] + state_embedding[y_c]
         (absent/present), read by cross-attention in a UNet2DConditionModel: a location can
         look up which object it belongs to, which one global AdaGN vector cannot tell it. The
         null condition is "all 24 absent".
The whole model, label projection included, round-trips through save_pretrained/from_pretrained.

Checkpoint layout (written by train.py, read by sample.py):
  runs/NAME/checkpoint-STEP/{model,ema}/  config.json + safetensors (raw and EMA weights)
  runs/NAME/checkpoint-STEP/scheduler/    scheduler_config.json (the training noise schedule)
  weights folder (export_fp16):           config.json + fp16 shards + scheduler_config.json

`python model.py` prints the presets' sizes. train.py trains "xattn" unless told otherwise: it won
the 2-minute GPU ablations by far (README, "Ablations").
"""
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, DDPMScheduler, ModelMixin, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.utils import logging as diffusers_logging
from torch import nn

from dataloader import IMAGE_SIZE, NUM_CLASSES, ROOT, DataError, _rel

RUNS_DIR = ROOT / "runs"  # train.py writes runs/NAME/checkpoint-STEP/
WEIGHTS_DIR = ROOT / "weights" / "ddpm"  # shipped fp16 weights (export_fp16)
MODEL_DIR, EMA_DIR, SCHEDULER_DIR = "model", "ema", "scheduler"
SHARD_SIZE = "15MB"  # 15e6 bytes < 15 MiB: shipped shards stay small enough to commit

_D, _AD, _U, _AU = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"
_XD, _XU = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"  # self- + cross-attention + MLP (xattn)
CONDITIONINGS = ("embed", "concat", "xattn")
PRESETS = {
    # The seed report's six-level UNet on 64x64 pixels with a label-map channel: 113.67M in
    # the UNet + 0.10M label map = 113.78M (the report's 113.7M).
    "seed": dict(conditioning="concat", pixel_shuffle=1,
                 block_out_channels=(128, 128, 256, 256, 512, 512),
                 down_block_types=(_D, _D, _D, _D, _AD, _D),
                 up_block_types=(_U, _AU, _U, _U, _U, _U),
                 layers_per_block=2, attention_head_dim=8,
                 resnet_time_scale_shift="default"),
    # 2x2 space-to-depth (objects are 4-9 px wide, so 32x32 tokens still resolve them) with
    # attention at 16x16 and 8x8: 15.0M params, 8.0 GFLOP/img, small enough to sample on a CPU.
    "default": dict(conditioning="embed", pixel_shuffle=2, block_out_channels=(128, 160, 192),
                    down_block_types=(_D, _AD, _AD), up_block_types=(_AU, _AU, _U),
                    layers_per_block=2, attention_head_dim=32, time_embedding_dim=256),
    # "default" with cross-attention to the label tokens at 16x16 and 8x8 (where "default" has
    # self-attention): 17.7M params, 9.0 GFLOP/img. Each transformer block adds a GEGLU MLP, so
    # the 8x8 level is 160 wide, not 192 (21.5M params otherwise); 16x16, where objects are 1-2
    # tokens wide and binding happens, keeps its width. 128-d tokens: there are only 48 of them.
    "xattn": dict(conditioning="xattn", pixel_shuffle=2, block_out_channels=(128, 160, 160),
                  down_block_types=(_D, _XD, _XD), up_block_types=(_XU, _XU, _U),
                  layers_per_block=2, attention_head_dim=32, time_embedding_dim=256,
                  cross_attention_dim=128),
    # "default" at 4x4 space-to-depth (16x16 tokens of 48 values, attention at every level):
    # the same 15.4M params for 2.3 GFLOP/img, 3.4x fewer. The judge still reads renders
    # squeezed to 24x24 and back (results/resolution-judge-cpu.json), so 16x16 tokens hold the
    # information it needs; the speedrun is short of training images, not of resolution.
    "fast": dict(conditioning="embed", pixel_shuffle=4, block_out_channels=(128, 160, 192),
                 down_block_types=(_AD, _AD, _AD), up_block_types=(_AU, _AU, _AU),
                 layers_per_block=2, attention_head_dim=32, time_embedding_dim=256),
    # xattn at 4x4 space-to-depth: the two gains of the 2-minute H200 ablations together (xattn
    # +0.31, fast +0.09 and 2x the images/s: results/speedrun-h200-short-*.json). Cross-attention
    # at 16x16 (objects 1-2 tokens wide), 8x8 and 4x4: 19.6M params, 3.3 GFLOP/img (xattn/2.7).
    "xfast": dict(conditioning="xattn", pixel_shuffle=4, block_out_channels=(128, 160, 160),
                  down_block_types=(_XD, _XD, _XD), up_block_types=(_XU, _XU, _XU),
                  layers_per_block=2, attention_head_dim=32, time_embedding_dim=256,
                  cross_attention_dim=128),
    # For CPU tests and demos (0.8M params, 0.6 GFLOP/img). Not 4x4 space-to-depth: conv_in
    # must not have fewer channels than its 3*s*s inputs, or the model cannot pass the
    # per-pixel noise through and never denoises fine detail.
    "tiny": dict(conditioning="embed", pixel_shuffle=2, block_out_channels=(32, 64),
                 down_block_types=(_D, _AD), up_block_types=(_AU, _U), layers_per_block=1,
                 attention_head_dim=32, norm_num_groups=8, time_embedding_dim=128),
}


class LabelTokens(nn.Module):
    """Multi-hot y (B, C) -> one token per class (B, C, D): class_embedding[c] +
    state_embedding[y_c], state 0 = absent, 1 = present; fractional y_c interpolates."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes, dim)
        self.state_embedding = nn.Embedding(2, dim)

    def forward(self, y):
        absent, present = self.state_embedding.weight
        y = y.to(absent.dtype)[..., None]
        return self.class_embedding.weight + absent + y * (present - absent)


class ConditionalUNet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, conditioning="embed", num_classes=NUM_CLASSES, image_size=IMAGE_SIZE,
                 pixel_shuffle=1, block_out_channels=(128, 256, 256),
                 down_block_types=(_D, _AD, _AD), up_block_types=(_AU, _AU, _U),
                 layers_per_block=2, attention_head_dim=32, norm_num_groups=32,
                 time_embedding_dim=None, resnet_time_scale_shift="scale_shift", dropout=0.0,
                 cross_attention_dim=128):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, got "
                             f"{conditioning!r}")
        if image_size % pixel_shuffle:
            raise ValueError(f"image_size {image_size} is not divisible by pixel_shuffle")
        s2 = pixel_shuffle ** 2
        temb = time_embedding_dim or 4 * block_out_channels[0]
        embed = conditioning in ("embed", "xattn")  # both add label_proj(y) to the time embedding
        kw = dict(sample_size=image_size // pixel_shuffle,
                  in_channels=(3 if embed else 4) * s2, out_channels=3 * s2,
                  block_out_channels=tuple(block_out_channels),
                  down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
                  layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
                  time_embedding_dim=temb, dropout=dropout,
                  resnet_time_scale_shift=resnet_time_scale_shift,
                  class_embed_type="identity" if embed else None)
        if conditioning == "xattn":
            blocks = {*down_block_types, *up_block_types}
            if not blocks <= {_D, _XD, _U, _XU}:
                raise ValueError(f"xattn takes {_D}/{_XD} and {_U}/{_XU} blocks, got "
                                 f"{sorted(blocks - {_D, _XD, _U, _XU})}")
            # UNet2DConditionModel's attention_head_dim is the number of heads (diffusers issue
            # 2011; num_attention_heads is refused), so convert our head width per level.
            heads = tuple(max(1, c // attention_head_dim) for c in block_out_channels)
            self.unet = UNet2DConditionModel(**kw, attention_head_dim=heads,
                                             cross_attention_dim=cross_attention_dim)
            self.label_tokens = LabelTokens(num_classes, cross_attention_dim)
        else:
            self.unet = UNet2DModel(**kw, attention_head_dim=attention_head_dim)
        if embed:
            self.label_proj = nn.Sequential(nn.Linear(num_classes, temb), nn.SiLU(),
                                            nn.Linear(temb, temb))
        else:
            self.label_proj = nn.Linear(num_classes, image_size * image_size)

    def forward(self, x, t, y):
        cfg = self.config
        y = y.to(self.label_proj_dtype)
        class_labels, extra = None, {}
        if cfg.conditioning == "concat":
            label_map = self.label_proj(y).view(-1, 1, cfg.image_size, cfg.image_size)
            x = torch.cat([x, label_map.to(x.dtype)], dim=1)
        else:
            class_labels = self.label_proj(y)
        if cfg.conditioning == "xattn":
            extra["encoder_hidden_states"] = self.label_tokens(y)
        if cfg.pixel_shuffle > 1:
            x = F.pixel_unshuffle(x, cfg.pixel_shuffle)
        out = self.unet(x, t, class_labels=class_labels, return_dict=False, **extra)[0]
        if cfg.pixel_shuffle > 1:
            out = F.pixel_shuffle(out, cfg.pixel_shuffle)
        return out

    @property
    def label_proj_dtype(self):
        return next(self.label_proj.parameters()).dtype


def build_model(preset="default", **overrides):
    if preset not in PRESETS:
        raise DataError(f"--preset: unknown preset {preset!r} (expected one of "
                        f"{', '.join(PRESETS)})")
    return ConditionalUNet(**{**PRESETS[preset], **overrides})


def make_noise_scheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon"):
    """The training noise schedule; its config is saved with every checkpoint."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def flops_per_image(model):
    """Forward FLOPs of one image (2 per multiply-add), counted by torch's FlopCounterMode.
    Attention runs on SDPA's math backend here: the counter has no formula for the fused CPU
    kernel and would count its matmuls as zero."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    size = model.config.image_size
    x = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
    t = torch.zeros(1, dtype=torch.long, device=p.device)
    y = torch.zeros(1, model.config.num_classes, device=p.device, dtype=p.dtype)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, t, y)
    return counter.get_total_flops()


def derive_seed(*ints):
    """A well-mixed 32-bit seed from integers, e.g. (seed, image index) or (seed, rank)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1)[0])


# ---------------------------------------------------------------- checkpoint folders

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir):
    """Complete checkpoint-STEP folders of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def is_weights_dir(path):
    """A save_pretrained folder (not a run folder, whose config.json is the training config)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_checkpoint(path):
    """A checkpoint-STEP folder, a weights folder, or a run folder (-> its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{_rel(path)}: checkpoint not found")
    if (path / EMA_DIR).is_dir() or is_weights_dir(path):
        return path
    ckpts = list_checkpoints(path)
    if ckpts:
        return ckpts[-1]
    raise DataError(f"{_rel(path)}: not a checkpoint (expected config.json, {EMA_DIR}/ and "
                    f"{MODEL_DIR}/, or checkpoint-*/ folders)")


def load_weights(path, dtype=torch.float32):
    """A saved ConditionalUNet folder -> model (eval mode, fp32 by default, safetensors only)."""
    path = Path(path)
    if not is_weights_dir(path):
        raise DataError(f"{_rel(path)}: not a model folder (expected config.json and "
                        "*.safetensors)")
    bar = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # no "Loading checkpoint shards" bar per load
    try:
        model = ConditionalUNet.from_pretrained(path, use_safetensors=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{_rel(path)}: cannot load model ({first})") from None
    finally:
        if bar:
            diffusers_logging.enable_progress_bar()
    # from_pretrained records the source path in the config; drop it so a re-saved model
    # (export, resumed training) does not carry a stale machine-specific path.
    model._internal_dict = FrozenDict({k: v for k, v in model.config.items()
                                       if k != "_name_or_path"})
    return model.eval()


def export_fp16(src_checkpoint_dir, dst_dir):
    """EMA weights of a checkpoint (or run) -> dst_dir: fp16 safetensors shards of <= 15 MiB,
    config.json and scheduler_config.json, loadable by sample.py --checkpoint dst_dir."""
    src = resolve_checkpoint(src_checkpoint_dir)
    if is_weights_dir(src):
        weights, sched = src, src
    else:
        weights, sched = src / EMA_DIR, src / SCHEDULER_DIR
    return save_fp16(load_weights(weights), DDPMScheduler.load_config(sched), dst_dir)


def save_fp16(model, scheduler_config, dst_dir):
    """model -> dst_dir as fp16 safetensors shards of <= 15 MiB with config.json and
    scheduler_config.json (a weights folder), swapped in whole for any older one."""
    model = model.half()
    dst = Path(dst_dir)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=SHARD_SIZE)
    DDPMScheduler.from_config(scheduler_config).save_config(tmp)
    old = dst.with_name(f".old-{dst.name}")
    if dst.exists():  # swap in the new folder with two renames, never a half-written one
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def main():
    import argparse

    ap = argparse.ArgumentParser(description="Print the presets' parameter counts and FLOPs.")
    ap.add_argument("--preset", nargs="*", default=list(PRESETS), help="presets to show")
    args = ap.parse_args()
    print(f"{'preset':8s} {'conditioning':12s} {'params':>10s} {'GFLOP/img':>10s}")
    for name in args.preset:
        m = build_model(name)
        print(f"{name:8s} {m.config.conditioning:12s} {count_params(m) / 1e6:9.2f}M "
              f"{flops_per_image(m) / 1e9:10.2f}")


if __name__ == "__main__":
    from dataloader import run_cli

    run_cli(main)
