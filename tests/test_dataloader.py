"""dataloader.py: labels, condition and spec files, the Dataset, and every bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dataloader as dl


def test_label_order_matches_the_lab():
    assert dl.NUM_CLASSES == 24
    assert dl.LABELS[0] == "gray cube" and dl.LABELS[1] == "red cube"
    assert dl.LABELS[8] == "gray sphere" and dl.LABELS[23] == "yellow cylinder"
    assert dl.COLORS == ["gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"]
    assert dl.SHAPES == ["cube", "sphere", "cylinder"]
    for i, name in enumerate(dl.LABELS):
        color, shape = name.split()
        assert i == 8 * dl.SHAPES.index(shape) + dl.COLORS.index(color)


def test_encode_decode_round_trip():
    labels = ["red sphere", "cyan cylinder", "cyan cube"]
    vec = dl.encode(labels)
    assert vec.shape == (24,) and vec.sum() == 3
    assert vec[dl.OBJECTS["cyan cube"]] == 1
    assert sorted(dl.decode(vec)) == sorted(labels)
    assert dl.decode([9, 22, 6]) == ["cyan cube", "red sphere", "cyan cylinder"]
    assert dl.parse_labels(" red sphere, cyan cube ") == ["red sphere", "cyan cube"]


def test_benchmark_condition_files():
    test, new = (dl.load_conditions(p) for p in dl.TEST_JSONS)
    assert len(test) == len(new) == 32
    assert sum(map(len, test)) == 72 and sum(map(len, new)) == 84
    assert test[25] == ["red sphere", "cyan cylinder", "cyan cube"]
    assert torch.equal(dl.encode_batch(new), torch.stack([dl.encode(c) for c in new]))


def test_validation_conditions_avoid_the_benchmark():
    val = dl.validation_conditions(300)
    bench = {frozenset(c) for p in dl.TEST_JSONS for c in dl.load_conditions(p)}
    assert not bench & {frozenset(c) for c in val}
    assert {len(c) for c in val} == {1, 2, 3} and all(len(set(c)) == len(c) for c in val)
    # every label valid, and each condition is what its multi-hot row says
    assert [sorted(dl.decode(v)) for v in dl.encode_batch(val)] == [sorted(c) for c in val]
    assert dl.validation_conditions(128) == val[:128]  # the eval's set is the sweep's prefix


@pytest.mark.parametrize("content, message", [
    ('[["red sphere"], ["pink sphere"]]', "[1]: unknown label 'pink sphere'"),
    ('[["red sphere"], []]', "[1]: expected a non-empty list"),
    ('[["red sphere"], "red cube"]', "[1]: expected a non-empty list"),
    ('[["red cube", "red cube"]]', "[0]: duplicate label 'red cube'"),
    ('[["red sphere"], ', "malformed JSON"),
    ('{}', "expected a non-empty JSON list"),
])
def test_bad_condition_files(tmp_path, content, message):
    path = tmp_path / "cond.json"
    path.write_text(content)
    with pytest.raises(dl.DataError) as e:
        dl.load_conditions(path)
    assert message in str(e.value) and "cond.json" in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_label_names_closest():
    with pytest.raises(dl.DataError, match="closest: red sphere"):
        dl.encode(["red spere"])


def test_missing_file():
    with pytest.raises(dl.DataError, match="nope.json: file not found"):
        dl.load_conditions("nope.json")


def _lab_folder(tmp_path, n_scenes=3, size=(320, 240)):
    """A tiny folder in the lab's format: 320x240 PNGs named CLEVR_train_<scene>_<k>.png."""
    root = tmp_path / "iclevr"
    root.mkdir()
    spec, rng = {}, np.random.default_rng(0)
    for s in range(n_scenes):
        classes = rng.choice(24, 3, replace=False)
        for k in range(3):
            name = f"CLEVR_train_{s:06d}_{k}.png"
            spec[name] = [dl.LABELS[c] for c in classes[:k + 1]]
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / name)
    spec_path = tmp_path / "train.json"
    spec_path.write_text(json.dumps(spec))
    return root, spec_path, spec


