"""model.py's xattn conditioning (label tokens read by cross-attention) on the CPU.

Forward and save/load use a tiny override of the xattn preset; the real preset runs through
model.py's size table here and through train.py and sample.py in test_diffusion.py.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import assert_shards_hold  # noqa: E402
from dataloader import encode_batch  # noqa: E402
from model import ConditionalUNet, LabelTokens, build_model, load_weights  # noqa: E402

# The xattn preset's layout at toy widths: cross-attention at the second (16x16) level.
TINY_XATTN = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  time_embedding_dim=64, cross_attention_dim=32)


def tiny_xattn():
    torch.manual_seed(0)
    return build_model("xattn", **TINY_XATTN).eval()


def inputs():
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 900])
    y = encode_batch([["red sphere"], ["cyan cube", "gray cylinder"], ["blue cube"]])
    return x, t, y


@torch.no_grad()
def test_xattn_forward_uses_the_label_tokens():
    m = tiny_xattn()
    assert type(m.unet).__name__ == "UNet2DConditionModel"
    assert m.unet.config.in_channels == 12 and m.unet.config.sample_size == 32  # 2x2 shuffle
    x, t, y = inputs()
    out = m(x, t, y)
    # a batch is its images side by side: each output is that of the image alone (the 2x2
    # pixel shuffle and the tokens keep images apart)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], m(x[i:i + 1], t[i:i + 1], y[i:i + 1]),
                                   atol=1e-5, rtol=0)
    # the null condition is all tokens "absent": a valid input, and not the conditioned output
    null = m(x, t, torch.zeros_like(y))
    assert (out - null).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    # same color, other shape: only the tokens can tell when the global path is silenced
    m.label_proj[-1].weight.zero_()
    other = y.clone()
    other[0] = encode_batch([["red cube"]])[0]
    a, b = m(x, t, y), m(x, t, other)
    assert (a[0] - b[0]).abs().max() > 1e-4
    torch.testing.assert_close(a[1:], b[1:], atol=1e-6, rtol=0)  # no leak across the batch


def test_label_tokens():
    tok = LabelTokens(24, 8)
    y = torch.zeros(2, 24)
    y[0, 3] = 1.0
    y[1, 3] = 0.25
    z = tok(y)
    assert z.shape == (2, 24, 8)
    absent, present = tok.state_embedding.weight.detach()
    cls = tok.class_embedding.weight.detach()
    torch.testing.assert_close(z[0, 3], cls[3] + present)
    torch.testing.assert_close(z[0, 4], cls[4] + absent)
    torch.testing.assert_close(z[1, 3], cls[3] + 0.75 * absent + 0.25 * present)


def test_xattn_rejects_self_attention_blocks():
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        ConditionalUNet(conditioning="xattn", pixel_shuffle=2)  # the embed block types


def test_xattn_save_pretrained_roundtrip(tmp_path):
    m = tiny_xattn()
    m.save_pretrained(tmp_path, max_shard_size="200KB")
    assert_shards_hold(tmp_path, m.state_dict(), 200_000)
    m2 = load_weights(tmp_path)
    assert isinstance(m2, ConditionalUNet) and m2.config.conditioning == "xattn"
    assert any(k.startswith("label_tokens.") for k in m2.state_dict())
    assert m.state_dict().keys() == m2.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y), m2(x, t, y), atol=0, rtol=0)


def test_model_cli_prints_the_xattn_row(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "model.py"), "--preset", "default", "xattn"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True)
    rows = {m[1]: (m[2], float(m[3]), float(m[4])) for m in
            re.finditer(r"^(\w+)\s+(\w+)\s+([\d.]+)M\s+([\d.]+)$", p.stdout, re.M)}
    assert rows["xattn"][0] == "xattn", p.stdout
    f_def, (_, p_x, f_x) = rows["default"][2], rows["xattn"]
    assert p_x <= 20 and f_x <= 1.3 * f_def  # about default's cost
