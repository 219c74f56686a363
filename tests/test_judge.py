"""Tests of the judge: evaluator.py, evaluate.py and train_judge.py (CPU, real code paths)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataloader  # noqa: E402
import evaluate  # noqa: E402
import evaluator  # noqa: E402
import train_judge  # noqa: E402
from dataloader import DataError  # noqa: E402

SHIPPED = ROOT / "weights" / "judge"
needs_shipped = pytest.mark.skipif(
    not (SHIPPED / evaluator.META_FILE).is_file(),
    reason="weights/judge/ not trained yet (the lead adds it from the GPU run of train_judge.py)")
LINE = re.compile(r"^(\S+): accuracy (\d\.\d{4}) \((\d+)/(\d+)\)"
                  r"(?:  fd (\d+\.\d\d) \(renders: (\d+\.\d\d)\))?"
                  r"(?: \| missed (\d+): (\d+) wrong shape, (\d+) wrong color, (\d+) neither)?"
                  r"(?: \| objects found: (\d+) images too many, (\d+) too few)?$")


def lab_compute_acc(out, onehot_labels):
    """The lab's original loop, verbatim in substance: the reference for compute_acc."""
    batch_size = out.size(0)
    acc = 0
    total = 0
    for i in range(batch_size):
        k = int(onehot_labels[i].sum().item())
        total += k
        outv, outi = out[i].topk(k)
        lv, li = onehot_labels[i].topk(k)
        for j in outi:
            if j in li:
                acc += 1
    return acc / total


