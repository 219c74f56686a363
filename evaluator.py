"""The judge: the lab's ResNet18 multi-label classifier, its accuracy rule, and a bit more.

`evaluation_model` keeps the lab's interface (`eval(images, labels) -> accuracy`, `compute_acc`,
attributes `resnet18` and `classnum`), so a user's checkpoint.pth is a drop-in. On top of it:
per-image scores, which objects each image misses or adds, penultimate features and a Frechet
distance on them, so image quality is measured by the same network as accuracy.

Weights: the lab's format is torch.save({"model": state_dict}) (.pth/.pt); a bare state_dict
(a dict of tensors alone) is read too, as it is unambiguous. The project ships
weights/judge/: fp16 safetensors shards of at most 15 MiB (small enough for git) and judge.json
(shard list, classes, training metrics).

    python evaluator.py --export checkpoint.pth     # weights/judge in the lab's format

--export writes a judge (default: weights/judge; --checkpoint names another) as the lab's
checkpoint.pth: {"model": state_dict} of torchvision's resnet18 with fc = Sequential(Linear(512,
24), Sigmoid()), in float32. The project's judge is exactly that network with the same input,
(B, 3, 64, 64) in [-1, 1], so the lab's unmodified evaluator.py loads the file as its
./checkpoint.pth and scores exactly as evaluation_model does (tests/test_judge.py checks it).
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dataloader import (LABELS, NUM_CLASSES, ROOT, DataError, _rel, first_line, resolve_device,
                        run_cli, to_float, write_json)

JUDGE_DIR = ROOT / "weights" / "judge"
META_FILE = "judge.json"
SHARD_BYTES = 15 * 2**20
HEADER_ROOM = 256 * 2**10  # a shard's JSON header (names, shapes) also counts towards its size
BATCH = 256  # images per forward pass, so callers may pass any number of images


def build_judge():
    """torchvision resnet18 with the lab's head: fc = Linear(512, 24) followed by Sigmoid."""
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Sequential(nn.Linear(512, NUM_CLASSES), nn.Sigmoid())
    return net


def trunk(net, x):
    """Everything before fc: (B, 3, H, W) -> (B, 512) penultimate features."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)


# ---------------------------------------------------------------- the lab's accuracy rule

def _check_pair(out, onehot_labels):
    if out.ndim != 2 or out.shape != onehot_labels.shape:
        raise DataError(f"scores {tuple(out.shape)} and labels {tuple(onehot_labels.shape)}: "
                        f"expected two (B, {NUM_CLASSES}) tensors")
    if not ((onehot_labels == 0) | (onehot_labels == 1)).all():
        raise DataError("labels: expected multi-hot vectors of 0s and 1s")


def topk_hits(out, onehot_labels):
    """Per image: k = number of true labels, top = indices of the k best scores, hits = how many
    of them are true labels. Returns (k, hits) as long tensors and top as a list of lists.

    Vectorised over the images that share k, with torch.topk on CPU tensors exactly as the lab's
    loop calls it (out[i].topk(k) and onehot_labels[i].topk(k)), so ties resolve identically.
    """
    out, labels = out.detach().float().cpu(), onehot_labels.detach().float().cpu()
    _check_pair(out, labels)
    ks = labels.sum(1).long()
    hits = torch.zeros_like(ks)
    top = [[] for _ in range(len(ks))]
    for k in ks.unique().tolist():
        if k == 0:
            continue  # the lab's loop adds nothing for an image without labels
        rows = (ks == k).nonzero().flatten()
        oi = out[rows].topk(k, dim=1).indices
        li = labels[rows].topk(k, dim=1).indices
        hits[rows] = (oi[:, :, None] == li[:, None, :]).any(2).sum(1)
        for r, o in zip(rows.tolist(), oi.tolist()):
            top[r] = o
    return ks, hits, top


def compute_acc(out, onehot_labels):
    """The lab's accuracy: sum over images of |top-k scores & true labels| / total true labels."""
    ks, hits, _ = topk_hits(out, onehot_labels)
    if ks.sum() == 0:
        raise DataError("labels: no true labels at all, accuracy is undefined")
    return hits.sum().item() / ks.sum().item()