@pytest.mark.parametrize("in_memory", [False, True])
def test_dataset_on_lab_format(tmp_path, in_memory):
    root, spec_path, spec = _lab_folder(tmp_path)
    ds = dl.ICLEVRDataset(root, spec_path, in_memory=in_memory)
    assert len(ds) == 9
    img, lab = ds[4]
    assert img.dtype == torch.float32
    assert lab.shape == (24,) and lab.sum() == 2
    assert dl.decode(lab) == sorted(spec[ds.names[4]], key=dl.OBJECTS.get)
    # Squash-resize exactly as the lab's Resize((64, 64)) on the PIL image, then the lab's
    # ToTensor + Normalize((0.5,) * 3, (0.5,) * 3).
    with Image.open(root / ds.names[4]) as im:
        ref = torch.from_numpy(np.array(im.convert("RGB").resize((64, 64), Image.BILINEAR)))
    ref = ref.permute(2, 0, 1)
    torch.testing.assert_close(img, (ref.float() / 255 - 0.5) / 0.5, atol=1e-6, rtol=0)
    assert torch.equal(dl.to_uint8(img), ref)
    # the loader's batches are dataset items with their own labels: 2 full batches of 4
    # (the last, short one dropped), 8 different images
    items = [ds[i] for i in range(len(ds))]
    seen = []
    for images, labels in dl.get_dataloader(root, spec_path, batch_size=4, in_memory=in_memory):
        assert len(images) == 4
        for x, y in zip(images, labels):
            i = next(i for i, (xi, _) in enumerate(items) if torch.equal(x, xi))
            assert torch.equal(y, items[i][1])
            seen.append(i)
    assert len(seen) == len(set(seen)) == 8


def test_missing_real_images_are_reported_not_rendered(tmp_path):
    root, spec_path, spec = _lab_folder(tmp_path)
    for name in list(spec)[:4]:
        (root / name).unlink()
    with pytest.raises(dl.DataError) as e:
        dl.ICLEVRDataset(root, spec_path)
    msg = str(e.value)
    assert "4 of 9 images are missing" in msg and "CLEVR_train_000000_0.png" in msg


def test_unreadable_image_is_named(tmp_path):
    root, spec_path, spec = _lab_folder(tmp_path)
    bad = list(spec)[2]
    (root / bad).write_bytes(b"not a png")
    with pytest.raises(dl.DataError, match=f"{bad}: unreadable image"):
        dl.ICLEVRDataset(root, spec_path, in_memory=True)


@pytest.mark.parametrize("content, message", [
    ('{"a.png": ["red cube"], "b.png": ["blue blob"]}', "['b.png']: unknown label 'blue blob'"),
    ('{"a.jpg": ["red cube"]}', "expected a .png file name"),
    ('{"a.png": []}', "expected a non-empty list"),
    ('["red cube"]', "expected a non-empty JSON object"),
])
def test_bad_spec_files(tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(dl.DataError) as e:
        dl.load_spec(path)
    assert message in str(e.value) and "train.json" in str(e.value)


def test_synthetic_names():
    assert dl.is_synthetic_name("SYN_train_000012_2.png")
    assert not dl.is_synthetic_name("CLEVR_train_000012_2.png")


def test_foreground_masks_find_small_objects_on_a_smooth_floor():
    # a lit floor: brightness ramps by 60 levels top to bottom, plus a bright band at x = 20
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    floor = 90 + 60 * yy / 63 + 25 * torch.exp(-((xx - 20) / 12) ** 2)
    img = floor.expand(3, 3, 64, 64).clone()
    img[0, :, 20:26, 30:36] = torch.tensor([173.0, 35, 35])[:, None, None]  # 6x6 red object
    img[1, :, 40:50, 10:20] = torch.tensor([42.0, 75, 215])[:, None, None]  # 10x10 blue one
    masks = dl.foreground_masks(img.round().to(torch.uint8), chunk=2)
    assert masks.shape == (3, 1, 64, 64) and masks.dtype == torch.bool
    assert not masks[2].any()  # the bare floor: no object
    for m, (y0, y1, x0, x1) in zip(masks, [(20, 26, 30, 36), (40, 50, 10, 20)]):
        grown = torch.zeros(64, 64, dtype=torch.bool)
        grown[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = True  # the object grown by 1 px
        near = torch.zeros(64, 64, dtype=torch.bool)
        near[y0 - 6:y1 + 6, x0 - 6:x1 + 6] = True
        assert m[0][grown].all() and not m[0][~near].any()
        assert m.sum() <= 2 * grown.sum()  # at most a thin margin of floor
    assert dl.foreground_masks(torch.zeros(0, 3, 64, 64, dtype=torch.uint8)).shape == (0, 1, 64, 64)