def run(script, *args, cwd):
    """Run a repository script the way users do; cwd elsewhere proves no cwd assumptions."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def multi_hot(*index_lists):
    y = torch.zeros(len(index_lists), 24)
    for i, idx in enumerate(index_lists):
        y[i, idx] = 1
    return y


@pytest.fixture(scope="module")
def lab_net():
    """A random judge whose ranking is fixed by its fc bias (class 23 highest, then 22, ...):
    its top-k is the k highest class indices for every image, so accuracies are known."""
    torch.manual_seed(0)
    net = evaluator.build_judge().eval()
    with torch.no_grad():
        net.fc[0].weight.mul_(0.01)
        net.fc[0].bias.copy_(torch.linspace(-6, 6, 24))
    return net


def bias_judge_correct(conditions):
    """How many labels the bias-ranked judge finds: true classes among the k highest indices."""
    return sum(sum(dataloader.OBJECTS[n] >= 24 - len(c) for n in c) for c in conditions)


@pytest.fixture(scope="module")
def lab_ckpt(lab_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("lab") / "checkpoint.pth"
    torch.save({"model": lab_net.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def render():
    return pytest.importorskip("render", reason="render.py (another engineer's) is not there yet")


def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images.cpu()):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


# ---------------------------------------------------------------- the accuracy rule

def test_compute_acc_hand_worked():
    out = torch.full((4, 24), 0.1)
    out[0, [3, 7]] = torch.tensor([0.9, 0.8])      # k=1, true 3: top-1 is 3 -> 1/1
    out[1, [0, 5, 9]] = torch.tensor([0.9, 0.2, 0.8])  # k=2, true {0, 5}: top-2 {0, 9} -> 1/2
    out[2, [0, 5, 9, 11]] = torch.tensor([0.7, 0.6, 0.3, 0.9])  # k=3, true {0, 5, 9}: {11,0,5}
    out[3, [1, 2]] = 1.0                             # k=2, true {1, 2} tied at the top -> 2/2
    labels = multi_hot([3], [0, 5], [0, 5, 9], [1, 2])
    ks, hits, top = evaluator.topk_hits(out, labels)
    assert ks.tolist() == [1, 2, 3, 2] and hits.tolist() == [1, 1, 2, 2]
    assert sorted(top[2]) == [0, 5, 11]
    assert evaluator.compute_acc(out, labels) == pytest.approx(6 / 8)  # pooled, not averaged
    rows = evaluator.per_image(out, labels)
    assert rows[1]["missing"] == ["purple cube"] and rows[1]["extra"] == ["red sphere"]
    assert rows[2]["missing"] == ["red sphere"] and rows[2]["extra"] == ["green sphere"]
    assert rows[0]["missing"] == rows[0]["extra"] == [] and rows[0]["labels"] == ["green cube"]
    # "found" is every score above 0.5: image 0 shows one object too many
    assert [len(r["found"]) for r in rows] == [2, 2, 3, 2] and "green cube" in rows[0]["found"]
    kinds = evaluator.miss_kinds(rows)
    assert kinds["missed"] == 2 and (kinds["more_objects"], kinds["fewer_objects"]) == (1, 0)
    # the same hits split by the number of objects asked for (k = 1, 2, 2, 3 objects)
    assert evaluator.by_objects(rows) == {
        "1": {"images": 1, "correct": 1, "total": 1, "accuracy": 1.0},
        "2": {"images": 2, "correct": 3, "total": 4, "accuracy": 0.75},
        "3": {"images": 1, "correct": 2, "total": 3, "accuracy": 0.6667}}


def test_compute_acc_ties_follow_torch_topk():
    out = torch.zeros(3, 24)
    out[:, [2, 4, 6]] = 1.0  # a saturated judge: three classes tied at exactly 1.0
    labels = multi_hot([4], [2, 6], [2, 4, 6])
    expected = lab_compute_acc(out, labels)
    assert evaluator.compute_acc(out, labels) == expected
    assert evaluator.topk_hits(out, labels)[1][2] == 3  # k = 3 takes all tied classes


def test_compute_acc_matches_lab_loop_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        b = int(torch.randint(1, 40, (1,), generator=g))
        out = torch.randint(0, 4, (b, 24), generator=g).float() / 3  # many ties
        labels = torch.zeros(b, 24)
        for i in range(b):
            k = int(torch.randint(1, 6, (1,), generator=g))
            labels[i, torch.randperm(24, generator=g)[:k]] = 1
        assert evaluator.compute_acc(out, labels) == lab_compute_acc(out, labels)


def test_compute_acc_rejects_bad_labels():
    with pytest.raises(DataError, match="multi-hot"):
        evaluator.compute_acc(torch.rand(2, 24), torch.full((2, 24), 0.5))
    with pytest.raises(DataError, match=r"\(B, 24\)"):
        evaluator.compute_acc(torch.rand(2, 24), torch.zeros(3, 24))
    with pytest.raises(DataError, match="no true labels"):
        evaluator.compute_acc(torch.rand(2, 24), torch.zeros(2, 24))


def test_frechet_distance_matches_scipy_sqrtm():
    r = np.random.default_rng(0)
    a = r.normal(size=(300, 12))
    b = r.normal(size=(200, 12)) @ r.normal(size=(12, 12)) * 0.5 + 1
    ma, mb, ca, cb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert evaluator.frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)
    assert evaluator.frechet_distance(torch.tensor(b), a) == pytest.approx(ref, rel=1e-9)
    assert evaluator.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    few = r.normal(size=(5, 12))  # fewer samples than dimensions: singular covariance
    assert np.isfinite(evaluator.frechet_distance(few, a))
    with pytest.raises(DataError, match="feature sets"):
        evaluator.frechet_distance(a[:1], b)


@needs_shipped
def test_fd_floor_is_what_renders_of_another_seed_score(render):
    """The floor printed next to the FD: renders of a third seed land on it, the same renders
    with red and blue swapped far above it."""
    judge = evaluator.evaluation_model(device="cpu")
    conds = dataloader.load_conditions(dataloader.TEST_JSONS[0])[:8]
    floor = evaluate.fd_floor(judge, conds, 2, references=4)
    renders = render.render_tensor([(f"other {i}", c) for i, c in enumerate(conds * 2)], seed=5,
                                   device="cpu")
    assert evaluate.fd_against_renders(judge, renders, conds, 4) < 1.5 * floor
    assert evaluate.fd_against_renders(judge, renders[:, [2, 1, 0]], conds, 4) > 10 * floor


# ---------------------------------------------------------------- weights

def test_lab_checkpoint_loads_and_scores(lab_net, lab_ckpt):
    judge = evaluator.evaluation_model(lab_ckpt, device="cpu")
    assert judge.classnum == 24 and judge.device.type == "cpu"
    u8 = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    x = dataloader.to_float(u8)
    with torch.no_grad():
        ref = lab_net(x)
    assert torch.allclose(judge.scores(x), ref, atol=1e-6)
    assert torch.allclose(judge.scores(u8), ref, atol=1e-6)  # uint8 is converted, not misread
    assert judge.features(x).shape == (5, 512)
    labels = multi_hot([0], [1, 2], [3, 4, 5], [6], [7, 8])
    assert judge.eval(x, labels) == lab_compute_acc(ref, labels)
    assert [r["total"] for r in judge.details(x, labels)] == [1, 2, 3, 1, 2]
    assert judge.scores(x[:0]).shape == (0, 24)


def test_save_judge_writes_small_fp16_shards(lab_net, tmp_path):
    names = evaluator.save_judge(lab_net, tmp_path / "w", {"note": "test"})
    assert len(names) >= 2
    for n in names:
        assert (tmp_path / "w" / n).stat().st_size <= 15 * 2**20
    meta = json.loads((tmp_path / "w" / "judge.json").read_text())
    assert meta["shards"] == names and meta["note"] == "test" and meta["classes"][23] == \
        "yellow cylinder"
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    judge = evaluator.evaluation_model(tmp_path / "w", "cpu")
    with torch.no_grad():
        ref = lab_net(x)
    assert torch.allclose(judge.scores(x), ref, atol=5e-3)  # fp16 weights, fp32 compute
    (tmp_path / "w" / "judge-00009-of-00009.safetensors").write_bytes(b"stale")
    evaluator.save_judge(lab_net, tmp_path / "w")  # a re-save drops shards it does not list
    assert sorted(p.name for p in (tmp_path / "w").glob("*.safetensors")) == names


def test_single_safetensors_file_loads(lab_net, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in lab_net.state_dict().items()},
              tmp_path / "j.safetensors")
    judge = evaluator.evaluation_model(tmp_path / "j.safetensors", "cpu")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(judge.scores(x), lab_net(x), atol=1e-6)


def test_bad_checkpoints_give_one_clear_line(tmp_path, monkeypatch):
    def err(ckpt):
        with pytest.raises(DataError) as e:
            evaluator.evaluation_model(ckpt, "cpu")
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "checkpoint not found" in err(tmp_path / "nope.pth")
    (tmp_path / "w.txt").write_text("x")
    assert "expected the lab's .pth/.pt" in err(tmp_path / "w.txt")
    (tmp_path / "junk.pth").write_bytes(os.urandom(200))
    assert "cannot load" in err(tmp_path / "junk.pth")
    torch.save({"state": [1, 2]}, tmp_path / "fmt.pth")
    assert "{'model': state_dict}" in err(tmp_path / "fmt.pth")
    torch.save({"model": {"fc": Path("x")}}, tmp_path / "pickle.pth")  # not weights-only safe
    assert "cannot load" in err(tmp_path / "pickle.pth")
    import torchvision

    torch.save({"model": torchvision.models.resnet18(weights=None).state_dict()},
               tmp_path / "imagenet.pth")  # 1000 classes, fc not Sequential
    msg = err(tmp_path / "imagenet.pth")
    assert "2 missing keys (fc.0.weight, fc.0.bias)" in msg and "2 unexpected keys" in msg
    sd = evaluator.build_judge().state_dict()
    sd["fc.0.weight"] = torch.zeros(10, 512)
    torch.save({"model": sd}, tmp_path / "ten.pth")
    assert "1 wrong shapes (fc.0.weight (10, 512) vs (24, 512))" in err(tmp_path / "ten.pth")
    (tmp_path / "empty").mkdir()
    assert "no .safetensors shards" in err(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    assert "unreadable safetensors" in err(tmp_path / "bad.safetensors")
    monkeypatch.setattr(evaluator, "JUDGE_DIR", tmp_path / "missing")
    assert "train_judge.py" in err(None)


def test_bad_images(lab_ckpt):
    judge = evaluator.evaluation_model(lab_ckpt, "cpu")
    with pytest.raises(DataError, match=r"\(B, 3, 64, 64\)"):
        judge.scores(torch.zeros(2, 3, 32, 32))
    with pytest.raises(DataError, match=r"values in \[-1, 1\]"):
        judge.scores(torch.full((2, 3, 64, 64), 200.0))


@needs_shipped
def test_shipped_weights_load():
    judge = evaluator.evaluation_model(device="cpu")
    assert judge.checkpoint == SHIPPED
    assert judge.meta["metrics"]["1-3 objects"]["accuracy"] >= 0.99
    assert all((SHIPPED / n).stat().st_size <= 15 * 2**20 for n in judge.meta["shards"])


def lab_evaluator_net(path):
    """The judge exactly as the lab's unmodified evaluator.py builds and loads it."""
    import torch.nn as nn
    import torchvision.models as models

    net = models.resnet18()
    net.fc = nn.Sequential(nn.Linear(512, 24), nn.Sigmoid())
    net.load_state_dict(torch.load(path, weights_only=True)["model"])
    return net.eval()