def per_image(out, onehot_labels):
    """One dict per image: true labels, the judge's top-k, which are missing / extra, hits, and
    "found": every label the judge scores above 0.5, however many (the top-k cannot show an
    object too many)."""
    out, onehot_labels = out.detach().float().cpu(), onehot_labels.detach().float().cpu()
    ks, hits, top = topk_hits(out, onehot_labels)
    rows = []
    for i, (k, h, t) in enumerate(zip(ks.tolist(), hits.tolist(), top)):
        true = (onehot_labels[i] > 0.5).nonzero().flatten().tolist()
        found = (out[i] > 0.5).nonzero().flatten().tolist()
        rows.append({"labels": [LABELS[j] for j in true], "predicted": [LABELS[j] for j in t],
                     "missing": [LABELS[j] for j in true if j not in t],
                     "extra": [LABELS[j] for j in t if j not in true], "correct": h, "total": k,
                     "found": [LABELS[j] for j in found]})
    return rows


def miss_kinds(rows):
    """What the missed objects of per_image rows became: each missing label is paired with an
    extra one of the same image (the judge's top-k has k labels, so they are as many), first by
    color ("wrong_shape": right color, wrong shape), then by shape ("wrong_color"); the rest
    share neither ("neither": a wrong object, or one the judge could not see). Also per image:
    "more_objects" / "fewer_objects" count the images in which the judge finds (score > 0.5)
    more / fewer different objects than the condition has."""
    kinds = {"missed": 0, "wrong_shape": 0, "wrong_color": 0, "neither": 0,
             "more_objects": 0, "fewer_objects": 0}
    for r in rows:
        kinds["more_objects"] += len(r["found"]) > r["total"]
        kinds["fewer_objects"] += len(r["found"]) < r["total"]
        missing, extra = list(r["missing"]), list(r["extra"])
        kinds["missed"] += len(missing)
        for word, kind in ((0, "wrong_shape"), (1, "wrong_color")):  # names are "color shape"
            for m in list(missing):
                same = [e for e in extra if e.split()[word] == m.split()[word]]
                if same:
                    missing.remove(m)
                    extra.remove(same[0])
                    kinds[kind] += 1
        kinds["neither"] += len(missing)
    return kinds


def by_objects(rows):
    """The lab's accuracy of per_image rows split by how many objects the condition asks for:
    {"1": {"images", "correct", "total", "accuracy"}, "2": ..., "3": ...}. Why: a model that
    draws single objects right but fails on three is failing at composition, not at objects."""
    out = {}
    for r in rows:
        d = out.setdefault(str(r["total"]), {"images": 0, "correct": 0, "total": 0})
        d["images"] += 1
        d["correct"] += r["correct"]
        d["total"] += r["total"]
    for d in out.values():
        d["accuracy"] = round(d["correct"] / d["total"], 4)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def by_objects_text(by_k, digits=2, counts=False):
    """by_objects(...) -> '1: 0.79, 2: 0.53, 3: 0.52' (counts=True adds ' (26/33)')."""
    return ", ".join(f"{k}: {d['accuracy']:.{digits}f}"
                     + (f" ({d['correct']}/{d['total']})" if counts else "")
                     for k, d in by_k.items())


# ---------------------------------------------------------------- image quality

def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two feature sets (N, D), in float64.

    Tr sqrt(Ca Cb) is the sum of the square roots of the eigenvalues of the symmetric PSD
    matrix sqrt(Ca) Cb sqrt(Ca): two eigendecompositions, no complex sqrtm, stable when the
    covariances are singular (fewer samples than dimensions).
    """
    a, b = (np.asarray(torch.as_tensor(f).detach().cpu().double()) for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise DataError(f"frechet_distance: expected two (N >= 2, D) feature sets, got "
                        f"{a.shape} and {b.shape}")
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    sa = (v * np.sqrt(w.clip(0))) @ v.T
    m = sa @ cb @ sa
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(0)).sum()
    diff = a.mean(0) - b.mean(0)
    return max(0.0, float(diff @ diff + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt))


# ---------------------------------------------------------------- weights

def read_meta(folder):
    """judge.json of a weights folder, or {} when there is none."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{_rel(path)}: malformed JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{_rel(path)}: expected a JSON object")
    return meta


