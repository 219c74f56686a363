"""Tests of render.py: specs, determinism, resume, colors, geometry, CLI. CPU only, ~30 s."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import dataloader  # noqa: E402
from conftest import read_png  # noqa: E402
import render  # noqa: E402
from look_compare import hue  # noqa: E402


def run(*args, check=True):
    res = subprocess.run([sys.executable, str(ROOT / "render.py"), *map(str, args)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


@pytest.fixture(scope="module")
def small_spec():
    return render.make_spec(4, objects=3, seed=7, prefix="SYN_test_")


@pytest.fixture(scope="module")
def rendered(small_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert render.render_spec(small_spec, out, device="cpu", progress=False) == 12
    return files(out)


# ---------------------------------------------------------------- specs
def test_make_spec_default_train_set():
    spec = render.make_spec(6003)
    assert len(spec) == 18009
    names = list(spec)
    assert names[:3] == ["SYN_train_000000_0.png", "SYN_train_000000_1.png",
                         "SYN_train_000000_2.png"]
    for s in range(6003):
        steps = [spec[f"SYN_train_{s:06d}_{k}.png"] for k in range(3)]
        assert [len(x) for x in steps] == [1, 2, 3]
        assert steps[0] == steps[1][:1] and steps[1] == steps[2][:2]  # cumulative
        assert len(set(steps[2])) == 3  # distinct classes
    counts = Counter(label for labels in spec.values() for label in labels)
    assert set(counts) == set(dataloader.LABELS)
    # expected 18009 * 2 / 24 = 1500.75 per class, sd ~60 (the real set spans 1422-1577)
    assert 1320 <= min(counts.values()) and max(counts.values()) <= 1680
    firsts = Counter(spec[f"SYN_train_{s:06d}_0.png"][0] for s in range(6003))
    assert max(firsts.values()) < 1.25 * 6003 / 24  # first objects uniform too


def test_committed_train_json_is_the_default_spec():
    path = ROOT / "train.json"
    if not path.exists():
        pytest.skip("train.json not generated yet")
    assert json.loads(path.read_text()) == render.make_spec(6003, 3, 1, 0, "SYN_train_")


def test_make_spec_judge_set_and_bad_arguments():
    spec = render.make_spec(50, objects=5, min_objects=1, seed=3, prefix="SYN_judge_")
    assert len(spec) == 250 and all(dataloader.is_synthetic_name(n) for n in spec)
    assert Counter(len(v) for v in spec.values()) == {k: 50 for k in range(1, 6)}
    assert render.make_spec(5, objects=3, min_objects=3) == {
        n: v for n, v in render.make_spec(5).items() if n.endswith("_2.png")}
    for bad in ({"objects": 2, "min_objects": 3}, {"objects": render.MAX_OBJECTS + 1}):
        with pytest.raises(dataloader.DataError):
            render.make_spec(3, **bad)


def test_plan_images_checks_scene_consistency():
    keys, objects, images = render.plan_images({
        "a_1.png": ["red cube", "blue sphere"], "a_0.png": ["red cube"], "b.png": ["gray cube"]})
    assert keys == ["a", "b.png"] and objects[0] == ["red cube", "blue sphere"]
    assert images == [(0, 2), (0, 1), (1, 1)]
    with pytest.raises(dataloader.DataError, match=r"'a_0.png'.*'a_1.png'"):
        render.plan_images({"a_0.png": ["red cube"], "a_1.png": ["blue cube", "red cube"]})


# ---------------------------------------------------------------- determinism and resume
def test_pngs_are_deterministic(small_spec, rendered, tmp_path):
    assert sorted(rendered) == sorted(small_spec)
    render.render_spec(small_spec, tmp_path, device="cpu", batch_size=5, progress=False)
    assert files(tmp_path) == rendered  # byte-identical, other batch size
    # and each PNG holds exactly the image render_tensor makes of its entry (lossless)
    ref = render.render_tensor(small_spec, device="cpu")
    for i, name in enumerate(small_spec):
        assert torch.equal(read_png(tmp_path / name), ref[i]), name


def test_image_depends_only_on_its_entry(small_spec, rendered, tmp_path):
    # a few images alone, in another order, with another seed for comparison
    part = {n: small_spec[n] for n in ["SYN_test_000002_0.png", "SYN_test_000000_1.png"]}
    render.render_spec(part, tmp_path, device="cpu", batch_size=1, progress=False)
    assert files(tmp_path) == {n: rendered[n] for n in part}
    alone = render.render_tensor(part, device="cpu")
    assert torch.equal(alone, render.render_tensor(list(part.items())[::-1], device="cpu")[[1, 0]])
    assert not torch.equal(alone, render.render_tensor(part, seed=1, device="cpu"))
    assert render.render_tensor([], device="cpu").shape == (0, 3, 64, 64)
    # steps of one scene share placement: image 0 differs from image 1 only near object 2
    full = render.render_tensor(small_spec, device="cpu").int()
    diff = (full[0] - full[1]).abs().sum(0) > 6
    assert 0 < diff.sum() < 400


def test_resume_skips_existing_files(small_spec, rendered, tmp_path):
    render.render_spec(small_spec, tmp_path, device="cpu", progress=False)
    keep = tmp_path / "SYN_test_000000_0.png"
    keep.write_bytes(b"not touched")
    for name in ["SYN_test_000003_2.png", "SYN_test_000001_0.png"]:
        (tmp_path / name).unlink()
    assert render.render_spec(small_spec, tmp_path, device="cpu", progress=False) == 2
    assert keep.read_bytes() == b"not touched"
    got = files(tmp_path)
    assert got["SYN_test_000003_2.png"] == rendered["SYN_test_000003_2.png"]
    assert got["SYN_test_000001_0.png"] == rendered["SYN_test_000001_0.png"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
    assert render.render_spec(small_spec, tmp_path, device="cpu", progress=False) == 0


def test_missing_synthetic_images_are_rendered(tmp_path):
    spec = render.make_spec(2, objects=2, seed=5, prefix="SYN_dl_")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(dataloader.DataError, match="4 of 4 images are missing"):
        dataloader.ICLEVRDataset(tmp_path / "imgs", tmp_path / "spec.json")  # no renderer here
    render.ensure_images(tmp_path / "imgs", spec, tmp_path / "spec.json", device="cpu")
    ds = dataloader.ICLEVRDataset(tmp_path / "imgs", tmp_path / "spec.json", in_memory=True)
    assert torch.equal(ds.images, render.render_tensor(spec, device="cpu"))
    assert torch.equal(ds.labels, dataloader.encode_batch(list(spec.values())))


# ---------------------------------------------------------------- content
HUES = hue(render.ALBEDO)


def color_pixels(img):
    """Count pixels of each color name in a uint8 (3, 64, 64) image: saturated pixels by
    nearest hue; gray as the largest blob of dark unsaturated pixels below the wall (the dark
    bottoms of other objects make a few such pixels too)."""
    x = img.permute(1, 2, 0).numpy().astype(float)
    chroma = x.max(-1) - x.min(-1)
    out = Counter()
    h = hue(x[chroma > 30])
    dist = np.abs((HUES[None, 1:] - h[:, None] + 180) % 360 - 180)
    for i in dist.argmin(1):
        out[dataloader.COLORS[i + 1]] += 1
    blobs, n = ndimage.label(((chroma < 15) & (x.mean(-1) < 100))[18:])
    out["gray"] = int(np.bincount(blobs.ravel())[1:].max()) if n else 0
    return out


def test_requested_colors_present_and_others_absent():
    conds = dataloader.load_conditions(ROOT / "test.json") \
        + dataloader.load_conditions(ROOT / "new_test.json")
    imgs = render.render_tensor([(f"cond{i}.png", c) for i, c in enumerate(conds)], seed=3,
                                device="cpu")
    for c, img in zip(conds, imgs):
        counts = color_pixels(img)
        want = {label.split()[0] for label in c}
        for color in dataloader.COLORS:
            if color in want:  # the smallest object keeps ~11 px at 64x64
                assert counts[color] >= 10, (c, color, counts)
            else:
                assert counts[color] <= (7 if color == "gray" else 3), (c, color, counts)


def test_geometry_matches_the_facts():
    # an ID render of many scenes: every object visible, sphere sizes and centres as in i-CLEVR
    spec = render.make_spec(60, objects=5, min_objects=5, seed=11, prefix="SYN_geo_")
    keys, objects, _ = render.plan_images(spec)
    sc = render.sample_scenes(keys, objects, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as render.py does on the CPU (see render._workers)
    try:
        assert (render.visible_fraction(sc) >= render.MIN_VISIBLE).all()
    finally:
        torch.set_num_threads(threads)
    radius = render.SHAPE_TABLE[sc.shape, -1]
    for s in range(len(keys)):
        d = np.linalg.norm(sc.xy[s, :, None] - sc.xy[s, None], axis=-1)
        gap = d - radius[s, :, None] - radius[s, None]
        assert (gap[~np.eye(5, dtype=bool)] >= render.MIN_GAP).all()
    assert (sc.xy[:, 0] == 0).all() and (np.abs(sc.xy) <= 3).all()

    one = render.render_tensor([(f"s{i}.png", ["red sphere"]) for i in range(6)], device="cpu")
    for img in one:
        x = img.permute(1, 2, 0).numpy().astype(int)
        ys, xs = np.nonzero((x[..., 0] - x[..., 1] > 40))
        assert abs(xs.mean() - 32) < 2 and abs(ys.mean() - 29) < 2.5
        assert 4 <= np.ptp(xs) + 1 <= 9 and 5 <= np.ptp(ys) + 1 <= 12
    # backdrop tones (sRGB medians of the reference renders: wall ~105, bottom ~146)
    top, bottom = one[:, :, :20].float().median(), one[:, :, 52:].float().median()
    assert 95 <= top <= 115 and 135 <= bottom <= 160


# ---------------------------------------------------------------- command line
def test_cli_make_spec_then_render(tmp_path):
    spec_path = tmp_path / "spec.json"
    res = run("--make-spec", spec_path, "--scenes", 2, "--objects", 2, "--seed", 1,
              "--prefix", "SYN_cli_")
    assert "wrote 4 images of 2 scenes" in res.stdout
    spec = json.loads(spec_path.read_text())
    assert spec == render.make_spec(2, 2, seed=1, prefix="SYN_cli_")
    out = tmp_path / "out"
    res = run("--spec", spec_path, "--out", out, "--device", "cpu", "--batch-size", 3)
    assert "rendered 4 of 4 images" in res.stdout
    assert sorted(files(out)) == sorted(spec)
    ref = render.render_tensor(spec, device="cpu")  # the CLI's images are the library's
    for i, name in enumerate(spec):
        assert torch.equal(read_png(out / name), ref[i]), name
    assert "rendered 0 of 4" in run("--spec", spec_path, "--out", out, "--device", "cpu").stdout
    png = tmp_path / "one.png"
    run("--labels", "red sphere, cyan cube", "--out", png, "--device", "cpu")
    counts = color_pixels(read_png(png))
    assert counts["red"] >= 6 and counts["cyan"] >= 6 and counts["blue"] <= 3


@pytest.mark.parametrize("spec, needle", [
    ({"SYN_x_000000_0.png": ["red sphere"], "SYN_x_000000_1.png": ["blue cube", "red cube"]},
     "SYN_x_000000_1.png"),
    ({"SYN_x_000000_0.png": ["red spere"]}, "unknown label 'red spere'"),
    ([["red sphere"]], "expected a non-empty JSON object"),
])
def test_cli_bad_spec_is_one_line(tmp_path, spec, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    res = run("--spec", path, "--out", tmp_path / "out", "--device", "cpu", check=False)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
    assert needle in res.stderr
    assert not (tmp_path / "out").exists()