@needs_shipped
def test_export_scores_like_the_lab_evaluator(render, tmp_path):
    out = tmp_path / "lab" / "checkpoint.pth"
    r = run("evaluator.py", "--export", out, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"wrote {out} ("), r.stderr
    assert [p.name for p in out.parent.iterdir()] == ["checkpoint.pth"]  # no temporary left
    conds = [["red sphere"], ["cyan cylinder", "cyan cube"], ["gray cube", "blue sphere",
                                                              "yellow cylinder"]]
    u8 = render.render_tensor([(f"export {i}", c) for i, c in enumerate(conds)], seed=3,
                              device="cpu")
    x = dataloader.to_float(u8)  # the lab's input: (B, 3, 64, 64) in [-1, 1]
    with torch.no_grad():
        lab = lab_evaluator_net(out)(x)
    ours = evaluator.evaluation_model(device="cpu")
    assert torch.equal(lab, ours.scores(x))  # same network, same fp32 weights: same numbers
    labels = dataloader.encode_batch(conds)
    assert lab_compute_acc(lab, labels) == ours.eval(x, labels)
    again = evaluator.evaluation_model(out, device="cpu")  # and it loads back as a checkpoint
    assert torch.equal(again.scores(x), lab)


def test_export_bad_paths(tmp_path):
    (tmp_path / "folder.pth").mkdir()
    for bad in ("judge.safetensors", "folder.pth"):
        with pytest.raises(DataError, match=f"--export .*{bad}: .*expected"):
            evaluator.export_lab(tmp_path / bad, tmp_path / "no-judge")
    with pytest.raises(DataError, match="no-judge: checkpoint not found$"):
        evaluator.export_lab(tmp_path / "x.pth", tmp_path / "no-judge")
    assert [p.name for p in tmp_path.iterdir()] == ["folder.pth"]  # nothing written