def write_meta(folder, meta):
    write_json(Path(folder) / META_FILE, meta)


def save_judge(model, folder=JUDGE_DIR, meta=None):
    """Write model's weights as fp16 safetensors shards (<= 15 MiB each) plus judge.json.

    Each file goes to a temporary name first and is renamed; shards of an older save that the
    new judge.json no longer lists are removed. Returns the list of shard names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
          .contiguous() for k, v in model.state_dict().items()}
    shards, size = [{}], 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > SHARD_BYTES - HEADER_ROOM:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    names = [f"judge-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tmp = folder / (name + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / name)
    write_meta(folder, {**(meta or {}), "architecture": "torchvision resnet18, fc = Linear(512, "
                        f"{NUM_CLASSES}) + Sigmoid, input (B, 3, 64, 64) in [-1, 1]",
                        "classes": LABELS, "dtype": "float16", "shards": names})
    for old in folder.glob("*.safetensors"):
        if old.name not in names:
            old.unlink()
    return names


def _load_safetensors(path):
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DataError(f"{_rel(path)}: unreadable safetensors file ({e})") from None


def read_state_dict(checkpoint):
    """A state dict from the lab's .pth/.pt, a .safetensors file or a folder of shards."""
    path = Path(checkpoint)
    if path.is_dir():
        names = read_meta(path).get("shards") or sorted(p.name for p in path.glob("*.safetensors"))
        if not names:
            raise DataError(f"{_rel(path)}: no .safetensors shards in this folder (expected the "
                            "judge's weights, as written by train_judge.py)")
        sd = {}
        for name in names:
            if not (path / name).is_file():
                raise DataError(f"{_rel(path)}: shard {name} listed in {META_FILE} is missing")
            sd.update(_load_safetensors(path / name))
        return sd
    if not path.is_file():
        raise DataError(f"{_rel(path)}: checkpoint not found")
    if path.suffix.lower() == ".safetensors":
        return _load_safetensors(path)
    if path.suffix.lower() not in (".pth", ".pt"):
        raise DataError(f"{_rel(path)}: expected the lab's .pth/.pt checkpoint, a .safetensors "
                        "file or a folder of shards")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling fails in many ways; all mean "not a checkpoint"
        raise DataError(f"{_rel(path)}: cannot load as a weights-only torch checkpoint "
                        f"({first_line(e)})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict is unambiguous too
    keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise DataError(f"{_rel(path)}: expected the lab's format {{'model': state_dict}}, got {keys}")


def load_weights(net, checkpoint):
    """Load a checkpoint into net, or raise one line summarising what does not fit."""
    sd, expected = read_state_dict(checkpoint), net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and (not isinstance(sd[k], torch.Tensor) or sd[k].shape != v.shape)]
    problems = [f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", wrong)) if items]
    if problems:
        raise DataError(f"{_rel(checkpoint)}: not a resnet18 judge with {NUM_CLASSES} outputs: "
                        + "; ".join(problems))
    net.load_state_dict(sd)  # fp16 shards are copied into the fp32 parameters


# ---------------------------------------------------------------- the lab's interface, and more

class evaluation_model:
    """The lab's judge. checkpoint: None (the project's weights/judge), the lab's .pth/.pt,
    a .safetensors file or a folder of shards. Images: (B, 3, 64, 64) in [-1, 1] (uint8 is
    converted), on any device. Labels: (B, 24) multi-hot. Scores and features come back on
    the CPU in float32.
    """

    def __init__(self, checkpoint=None, device="auto"):
        if checkpoint is None and not JUDGE_DIR.is_dir():
            raise DataError(f"{_rel(JUDGE_DIR)}: the project's judge weights are missing (train "
                            "them with `python train_judge.py`, or pass the lab's checkpoint.pth)")
        self.checkpoint = Path(JUDGE_DIR if checkpoint is None else checkpoint)
        self.device = resolve_device(device)
        self.meta = read_meta(self.checkpoint) if self.checkpoint.is_dir() else {}
        self.resnet18 = build_judge()
        load_weights(self.resnet18, self.checkpoint)
        self.resnet18 = self.resnet18.to(self.device).eval()
        self.classnum = NUM_CLASSES

    def _run(self, images, fn, dim):
        """fn over images in chunks of BATCH on the judge's device -> (B, dim) float32 on CPU."""
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or shape[1:] != (3, 64, 64):
            raise DataError(f"images: expected a (B, 3, 64, 64) tensor, got {shape}")
        outs = [torch.zeros(0, dim)]
        with torch.inference_mode():
            for chunk in images.split(BATCH):
                x = chunk.to(self.device)
                x = to_float(x) if x.dtype == torch.uint8 else x.float()
                if x.numel() and (x.min() < -1.5 or x.max() > 1.5):  # e.g. [0, 255] as floats
                    raise DataError(f"images: expected values in [-1, 1], got [{x.min():.3g}, "
                                    f"{x.max():.3g}] (uint8 images are converted automatically)")
                outs.append(fn(x).float().cpu())
        return torch.cat(outs)

    def scores(self, images):
        """(B, 24) sigmoid scores."""
        return self._run(images, self.resnet18, NUM_CLASSES)

    def features(self, images):
        """(B, 512) penultimate features (input of fc), for Frechet distances."""
        return self._run(images, lambda x: trunk(self.resnet18, x), 512)

    def compute_acc(self, out, onehot_labels):
        return compute_acc(out, onehot_labels)

    def eval(self, images, labels):
        """The lab's accuracy of the judge's scores on images against their labels."""
        return compute_acc(self.scores(images), labels)

    def details(self, images, labels):
        """Per image: which labels the judge finds, misses and adds (see per_image)."""
        return per_image(self.scores(images), labels.cpu())


# ---------------------------------------------------------------- the lab's checkpoint.pth

def export_lab(path, checkpoint=None):
    """Write a judge (None: weights/judge) as the lab's {"model": state_dict} .pth, float32 on
    the CPU, to a temporary name and renamed. Returns the path."""
    path = Path(path)
    if path.suffix.lower() not in (".pth", ".pt"):
        raise DataError(f"--export {_rel(path)}: expected a .pth or .pt file name (the lab's "
                        "evaluator loads checkpoint.pth)")
    if path.is_dir():
        raise DataError(f"--export {_rel(path)}: is a folder; expected a file name")
    net = evaluation_model(checkpoint, device="cpu").resnet18
    # fp16 shards were copied into fp32 parameters on load: these are the values that score
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": sd}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        why = getattr(e, "strerror", None) or "torch.save could not write all of it"
        raise DataError(f"--export {_rel(path)}: writing failed ({why}; is the disk full?), "
                        "nothing was replaced") from None
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, metavar="PATH.pth",
                   help="write the judge as the lab's checkpoint.pth ({'model': state_dict})")
    p.add_argument("--checkpoint", default=None,
                   help="the judge to export (default: the project's weights/judge)")
    args = p.parse_args(argv)
    out = export_lab(args.export, args.checkpoint)
    source = _rel(JUDGE_DIR if args.checkpoint is None else args.checkpoint)
    print(f"wrote {_rel(out)} ({out.stat().st_size / 2**20:.1f} MiB): {source} as the lab's "
          "{'model': state_dict}, resnet18 with fc = Sequential(Linear(512, 24), Sigmoid())")


if __name__ == "__main__":
    run_cli(main)
