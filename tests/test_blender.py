"""The lab's kind of data, for real: a committed fixture of Blender i-CLEVR renders (CLEVR's own
scene and assets, 320x240 at 128 samples per pixel, as the lab's images are; made by
bench/render_blender.sh, with every object's true position in layouts.json) read by the
project's own code paths: layout estimation, training as a lab user runs it, the judge."""
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
from dataloader import ICLEVRDataset, load_json, load_spec  # noqa: E402
from evaluator import evaluation_model  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "blender"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(not (FIXTURE / "labels.json").is_file(),
                                reason="no Blender fixture (bash bench/render_blender.sh)")


def fixture_set():
    return ICLEVRDataset(FIXTURE, FIXTURE / "labels.json", in_memory=True)


def test_fixture_is_the_labs_kind_of_image():
    spec = load_spec(FIXTURE / "labels.json")
    assert len(spec) >= 18 and all(n.startswith("BLENDER_fixture_") for n in spec)
    with Image.open(FIXTURE / next(iter(spec))) as im:
        assert im.size == (320, 240) and im.mode in ("RGB", "RGBA")


def test_layouts_estimated_from_blender_renders_are_the_true_ones():
    ds = fixture_set()
    truth = load_json(FIXTURE / "layouts.json")["layouts"]
    est, skipped, moved = estimate_layouts.estimate(ds.images, ds.spec, ds.names)
    assert skipped == {} and not moved
    dist = [np.hypot(e["x"] - t["x"], e["y"] - t["y"])
            for n in ds.names for e, t in zip(est[n], truth[n])]
    assert [e["label"] for n in ds.names for e in est[n]] == [
        t["label"] for n in ds.names for t in truth[n]]
    assert len(dist) == sum(len(ds.spec[n]) for n in ds.names) and max(dist) <= 2.0


def test_train_py_trains_on_blender_renders_as_a_lab_user_runs_it(tmp_path):
    args = ["--preset", "tiny-ground", "--batch-size", "4", "--log-every", "1", "--warmup-steps",
            "1", "--device", "cpu", "--max-minutes", "0", "--max-steps", "2",
            "--data-root", str(FIXTURE), "--train-json", str(FIXTURE / "labels.json"),
            "--runs-dir", str(tmp_path), "--run-name", "b"]
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    layouts = json.loads((tmp_path / "b" / "labels_layouts.json").read_text())  # cached
    n = len(load_spec(FIXTURE / "labels.json"))
    assert layouts["estimated"] and layouts["skipped"] == {} and len(layouts["layouts"]) == n


def test_the_shipped_judge_reads_blender_renders():
    ds = fixture_set()
    judge = evaluation_model(device="cpu")
    assert judge.eval(ds.images, ds.labels) == 1.0


def test_evaluate_measures_fd_against_the_training_images_it_is_given(tmp_path):
    """A model trained on the lab's images is compared with them (--fd-reference), not with our
    renders: images from that set score a lower FD than the same with red and blue swapped."""
    spec = load_spec(FIXTURE / "labels.json")
    names = [n for n in spec if n.endswith("_2.png")][:4]  # 3-object images
    (tmp_path / "conds.json").write_text(json.dumps([spec[n] for n in names]))
    for flip, out in ((False, "same"), (True, "swapped")):
        for i, n in enumerate(names):
            im = Image.open(FIXTURE / n).convert("RGB").resize((64, 64), Image.BILINEAR)
            if flip:
                im = Image.fromarray(np.asarray(im)[..., ::-1].copy())
            (tmp_path / out / "conds").mkdir(parents=True, exist_ok=True)
            im.save(tmp_path / out / "conds" / f"{i}.png")
    fds = []
    for out in ("same", "swapped"):
        p = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--images",
                            str(tmp_path / out), "--conditions", str(tmp_path / "conds.json"),
                            "--fd-reference", str(FIXTURE), "--json", str(tmp_path / "e.json"),
                            "--device", "cpu"], cwd=tmp_path, env=ENV, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        res = json.loads((tmp_path / "e.json").read_text())["files"]["conds.json"]
        assert res["fd_reference"].endswith("tests/fixtures/blender")
        assert "(training images: " in p.stdout
        fds.append(res["fd"])
    # 4 images against 14: far from 0 either way, but deterministic and clearly apart
    assert fds[1] > 1.4 * fds[0], fds