def test_miss_kinds_pairs_by_color_then_shape():
    rows = [{"missing": ["red cube", "blue sphere"], "extra": ["blue cylinder", "red sphere"]},
            {"missing": ["cyan cube", "red cube"], "extra": ["gray cube", "red sphere"]},
            {"missing": ["green cylinder"], "extra": ["yellow sphere"]},
            {"missing": [], "extra": []}]
    # the judge finds 2 of 2, 3 of 2 (one too many), 1 of 1 and 0 of 1 (one too few) objects
    for r, total, found in zip(rows, (2, 2, 1, 1), (2, 3, 1, 0)):
        r.update(total=total, found=["some object"] * found)
    # row 1: red cube takes red sphere (color first), so cyan cube pairs with gray cube by shape
    assert evaluator.miss_kinds(rows) == {"missed": 5, "wrong_shape": 3, "wrong_color": 1,
                                          "neither": 1, "more_objects": 1, "fewer_objects": 1}


# ---------------------------------------------------------------- evaluate.py

@pytest.fixture(scope="module")
def scene_dir(render, tmp_path_factory):
    """A few benchmark-like conditions, their renders in <dir>/few/, and shuffled labels."""
    d = tmp_path_factory.mktemp("eval")
    new_test, test = (dataloader.load_conditions(p) for p in dataloader.TEST_JSONS[::-1])
    conds = new_test[:5] + new_test[7:8] + test[24:26]  # 23 labels; the bias judge finds 3
    (d / "few.json").write_text(json.dumps(conds))
    shuffled = conds[3:] + conds[:3]  # every image gets another image's labels
    (d / "shuffled.json").write_text(json.dumps(shuffled))
    images = render.render_tensor([(f"eval test {i}", c) for i, c in enumerate(conds)], seed=7,
                                   device="cpu")
    write_images(d / "few", images)
    write_images(d / "shuffled", images)
    return d


