"""Grounded generation: recorded layouts, label maps, the layout prior, user-placed objects, and
the grounded model through train.py and sample.py (tiny preset, a dozen real renders)."""
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

import render  # noqa: E402
import sample  # noqa: E402
from conftest import read_png  # noqa: E402
from dataloader import (OBJECTS, DataError, ICLEVRDataset, encode, encode_batch,  # noqa: E402
                        layout_path, layout_tensor, listed_order, load_conditions, load_image,
                        load_json, parse_labels, parse_placed_labels, repo_path, to_uint8)
from evaluate import color_palette, layout_fidelity  # noqa: E402
import model as model_lib  # noqa: E402
from model import (WEIGHTS_DIR, build_model, is_weights_dir, load_weights,  # noqa: E402
                   placed_layout)
from sample import generate, load_model  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--preset", "tiny-ground", "--batch-size", "4", "--log-every", "1", "--warmup-steps",
        "1", "--device", "cpu", "--max-minutes", "0"]


def run(script, *args, cwd, expect=0):
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == expect, f"{script} exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    """8 scenes x 3 steps rendered by `render.py --spec`, which also writes their layouts."""
    root = tmp_path_factory.mktemp("syn")
    spec = render.make_spec(8, 3, seed=3)
    (root / "spec.json").write_text(json.dumps(spec))
    run("render.py", "--spec", root / "spec.json", "--out", root / "img", "--device", "cpu",
        cwd=root)
    return root, spec


def test_render_records_where_each_object_is(renders):
    root, spec = renders
    path = layout_path(root / "img", root / "spec.json")
    data = json.loads(path.read_text())
    assert data["format"] == "iclevr-layout/1" and data["image_size"] == 64
    ds = ICLEVRDataset(root / "img", root / "spec.json", in_memory=True, layouts=True)
    image, labels, layout = ds[4]
    names = list(spec)
    assert [int(c) for c in layout[:, 0] if c >= 0] == [OBJECTS[n] for n in spec[names[4]]]
    # one scene's steps share the positions of the objects they have in common
    assert torch.equal(ds.layouts[3, :1], ds.layouts[5, :1])
    assert torch.equal(ds.layouts[4, :2], ds.layouts[5, :2])
    # the recorded positions are where the objects' colors are: every object is found at its
    # own position, and far fewer at another scene's positions
    palette = color_palette(ds.images, ds.layouts)
    assert layout_fidelity(ds.images, ds.layouts, palette) == 1.0
    assert layout_fidelity(ds.images, ds.layouts.roll(3, 0), palette) < 0.6
    # the first object stands at the world origin, which the jittered camera sees near the centre
    assert (ds.layouts[::3, 0, 1:3] - 32).abs().max() < 8
    # nearer objects (larger depth rank) look larger
    objs = [o for v in data["layouts"].values() for o in v]
    near, far = min(objs, key=lambda o: o["depth"]), max(objs, key=lambda o: o["depth"])
    assert near["rx"] > far["rx"] and near["y"] > far["y"]


def test_layout_file_errors_name_the_file_and_entry(renders, tmp_path):
    root, spec = renders
    data = json.loads(layout_path(root / "img", root / "spec.json").read_text())
    name = next(iter(spec))
    bad = {**data["layouts"], name: [{**data["layouts"][name][0], "x": "left"}]}
    with pytest.raises(DataError, match=rf"\[{name!r}\]\[0\]: expected numbers x, y, rx, ry"):
        layout_tensor(bad, spec, "f.json")
    with pytest.raises(DataError, match=r"no layout for this image"):
        layout_tensor({}, spec, "f.json")
    swapped = {**data["layouts"], name: [{**data["layouts"][name][0], "label": "red cube"}]}
    if spec[name] != ["red cube"]:
        with pytest.raises(DataError, match=r"one object per label, in the spec's order"):
            layout_tensor(swapped, spec, "f.json")


def test_label_maps_draw_each_object_where_and_as_large_as_told():
    m = build_model("tiny-ground")
    red_cube, cyan_cylinder = OBJECTS["red cube"], OBJECTS["cyan cylinder"]
    layout = torch.tensor([[[red_cube, 20.5, 30.5, 2.0, 2.0], [cyan_cylinder, 45.5, 10.5, 6.0, 8.0],
                            [-1, 5.0, 5.0, 1.0, 1.0]]])
    maps = m.label_maps(layout, 1, "cpu")[0]  # 8 colors, then cube, sphere, cylinder
    assert maps.shape == (11, 64, 64)
    red, cyan, cube, cyl = maps[1], maps[6], maps[8], maps[10]
    assert divmod(int(red.argmax()), 64) == (30, 20) and divmod(int(cyan.argmax()), 64) == (10, 45)
    torch.testing.assert_close(red, cube)  # one object each: color and shape maps agree
    torch.testing.assert_close(cyan, cyl)
    assert maps[[0, 2, 3, 4, 5, 7, 9]].abs().max() == 0  # absent colors, spheres, the -1 slot
    # the larger object's blob reaches further (std blob_scale * r)
    assert cyan[10, 45 + 3] > 0.5 > 0.05 > red[30, 20 + 3]
    assert m.label_maps(torch.full((2, 3, 5), -1.0), 2, "cpu").abs().max() == 0  # "no objects"
    x, t, y = torch.randn(1, 3, 64, 64), torch.tensor([500]), torch.zeros(1, 24)
    moved = layout.clone()
    moved[0, 0, 1] = 40.5
    with torch.no_grad():
        assert (m(x, t, y, layout) - m(x, t, y, moved)).abs().max() > 1e-4


def test_placed_labels_parse_and_fail_in_one_line():
    labels, pos = parse_placed_labels("red sphere@20,30, cyan cube@40,36")
    assert labels == ["red sphere", "cyan cube"] and pos == [(20.0, 30.0), (40.0, 36.0)]
    assert parse_placed_labels("red sphere@ 20.5, 3,gray cube@1,2")[1] == [(20.5, 3.0), (1.0, 2.0)]
    assert parse_placed_labels("red sphere, cyan cube") == (["red sphere", "cyan cube"], None)
    with pytest.raises(DataError, match=r"position 70,30 of 'red sphere' is off the 64x64 image"):
        parse_placed_labels("red sphere@70,30")
    with pytest.raises(DataError, match=r"'cyan cube' has no position"):
        parse_placed_labels("red sphere@20,30, cyan cube")
    with pytest.raises(DataError, match=r"position 'x' of 'red sphere': expected x,y"):
        parse_placed_labels("red sphere@x")
    with pytest.raises(DataError, match=r"unknown label 'red sphre'"):
        parse_placed_labels("red sphre@1,2")
    with pytest.raises(DataError, match=r"positions \(label@x,y\) are not taken here"):
        parse_labels("red sphere@1,2")


def test_layout_prior_draws_a_training_layout_with_as_many_objects():
    m = build_model("tiny-ground")
    nan = float("nan")
    bank = torch.tensor([[[0, 10, 12, 2, 3], [-1, nan, nan, nan, nan]],
                         [[0, 20, 22, 3, 4], [0, 40, 42, 5, 6]]])
    m.set_layout_prior(bank)
    assert m.config.prior_shape == (2, 2)
    two = torch.zeros(1, 24)
    two[0, [OBJECTS["red cube"], OBJECTS["blue sphere"]]] = 1
    orders = set()
    for s in range(12):
        lay = m.draw_layouts(two, [torch.Generator().manual_seed(s)])[0]
        assert sorted(lay[:, 1].tolist()) == [20.0, 40.0]  # the 2-object training layout
        assert sorted(lay[:, 0].long().tolist()) == sorted([OBJECTS["red cube"],
                                                            OBJECTS["blue sphere"]])
        orders.add(int(lay[0, 0]))
        again = m.draw_layouts(two, [torch.Generator().manual_seed(s)])[0]
        assert torch.equal(lay, again)  # depends on the generator alone
    assert len(orders) == 2  # labels go to the positions in random order
    one = torch.zeros(1, 24)
    one[0, 5] = 1
    assert m.draw_layouts(one, [torch.Generator()])[0, 0, 1:].tolist() == [10, 12, 2, 3]
    four = torch.zeros(1, 24)
    four[0, [1, 9, 17, 3]] = 1  # more objects than any training image: the renderer places them
    lay = m.draw_layouts(four, [torch.Generator().manual_seed(0)])[0]
    gen = torch.Generator().manual_seed(0)  # the same draws: label order, then a scene seed
    order = torch.tensor([1, 3, 9, 17])[torch.randperm(4, generator=gen)]
    scene = placed_layout(4, int(torch.randint(2**31, (1,), generator=gen)), 64)
    assert lay[:, 0].tolist() == order.tolist() and torch.equal(lay[:, 1:], scene)
    assert len(set(lay[:, 1].tolist())) == 4  # four places, not one object drawn four times
    # user-placed objects get the size of a training object at that row
    placed = m.place([1, 9], [(30.0, 22.0), (30.0, 42.0)])
    assert placed[0, :, 1:3].tolist() == [[30, 22], [30, 42]]
    torch.testing.assert_close(placed[0, :, 3], torch.tensor([3.0, 5.0]))


def test_layout_prior_keeps_the_listed_order():
    """With the conditions' listed order (i-CLEVR's order of addition: the first object at the
    centre), object j of a condition takes object j's place of the training layout drawn, the
    same draw as without it; an order that lists other classes than the labels is refused."""
    m = build_model("tiny-ground")
    nan = float("nan")
    m.set_layout_prior(torch.tensor([[[0, 32, 29, 3, 4], [-1, nan, nan, nan, nan]],
                                     [[0, 32, 29, 3, 4], [0, 50, 40, 4, 5]]]))
    conds = [["red cube", "blue sphere"], ["blue sphere", "red cube"]] * 6
    labels, order = encode_batch(conds), listed_order(conds)
    gens = [torch.Generator().manual_seed(s) for s in range(len(conds))]
    lay = m.draw_layouts(labels, gens, order=order)
    assert lay[:, :, 0].long().tolist() == order  # the listed order, every time
    assert lay[:, 0, 1:3].tolist() == [[32, 29]] * len(conds)  # first listed at the centre
    unordered = m.draw_layouts(labels, [torch.Generator().manual_seed(s)
                                        for s in range(len(conds))])
    assert torch.equal(lay[..., 1:], unordered[..., 1:])  # the same positions were drawn
    assert unordered[:, 0, 0].long().tolist() != [c[0] for c in order]  # random order
    with pytest.raises(ValueError, match=r"order\[0\] lists classes \[1\]"):
        m.draw_layouts(labels[:1], gens[:1], order=[[1]])


def test_grounded_model_trains_resumes_and_samples(renders, tmp_path):
    root, _ = renders
    data = ["--data-root", root / "img", "--train-json", root / "spec.json", "--runs-dir",
            tmp_path]
    run("train.py", *TINY, *data, "--max-steps", 2, "--run-name", "g", cwd=tmp_path)
    p = run("train.py", "--run-name", "g", "--resume", "latest", "--max-steps", 3,
            "--runs-dir", tmp_path, cwd=tmp_path)
    assert "resumed from" in p.stdout
    ckpt = tmp_path / "g" / "checkpoint-3"
    net = load_weights(ckpt / "ema")
    ds = ICLEVRDataset(root / "img", root / "spec.json", layouts=True)
    # the prior is the training set's layouts, kept through the resume
    want = ds.layouts[..., 1:].clone()
    want[ds.layouts[..., 0] < 0] = float("nan")
    torch.testing.assert_close(net.layout_prior, want, equal_nan=True)

    out = tmp_path / "placed"
    run("sample.py", "--checkpoint", ckpt, "--steps", 2, "--num-images", 2, "--out", out,
        "--labels", "red sphere@20,30, cyan cube@40,36", cwd=tmp_path)
    a = load_image(out / "custom_0.png")
    # the images are generate()'s with the objects where the user put them
    model, sched = load_model(ckpt, "cpu")
    placed = model.place([OBJECTS["red sphere"], OBJECTS["cyan cube"]], [(20, 30), (40, 36)])
    want = to_uint8(generate(model, encode(["red sphere", "cyan cube"])[None].repeat(2, 1),
                             layouts=placed.repeat(2, 1, 1), steps=2, scheduler_config=sched,
                             progress=False))
    for i in range(2):
        assert (read_png(out / f"custom_{i}.png").int() - want[i].int()).abs().max() <= 1
    run("sample.py", "--checkpoint", ckpt, "--steps", 2, "--num-images", 2, "--out", out,
        "--labels", "red sphere@50,10, cyan cube@10,50", cwd=tmp_path)
    assert (a.float() - load_image(out / "custom_0.png").float()).abs().max() > 0
    p = run("sample.py", "--checkpoint", ckpt, "--labels", "red sphere@64,3", cwd=tmp_path,
            expect=2)
    assert p.stderr.strip().splitlines() == [
        "error: --labels: position 64,3 of 'red sphere' is off the 64x64 image (x and y in "
        "[0, 64))"]

    # benchmark files from the prior: the PNGs are what generate() makes from the same seed
    out = tmp_path / "images"
    run("sample.py", "--checkpoint", ckpt, "--steps", 2, "--out", out, "--conditions",
        ROOT / "test.json", cwd=tmp_path)
    labels = encode_batch(load_conditions(ROOT / "test.json"))[:3]
    want = to_uint8(generate(model, labels, steps=2, scheduler_config=sched, progress=False))
    for i in range(3):
        got = np.asarray(Image.open(out / "test" / f"{i}.png")).transpose(2, 0, 1)
        assert np.abs(got.astype(int) - want[i].numpy().astype(int)).max() <= 1


def test_positions_need_a_grounded_model_and_images_nothing_can_be_placed_on_stop(tmp_path):
    torch.manual_seed(0)
    m = build_model("tiny")
    with pytest.raises(DataError, match=r"object positions need a grounded model"):
        generate(m, torch.zeros(1, 24), layouts=torch.zeros(1, 1, 5), steps=1,
                 scheduler_config=__import__("model").make_noise_scheduler().config)
    # the lab's images come without positions; where none shows its object, one line says so
    Image.new("RGB", (64, 64)).save(tmp_path / "CLEVR_train_000001_0.png")
    (tmp_path / "train.json").write_text(json.dumps({"CLEVR_train_000001_0.png": ["red cube"]}))
    p = run("train.py", *TINY, "--data-root", tmp_path, "--train-json", tmp_path / "train.json",
            "--runs-dir", tmp_path / "runs", "--max-steps", 1, cwd=tmp_path, expect=2)
    assert p.stderr.strip().splitlines()[-1].startswith("error: ")
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'train.json'}: no image could be placed by estimate_layouts.py "
        "(first: CLEVR_train_000001_0.png: no one-object image shows one of its colors)")


def test_shipped_weights_make_the_images_their_results_file_scored():
    """weights/ddpm, sampled as its sample_config.json says, gives the seed-0 images that
    speedrun.py wrote beside the results file that scored it (results/<run>/test/{i}.png,
    made by sample.py on the run's final checkpoint). Two of the 32: image i depends only on
    (seed, i), its layout draw included, not on the batch (sample.py), so the first two in a
    batch of their own are those of the whole file."""
    cfg_path = WEIGHTS_DIR / sample.SAMPLE_CONFIG
    if not (is_weights_dir(WEIGHTS_DIR) and cfg_path.is_file()):
        pytest.skip(f"no shipped weights with their {sample.SAMPLE_CONFIG} in "
                    f"{WEIGHTS_DIR.relative_to(ROOT)}")
    cfg = load_json(cfg_path)
    scored = repo_path(cfg["speedrun"]).with_suffix("") / "test"  # results/<run>/test/
    pngs = [scored / f"{i}.png" for i in range(2)]
    if not all(p.is_file() for p in pngs):
        pytest.skip(f"no seed-0 PNGs under {scored.relative_to(ROOT)} to compare with")
    model, sched = load_model(WEIGHTS_DIR, "cpu")
    assert sample.is_grounded(model)  # layouts come from the prior, per image
    conds = load_conditions(ROOT / "test.json")[:2]
    images = to_uint8(generate(model, encode_batch(conds), sampler=cfg["sampler"],
                               steps=cfg["steps"], guidance=cfg["guidance"], seed=0,
                               order=listed_order(conds), device="cpu",
                               scheduler_config=sched, batch_size=2, progress=False))
    for i, path in enumerate(pngs):
        diff = (read_png(path).int() - images[i].int()).abs()
        # measured: at most 1 level apart, 0.10-0.15 on average, alike with bf16 autocast in
        # batches of 2 and 32 and fp32 in batches of 1 and 2 (not 0: the PNGs came from the
        # run's fp32 checkpoint, these weights are its fp16 export); guidance 2 instead of
        # 1.5 is 6-14 levels off, seed 1 instead of 0 over 30
        assert diff.max() <= 2 and diff.float().mean() < 0.3, (
            f"{path.relative_to(ROOT)}: {diff.max()} levels apart at most, "
            f"{diff.float().mean():.3f} on average")


def test_shape_maps_draw_each_shape_as_its_silhouette():
    """map_style "shape" (the recipe's preset): a sphere's map is a disc, a cube's a box that
    fills the corners a disc leaves out, a cylinder's taller than a sphere of the same radius;
    0.5 on the outline, an edge about one pixel wide, and the color channel holds the same."""
    m = build_model("tiny-ground", map_style="shape")
    r = 8.0  # centres on pixel centres (x.5), so pixel i + 0.5 lies (i + 0.5 - c) / r radii off
    objs = [("red cube", 16.5), ("red sphere", 32.5), ("red cylinder", 48.5)]
    layout = torch.tensor([[[OBJECTS[n], x, 32.5, r, r] for n, x in objs]])
    maps = m.label_maps(layout, 1, "cpu")[0]
    cube, sphere, cyl = maps[8], maps[9], maps[10]
    # pixels (0.75 r, 0.75 r) from the centre: inside the box (0.85 x 1.0), outside the disc
    assert cube[32 - 6, 16 - 6] == 1 and sphere[32 - 6, 32 - 6] < 0.05
    # 1.125 r above the centre: only the cylinder (side 0.88 r + cap 0.47 r) reaches there
    assert cyl[32 - 9, 48] == 1 and sphere[32 - 9, 32] == 0 and cube[32 - 9, 16] == 0
    assert sphere[32, 32 + 8] == pytest.approx(0.5, abs=1e-5)  # the outline
    ramp = sphere[32, 32:44]
    assert ((ramp > 0.05) & (ramp < 0.95)).sum() == 1  # a one-pixel edge, not a blur
    torch.testing.assert_close(maps[1], maps[8:].amax(0))  # the red channel: all three
    assert maps[[0, 2, 3, 4, 5, 6, 7]].abs().max() == 0
    gauss = build_model("tiny-ground").label_maps(layout, 1, "cpu")[0]  # the same blob for all
    torch.testing.assert_close(gauss[8][:, 4:29], gauss[9][:, 20:45])  # around each centre


def test_layouts_drawn_apart():
    """model.apart: outline boxes (half-width rx, half-height 1.35 ry) must not overlap;
    draw_layouts(apart_only=True) takes only such training layouts, by default any."""
    nan = float("nan")
    lay = torch.tensor([[[10.0, 30.0, 3.0, 4.0], [15.0, 30.0, 3.0, 4.0], [nan] * 4],   # 5 < 6 px
                        [[10.0, 30.0, 3.0, 4.0], [17.0, 30.0, 3.0, 4.0], [nan] * 4],   # 7 > 6 px
                        [[10.0, 20.0, 3.0, 4.0], [12.0, 31.0, 3.0, 4.0], [nan] * 4],   # 11 > 10.8
                        [[10.0, 20.0, 3.0, 4.0], [12.0, 30.0, 3.0, 4.0], [nan] * 4]])  # 10 < 10.8
    assert model_lib.apart(lay).tolist() == [False, True, True, False]
    m = build_model("tiny-ground")
    cls = torch.where(lay[..., :1].isnan(), -1.0, 0.0)
    m.set_layout_prior(torch.cat([cls, lay], -1))
    labels = encode_batch([["red cube", "blue sphere"]] * 40)
    gens = [torch.Generator().manual_seed(i) for i in range(40)]
    drawn = m.draw_layouts(labels, gens, apart_only=True)
    assert model_lib.apart(drawn[..., 1:]).all()  # only rows 1 and 2 of the prior
    assert {round(float(d[:, 1].max() - d[:, 1].min())) for d in drawn} == {7, 2}
    gens = [torch.Generator().manual_seed(i) for i in range(40)]
    drawn = m.draw_layouts(labels, gens)  # all four rows
    assert {round(float(d[:, 1].max() - d[:, 1].min())) for d in drawn} == {5, 7, 2}
