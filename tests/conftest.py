"""Tests import the top-level scripts as modules and run them as subprocesses from the repo root."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Two slow cores: keep torch from oversubscribing them when tests run subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")


COLORS = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215),
          "green": (29, 105, 20), "brown": (129, 74, 25), "purple": (129, 38, 192),
          "cyan": (41, 208, 208), "yellow": (255, 238, 51)}


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    """12 64x64 PNGs of colored squares with a spec in the lab's format (names never rendered)
    -> train.py's --data-root and --train-json flags."""
    import json

    from PIL import Image, ImageDraw

    from dataloader import LABELS

    root = tmp_path_factory.mktemp("fake")
    spec = {}
    for i in range(12):
        labels = [LABELS[(7 * i + 5 * k) % 24] for k in range(1 + i % 3)]
        im = Image.new("RGB", (64, 64), (120, 120, 120))
        draw = ImageDraw.Draw(im)
        for k, name in enumerate(labels):
            draw.rectangle([8 + 18 * k, 24, 18 + 18 * k, 34], fill=COLORS[name.split()[0]])
        fname = f"fake_{i:03d}_{i % 3}.png"
        im.save(root / fname)
        spec[fname] = labels
    (root / "spec.json").write_text(json.dumps(spec))
    return ["--data-root", root, "--train-json", root / "spec.json"]


def pytest_configure(config):
    # diffusers' multistep schedulers call np.array() on a torch tensor, which numpy 2 flags;
    # harmless, and not ours to fix: keep it out of every test run's summary.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


# ---------------------------------------------------------------- helpers for the test files
# (imported as `from conftest import ...`: pytest puts tests/ on sys.path for its conftest)

def read_png(path):
    """A PNG as the uint8 tensor (3, H, W) it holds, no resizing (dataloader.load_image would
    squash other sizes to 64x64 and hide a wrong size)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def grid_tiles(path, n, nrow=8, size=64, padding=2):
    """The n tiles of a grid written by sample.save_grid (torchvision make_grid: `padding` px
    of white around and between size x size tiles, nrow per row) -> uint8 (n, 3, size, size).
    Fails if the grid is not exactly that shape or anything but its tiles is not white."""
    import torch

    grid = read_png(path)
    rows, step = -(-n // nrow), size + padding
    assert grid.shape == (3, padding + rows * step, padding + min(n, nrow) * step), grid.shape
    tiles, pad = [], torch.ones(grid.shape[1:], dtype=torch.bool)
    for i in range(n):
        y, x = padding + (i // nrow) * step, padding + (i % nrow) * step
        tiles.append(grid[:, y:y + size, x:x + size])
        pad[y:y + size, x:x + size] = False
    assert (grid[:, pad] == 255).all(), f"{path}: padding is not white"
    return torch.stack(tiles)


def assert_shards_hold(folder, state_dict, max_bytes):
    """folder holds state_dict split over several safetensors shards: each tensor in exactly
    the shard the index names, equal to the model's, and no shard's tensors over max_bytes
    unless it holds one tensor that size alone (what save_pretrained's max_shard_size
    promises)."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    index = json.loads(next(folder.glob("*.safetensors.index.json")).read_text())["weight_map"]
    shards = {f.name: load_file(f) for f in sorted(folder.glob("*.safetensors"))}
    assert len(shards) > 1 and set(index.values()) == set(shards)
    assert sorted(k for s in shards.values() for k in s) == sorted(state_dict)  # each once
    for name, tensors in shards.items():
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        assert size <= max_bytes or len(tensors) == 1, (name, size)
        for k, v in tensors.items():
            assert index[k] == name and torch.equal(v, state_dict[k]), k