def test_evaluate_cli_output_and_json(scene_dir, lab_ckpt, capsys):
    r = run("evaluate.py", "--images", scene_dir, "--conditions", scene_dir / "few.json",
            "--checkpoint", lab_ckpt, "--per-image", "--json", scene_dir / "m.json",
            "--fd-renders", 2, "--device", "cpu", cwd=scene_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    m = LINE.match(lines[0])
    assert m and m.group(1) == "few.json" and m.group(4) == "23" and m.group(5), lines[0]
    assert len(lines) == 2 + 8 and lines[2].startswith("    0: ")
    report = json.loads((scene_dir / "m.json").read_text())
    assert report["command"].startswith("python evaluate.py --images ")
    metrics = report["files"]["few.json"]
    assert metrics["total"] == 23 and f"{metrics['accuracy']:.4f}" == m.group(2)
    kinds = [int(g) for g in m.group(7, 8, 9, 10)]  # what the 20 missed objects became
    counts = [int(g or 0) for g in m.group(11, 12)]  # images with too many / too few objects
    assert kinds[0] == 20 == sum(kinds[1:]) and metrics["misses"] == dict(
        zip(("missed", "wrong_shape", "wrong_color", "neither", "more_objects",
             "fewer_objects"), kinds + counts))
    assert counts[0] + counts[1] == sum(len(r["found"]) != r["total"]
                                        for r in metrics["per_image"])
    by_k = metrics["by_objects"]  # and the line under it: the accuracy by number of objects
    assert lines[1] == "  by number of objects: " + ", ".join(
        f"{k}: {d['accuracy']:.4f} ({d['correct']}/{d['total']})" for k, d in by_k.items())
    assert lines[1].endswith(evaluator.by_objects_text(by_k, 4, counts=True))
    assert sum(d["total"] for d in by_k.values()) == 23 and sum(
        d["correct"] for d in by_k.values()) == metrics["correct"]
    conds = json.loads((scene_dir / "few.json").read_text())
    assert metrics["correct"] == bias_judge_correct(conds) == 3
    assert metrics["per_image"][5]["predicted"] == ["yellow cylinder", "cyan cylinder",
                                                    "purple cylinder"]
    assert metrics["fd"] >= 0 and len(metrics["per_image"]) == 8
    assert (f"{metrics['fd']:.2f}", f"{metrics['fd_floor']:.2f}") == m.group(5, 6)
    # the library entry points agree with the CLI, and the FD reference is cached
    judge = evaluator.evaluation_model(lab_ckpt, "cpu")
    res = evaluate.score_folder(judge, scene_dir / "few", scene_dir / "few.json", True, 2)
    assert res["correct"] == metrics["correct"] and res["fd"] == pytest.approx(metrics["fd"])
    assert res["fd_floor"] == pytest.approx(metrics["fd_floor"])
    assert len(evaluate._FEATURES[judge]) == 1  # the FD and its floor share one feature pass
    argv = ["--images", str(scene_dir), "--conditions", str(scene_dir / "few.json"),
            "--checkpoint", str(lab_ckpt), "--no-fd", "--device", "cpu", "--json",
            str(scene_dir / "m2.json")]
    evaluate.main(argv)
    assert LINE.match(capsys.readouterr().out.splitlines()[0]).group(5) is None
    # called in-process, the results file records the call's own arguments, not pytest's
    assert json.loads((scene_dir / "m2.json").read_text())["command"] == " ".join(
        ["python", "evaluate.py", *argv])


@needs_shipped
def test_evaluate_shipped_judge_true_vs_shuffled(scene_dir):
    r = run("evaluate.py", "--images", scene_dir, "--conditions", scene_dir / "few.json",
            scene_dir / "shuffled.json", "--device", "cpu", "--no-fd", cwd=scene_dir)
    assert r.returncode == 0, r.stderr
    acc = {m.group(1): float(m.group(2)) for m in map(LINE.match, r.stdout.splitlines()) if m}
    assert acc["few.json"] >= 0.94 and acc["shuffled.json"] <= 0.5, r.stdout


def test_evaluate_bad_inputs(scene_dir, lab_ckpt, tmp_path, capsys):
    judge = evaluator.evaluation_model(lab_ckpt, "cpu")
    conds = scene_dir / "few.json"
    with pytest.raises(DataError, match="folder not found"):
        evaluate.score_folder(judge, tmp_path / "absent", conds)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images \(expected 0.png .. 7.png"):
        evaluate.score_folder(judge, tmp_path / "empty", conds)
    part = tmp_path / "part"
    write_images(part, torch.zeros(8, 3, 64, 64, dtype=torch.uint8))
    for i in (2, 5, 6, 7):
        (part / f"{i}.png").unlink()
    with pytest.raises(DataError, match=r"4 of 8 images are missing \(first: 2.png, 5.png, 6"):
        evaluate.score_folder(judge, part, conds)
    big = tmp_path / "big"
    write_images(big, torch.zeros(9, 3, 64, 64, dtype=torch.uint8))
    Image.new("RGB", (320, 240), (120, 120, 120)).save(big / "3.png")
    res = evaluate.score_folder(judge, big, conds)
    err = capsys.readouterr().err
    assert res["total"] == 23 and "1 images are not 64x64" in err and "3.png 320x240" in err
    assert "ignoring 1 images beyond the 8 conditions" in err
    (big / "4.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="4.png: unreadable image"):
        evaluate.score_folder(judge, big, conds)
    (tmp_path / "bad.json").write_text(json.dumps([["red sphere"], ["pink cube"]]))
    with pytest.raises(DataError, match=r"bad.json\[1\]: unknown label 'pink cube'"):
        evaluate.score_folder(judge, big, tmp_path / "bad.json")
    # through the command: one line on stderr, exit status 2
    r = run("evaluate.py", "--images", tmp_path, "--conditions", conds, "--checkpoint", lab_ckpt,
            "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "folder not found" in r.stderr


# ---------------------------------------------------------------- train_judge.py

def test_augment_is_label_safe_and_seeded():
    cfg = train_judge.Config(shift=0, flip=0, blur=0, noise=0)
    x = torch.rand(6, 3, 64, 64) * 2 - 1
    assert torch.equal(train_judge.augment(x, cfg, torch.Generator(), torch.Generator()), x)
    cfg = train_judge.Config(shift=2, flip=0, blur=0, noise=0)
    y = train_judge.augment(x, cfg, torch.Generator().manual_seed(1), torch.Generator())
    # a pure translation by at most 2 px: the interior of each image reappears unchanged
    for i in range(6):
        assert any(torch.equal(y[i, :, 2 + dy:62 + dy, 2 + dx:62 + dx], x[i, :, 2:62, 2:62])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    cfg = train_judge.Config()
    a, b = (train_judge.augment(x, cfg, torch.Generator().manual_seed(3),
                                torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    # color statistics stay put: no color jitter (blur and noise are zero-mean)
    assert (a.mean((0, 2, 3)) - x.mean((0, 2, 3))).abs().max() < 0.05


def test_lr_schedule():
    f = train_judge.lr_factor
    assert f(0, 0.1) == 0 and f(0.1, 0.1) == pytest.approx(1) and f(1, 0.1) == pytest.approx(0)
    assert f(0.05, 0.1) == pytest.approx(0.5) and 0 < f(0.5, 0.1) < 1


def test_train_judge_tiny_cpu_run(render, tmp_path):
    out, res, log = tmp_path / "w", tmp_path / "judge-cpu.json", tmp_path / "log.jsonl"
    r = run("train_judge.py", "--train-scenes", 8, "--val-scenes", 4, "--bench-renders", 1,
            "--steps", 3, "--batch-size", 16, "--log-every", 1, "--device", "cpu", "--out", out,
            "--results", res, "--log", log, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "4-5 objects" in r.stdout and "MISSED" in r.stdout  # 3 steps: no miracle
    report = json.loads(res.read_text())
    assert report["steps"] == 3 and report["images_seen"] == 48
    assert report["metrics"]["all held-out"]["images"] == 20
    assert report["metrics"]["benchmark conditions x1"]["images"] == 64
    assert set(report["versions"]) >= {"torch", "torchvision"} and "train_judge.py" in \
        report["command"]
    assert [json.loads(s)["step"] for s in log.read_text().splitlines()] == [1, 2, 3]
    judge = evaluator.evaluation_model(out, "cpu")
    assert judge.meta["metrics"] == report["metrics"] and judge.meta["images_seen"] == 48
    images = render.render_tensor([("a", ["red cube"]), ("b", ["red cube"])], device="cpu")
    acc = judge.eval(dataloader.to_float(images), dataloader.encode_batch([["red cube"]] * 2))
    assert 0 <= acc <= 1


def test_train_judge_on_folders_of_pngs_from_a_given_judge(fake_data, tmp_path):
    """--data trains on folders of PNGs (the lab's format) alone (--train-scenes 0), --init
    starts from a judge (fine-tuning), --held-out scores folders by number of objects."""
    folder = fake_data[1]
    data = tmp_path / "pngs"
    data.mkdir()
    for png in folder.glob("*.png"):
        (data / png.name).write_bytes(png.read_bytes())
    (data / "labels.json").write_text(Path(fake_data[3]).read_text())
    start = tmp_path / "start"
    torch.manual_seed(3)
    evaluator.save_judge(evaluator.build_judge(), start)
    out, res = tmp_path / "w", tmp_path / "r.json"
    r = run("train_judge.py", "--train-scenes", 0, "--data", data, "--held-out", data,
            "--init", start, "--lr", "1e-9", "--val-scenes", 2, "--bench-renders", 0,
            "--steps", 2, "--batch-size", 4, "--device", "cpu", "--out", out, "--results", res,
            "--log", tmp_path / "log.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(res.read_text())
    assert "training: 12 images" in r.stdout  # the folder's 12 images, no renders
    by_k = {k: m["images"] for k, m in report["metrics"].items() if k.startswith("pngs ")}
    assert by_k == {"pngs 1-3 objects": 12}
    # a learning rate of 1e-9 leaves the weights where --init put them (fp16 shards both)
    got, want = evaluator.read_state_dict(out), evaluator.read_state_dict(start)
    assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-3) for k in want
               if "running" not in k and "num_batches" not in k)
    p = run("train_judge.py", "--train-scenes", 0, "--device", "cpu", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: --train-scenes: expected a positive integer (0 only with " \
        "--data)"


def test_train_judge_bad_flags():
    with pytest.raises(DataError, match="^--batch-size: expected a positive integer$"):
        train_judge.parse_args(["--batch-size", "0"])
    with pytest.raises(DataError, match="^--precision: expected auto, bf16 or fp32"):
        train_judge.parse_args(["--precision", "fp8"])
