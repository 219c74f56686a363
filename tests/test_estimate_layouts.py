"""Layouts estimated from images and labels alone (estimate_layouts.py): against the renderer's
true layouts with a still and a moving camera, and through train.py on a folder laid out like
the lab's real data (320x240 PNGs, CLEVR_train_ names, no layout file)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import estimate_layouts  # noqa: E402
import render  # noqa: E402
from dataloader import OBJECTS, ICLEVRDataset, layout_path  # noqa: E402
from model import load_weights  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def distances(estimated, truth):
    return np.array([np.hypot(e["x"] - t["x"], e["y"] - t["y"])
                     for name in estimated for e, t in zip(estimated[name], truth[name])])


@pytest.fixture(scope="module")
def scenes():
    spec = render.make_spec(12, 3, seed=11, prefix="CLEVR_train_")
    return spec, render.render_tensor(spec, 11, "cpu"), render.spec_layouts(spec, 11, "cpu")


def test_steps_of_a_still_camera_place_the_objects_within_2_px(scenes):
    spec, images, truth = scenes
    est, skipped, moved = estimate_layouts.estimate(images, spec)
    assert not skipped and moved == 0
    assert [o["label"] for o in est["CLEVR_train_000003_2.png"]] == \
        spec["CLEVR_train_000003_2.png"]
    d = distances(est, truth)
    assert len(d) == 72 and np.mean(d <= 2) >= 0.97 and d.max() < 4 and d.mean() < 1.0
    # sizes follow the renderer's (a sphere's radius at the object's distance) within 15%
    size = np.array([e["rx"] / t["rx"] for n in est for e, t in zip(est[n], truth[n])])
    assert np.abs(size - 1).mean() < 0.15
    # the images in another order give the same layouts
    order = list(spec)[::-1]
    again, _, _ = estimate_layouts.estimate(images.flip(0), spec, order)
    assert again == est


def test_a_moving_camera_is_noticed_and_placed_by_color(scenes):
    spec, still, _ = scenes
    images = render.render_tensor(spec, 11, "cpu", camera_moves=True)
    truth = render.spec_layouts(spec, 11, "cpu", camera_moves=True)
    assert (images[1].float() - still[1].float()).abs().max() > 50  # the camera did move
    est, skipped, moved = estimate_layouts.estimate(images, spec)
    assert moved >= 6
    d = distances(est, truth)
    assert len(skipped) <= 2 and np.mean(d <= 2) >= 0.75


def test_images_without_steps_and_two_objects_of_one_color():
    spec = {"a.png": ["red cube"], "b.png": ["cyan sphere"], "c.png": ["red cube", "cyan sphere"],
            "d.png": ["red cube", "red sphere"]}
    images = render.render_tensor(spec, 2, "cpu")
    truth = render.spec_layouts(spec, 2, "cpu")
    est, skipped, _ = estimate_layouts.estimate(images, spec)
    assert skipped == {"d.png": "two objects of one color and no earlier step to tell them "
                                "apart"}
    assert distances({"c.png": est["c.png"]}, truth).max() <= 2.0
    assert estimate_layouts.summary(4, skipped, 0) == (
        "layouts estimated for 3 of 4 images, 1 skipped (two objects of one color and no "
        "earlier step to tell them apart: 1; first: d.png); 0 scenes with a moving camera "
        "placed by color")


def test_train_estimates_the_layouts_of_lab_format_data_and_trains(scenes, tmp_path):
    spec, images, truth = scenes
    data = tmp_path / "iclevr"
    data.mkdir()
    spec = {**spec, "CLEVR_train_odd.png": ["red cube", "red sphere"]}  # cannot be placed
    images = np.concatenate([images.numpy(), render.render_tensor(
        {"CLEVR_train_odd.png": spec["CLEVR_train_odd.png"]}, 0, "cpu").numpy()])
    for name, img in zip(spec, images):  # as the lab's: 320x240 RGB
        Image.fromarray(img.transpose(1, 2, 0)).resize((320, 240), Image.BICUBIC).save(
            data / name)
    (tmp_path / "train.json").write_text(json.dumps(spec))
    args = ["--preset", "tiny-ground", "--batch-size", "4", "--warmup-steps", "1", "--device",
            "cpu", "--data-root", data, "--train-json", tmp_path / "train.json", "--runs-dir",
            tmp_path / "runs", "--run-name", "real", "--max-steps", 2]
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("layouts estimated")]
    assert len(lines) == 1 and lines[0].startswith(
        "layouts estimated for 36 of 37 images, 1 skipped (two objects of one color and no "
        "earlier step to tell them apart: 1; first: CLEVR_train_odd.png); 0 scenes with a "
        "moving camera placed by color; wrote ")
    assert "training on 36 images (1 without a layout)" in p.stdout
    # the data stays untouched: no layout file written beside it, only the PNGs there
    assert not layout_path(data, tmp_path / "train.json").exists()
    assert sorted(f.name for f in data.iterdir()) == sorted(spec)
    cached = tmp_path / "runs" / "real" / "train_layouts.json"
    est = json.loads(cached.read_text())
    assert est["estimated"] is True and list(est["skipped"]) == ["CLEVR_train_odd.png"]
    d = distances(est["layouts"], truth)
    assert len(d) == 72 and np.mean(d <= 2) >= 0.95
    # the dataset reads the estimate: each image's objects at the estimated places
    ds = ICLEVRDataset(data, tmp_path / "train.json", layouts=cached)
    assert len(ds) == 36 and "CLEVR_train_odd.png" not in ds.names
    for name, lay in zip(ds.names, ds.layouts):
        objs = est["layouts"][name]
        want = torch.tensor([[OBJECTS[o["label"]], o["x"], o["y"], o["rx"], o["ry"]]
                             for o in objs])
        torch.testing.assert_close(lay[:len(objs)], want)
        assert (lay[len(objs):, 0] == -1).all()  # the rest of the 3 slots: no object
    # and the model trained on it keeps those layouts as its prior
    net = load_weights(tmp_path / "runs" / "real" / "checkpoint-2" / "ema")
    prior = ds.layouts[..., 1:].clone()
    prior[ds.layouts[..., 0] < 0] = float("nan")
    torch.testing.assert_close(net.layout_prior, prior, equal_nan=True)
    # the script alone writes the same estimate
    p = subprocess.run([sys.executable, str(ROOT / "estimate_layouts.py"), "--data-root", data,
                        "--train-json", tmp_path / "train.json", "--out", tmp_path / "e.json"],
                       capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "e.json").read_text()) == est
