"""demo.py end to end: the page started as a user starts it, driven through its HTTP API by
gradio's own client (what the browser's Generate button calls)."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import render  # noqa: E402
import sample  # noqa: E402
from conftest import read_png  # noqa: E402
from dataloader import (OBJECTS, encode, layout_tensor, to_uint8,  # noqa: E402
                        validation_conditions)
from demo import SCALE  # noqa: E402
from evaluate import color_palette, layout_fidelity  # noqa: E402
from model import WEIGHTS_DIR, is_weights_dir  # noqa: E402

PLACED = "red sphere@16,40, cyan cube@46,40"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page():
    """demo.py on a free port with the shipped weights -> (gradio client, process)."""
    if not is_weights_dir(WEIGHTS_DIR):
        pytest.skip("no shipped weights in weights/ddpm")
    from gradio_client import Client

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "2", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--port", str(port),
                             "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        for line in proc.stdout:  # the page is up once gradio prints its URL
            if f"127.0.0.1:{port}" in line or time.time() > deadline:
                break
        assert proc.poll() is None, "demo.py exited before serving the page"
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ask(client, text, n=2, checkpoint="weights/ddpm"):
    settings = sample.scored_settings(WEIGHTS_DIR)
    return client.predict(text, n, 0, settings["guidance"], settings["steps"], False, checkpoint,
                          api_name="/generate")


def test_placed_objects_come_back_where_placed_and_judged(page):
    client, _ = page
    gallery, verdict, strip, message, details = ask(client, PLACED)
    assert message == ""
    images = torch.stack([read_png(g["image"])[:, ::SCALE, ::SCALE] for g in gallery])
    assert images.shape == (2, 3, 64, 64)
    # the page's images are sample.py's: generate() with the objects where they were placed
    model, sched = sample.load_model(WEIGHTS_DIR, "cpu")
    settings = sample.scored_settings(WEIGHTS_DIR)
    placed = model.place([OBJECTS["red sphere"], OBJECTS["cyan cube"]], [(16, 40), (46, 40)])
    want = to_uint8(sample.generate(model, encode(["red sphere", "cyan cube"])[None].repeat(2, 1),
                                    layouts=placed.repeat(2, 1, 1), seed=0, progress=False,
                                    scheduler_config=sched, **settings))
    assert (images.int() - want.int()).abs().max() <= 1
    torch.testing.assert_close(torch.tensor(details["layouts"]), placed.repeat(2, 1, 1))
    # and the objects are where they were placed (the layout-fidelity check, palette from renders)
    spec = {f"fid-{i}": c for i, c in enumerate(validation_conditions(16))}
    palette = color_palette(render.render_tensor(spec, device="cpu").cpu(),
                            layout_tensor(render.spec_layouts(spec, 0), spec))
    assert layout_fidelity(images, placed.repeat(2, 1, 1), palette) == 1.0
    moved = model.place([OBJECTS["red sphere"], OBJECTS["cyan cube"]], [(46, 40), (16, 40)])
    assert layout_fidelity(images, moved.repeat(2, 1, 1), palette) == 0.0
    # the verdict is the judge's, image by image, in evaluate.py's words
    lines = verdict.splitlines()
    found = sum(r["correct"] for r in details["verdicts"])
    assert lines[0] == f"judge: {found}/4 objects found" and len(lines) == 3
    assert read_png(strip["path"] if isinstance(strip, dict) else strip).shape[1] > 64


def test_prior_places_objects_when_none_are_placed(page):
    client, _ = page
    gallery, _, _, message, details = ask(client, "red sphere, cyan cube, gray cylinder", n=3)
    assert message == "" and len(gallery) == 3 and not details["placed"]
    layouts = torch.tensor(details["layouts"])
    # one layout per image, each from the prior (seed, i): not all the same
    assert layouts.shape == (3, 3, 5) and not torch.equal(layouts[0], layouts[1])


@pytest.mark.parametrize("text, checkpoint, want", [
    ("red sphere, cyan cube, gray cube, red cube, blue cube, green cube", "weights/ddpm",
     "**error:** 6 objects: the page draws 1 to 5"),
    ("red sphere@70,3", "weights/ddpm",
     "**error:** objects: position 70,3 of 'red sphere' is off the 64x64 image (x and y in "
     "[0, 64))"),
    ("red sphere@20,30, cyan cube", "weights/ddpm",
     "**error:** objects: 'cyan cube' has no position: place every object (label@x,y) or none"),
    ("red sphre", "weights/ddpm", "**error:** objects: unknown label 'red sphre'"),
    ("red sphere", "weights/nothere", "**error:** weights/nothere: checkpoint not found"),
    ("red sphere", "weights/judge", "**error:** weights/judge: the judge's weights (judge.json), "
     "not a diffusion model"),
])
def test_bad_input_gets_one_line_and_no_images(page, text, checkpoint, want):
    client, _ = page
    gallery, verdict, _, message, _ = ask(client, text, checkpoint=checkpoint)
    assert message.startswith(want) and "\n" not in message
    assert gallery == [] and verdict == ""


def test_unknown_checkpoint_stops_the_script_in_one_line():
    p = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--checkpoint", "weights/nothere",
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: weights/nothere: checkpoint not found"]
