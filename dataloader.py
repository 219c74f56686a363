"""The one module that knows labels and data.

Labels come from objects.json (the lab's order: index = 8 * shape + color). Condition files
(test.json, new_test.json) are lists of label lists; spec files (train.json) map an image file
name to its label list. The Dataset reads a flat folder of PNGs named as in the spec, squashes
them to 64x64 and scales them to [-1, 1], exactly as the lab's loaders do, so the same code runs
on the lab's real 320x240 i-CLEVR and on the project's synthetic set.

Every bad input raises DataError with one line naming the file, the entry and what was expected;
the scripts print it and exit with status 2.
"""
import difflib
import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
OBJECTS_JSON = ROOT / "objects.json"
TRAIN_JSON = ROOT / "train.json"
TEST_JSONS = (ROOT / "test.json", ROOT / "new_test.json")
DATA_ROOT = ROOT / "data" / "iclevr_syn"  # where the default synthetic set is rendered
SYN_PREFIX = "SYN_train_"  # the project's own file names; the lab's are "CLEVR_train_..."
IMAGE_SIZE = 64


class DataError(ValueError):
    """A one-line, user-facing error about an input file."""


def _rel(path):
    """Paths in messages: relative to the repository when inside it, else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def repo_path(path):
    """A path from a config file: a relative one is relative to the repository (so a run folder
    keeps working when the checkout moves), an absolute one stays as it is."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def portable_path(path):
    """A path typed by the user (relative ones: to the current directory), as a config file
    stores it: relative to the repository when inside it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_json(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{_rel(path)}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{_rel(path)}: malformed JSON ({e})") from None


def write_json(path, obj, indent=1):
    """Write JSON to a temporary name and rename it: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    tmp.replace(path)


def load_objects(path=OBJECTS_JSON):
    """objects.json -> {name: index}; must be a bijection onto 0..N-1."""
    objects = load_json(path)
    if not isinstance(objects, dict) or not objects:
        raise DataError(f"{_rel(path)}: expected a JSON object {{label name: index}}")
    if sorted(objects.values()) != list(range(len(objects))):
        raise DataError(f"{_rel(path)}: indices must be 0..{len(objects) - 1}, each once")
    return objects


OBJECTS = load_objects()
LABELS = sorted(OBJECTS, key=OBJECTS.get)  # index -> "color shape"
NUM_CLASSES = len(LABELS)
# Colors and shapes in index order (index = 8 * shape + color), derived from the names.
COLORS = [name.split()[0] for name in LABELS[:8]]
SHAPES = [LABELS[8 * s].split()[1] for s in range(NUM_CLASSES // 8)]


def check_labels(labels, where):
    """Validate one condition: a non-empty list of distinct known label names."""
    if not isinstance(labels, list) or not labels:
        raise DataError(f"{where}: expected a non-empty list of label names, got {labels!r}")
    seen = set()
    for name in labels:
        if not isinstance(name, str) or name not in OBJECTS:
            near = difflib.get_close_matches(str(name), LABELS, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(near)}" if near else ""
            raise DataError(f"{where}: unknown label {name!r} (expected one of the {NUM_CLASSES} "
                            f"names in objects.json{hint})")
        if name in seen:
            raise DataError(f"{where}: duplicate label {name!r} (each object class at most once)")
        seen.add(name)
    return labels


def encode(labels, where="labels"):
    """List of label names -> float multi-hot vector of length NUM_CLASSES."""
    vec = torch.zeros(NUM_CLASSES)
    vec[[OBJECTS[n] for n in check_labels(labels, where)]] = 1.0
    return vec


def encode_batch(conditions, where="conditions"):
    """List of label lists -> (N, NUM_CLASSES) float multi-hot tensor."""
    if not conditions:
        return torch.zeros(0, NUM_CLASSES)
    return torch.stack([encode(c, f"{where}[{i}]") for i, c in enumerate(conditions)])


def listed_order(conditions):
    """Each condition's class indices in the order it lists them. i-CLEVR lists a scene's
    objects in the order they were added (train.json's image k shows the first k + 1) and
    puts the first at the scene's centre, so the order says where objects go; the multi-hot
    vector drops it."""
    return [[OBJECTS[name] for name in c] for c in conditions]


def decode(vec, threshold=0.5):
    """Multi-hot vector (or list of indices) -> list of label names in index order."""
    if isinstance(vec, torch.Tensor) and vec.dtype.is_floating_point:
        idx = (vec > threshold).nonzero().flatten().tolist()
    else:
        idx = sorted(int(i) for i in vec)
    return [LABELS[i] for i in idx]


def parse_labels(text):
    """'red sphere, cyan cube' -> ['red sphere', 'cyan cube'] (validated)."""
    labels, positions = parse_placed_labels(text)
    if positions is not None:
        raise DataError("--labels: positions (label@x,y) are not taken here")
    return labels


def parse_placed_labels(text, size=IMAGE_SIZE, where="--labels"):
    """'red sphere@20,30, cyan cube@40,36' -> (labels, [(20.0, 30.0), (40.0, 36.0)]): x, y in
    pixels of the size x size image, origin top-left (a comma followed by a digit continues a
    position). Without any @: (labels, None). Either every object has a position or none.
    where: what the errors name as the text's source (a flag, a field of a page)."""
    parts = [p.strip() for p in re.split(r",(?!\s*[-+.\d])", text) if p.strip()]
    names, positions = [], []
    for part in parts:
        name, at, pos = part.partition("@")
        names.append(name.strip())
        if not at:
            positions.append(None)
            continue
        try:
            x, y = (float(v) for v in pos.split(","))
        except ValueError:
            raise DataError(f"{where}: position {pos.strip()!r} of {name.strip()!r}: expected "
                            "x,y in pixels, e.g. red sphere@20,30") from None
        if not (0 <= x < size and 0 <= y < size):
            raise DataError(f"{where}: position {x:g},{y:g} of {name.strip()!r} is off the "
                            f"{size}x{size} image (x and y in [0, {size}))")
        positions.append((x, y))
    check_labels(names, where)
    placed = [p is not None for p in positions]
    if any(placed) and not all(placed):
        missing = [n for n, p in zip(names, positions) if p is None]
        raise DataError(f"{where}: {', '.join(map(repr, missing))} has no position: place "
                        "every object (label@x,y) or none")
    return names, (positions if all(placed) else None)


def load_conditions(path):
    """A condition file (test.json, new_test.json): a JSON list of label lists."""
    conds = load_json(path)
    if not isinstance(conds, list) or not conds:
        raise DataError(f"{_rel(path)}: expected a non-empty JSON list of label lists")
    for i, c in enumerate(conds):
        check_labels(c, f"{_rel(path)}[{i}]")
    return conds


def validation_conditions(n, seed=1234):
    """n random 1-3-object conditions (distinct classes, none of them a benchmark condition),
    for choices made during development: the guidance scale, learning curves. A fixed seed
    makes any n a prefix of a longer list."""
    rng = np.random.default_rng(seed)
    bench = {frozenset(c) for p in TEST_JSONS for c in load_conditions(p)}
    out = []
    while len(out) < n:
        c = [LABELS[i] for i in rng.choice(NUM_CLASSES, rng.integers(1, 4), replace=False)]
        if frozenset(c) not in bench:
            out.append(c)
    return out


def load_spec(path):
    """A spec file (train.json): {image file name: label list}, in file order."""
    spec = load_json(path)
    if not isinstance(spec, dict) or not spec:
        raise DataError(f"{_rel(path)}: expected a non-empty JSON object "
                        "{image file name: [label names]}")
    for name, labels in spec.items():
        if not name.lower().endswith(".png"):
            raise DataError(f"{_rel(path)}[{name!r}]: expected a .png file name")
        check_labels(labels, f"{_rel(path)}[{name!r}]")
    return spec


# A scene saved after each object it adds: "..._<scene>_<k>.png" shows its first k + 1 labels.
STEP_NAME = re.compile(r"^(.+)_(\d+)\.png$")
_SYN_NAME = re.compile(r"^SYN_[A-Za-z0-9]+_\d+_\d+\.png$")


def is_synthetic_name(name):
    """The project's own rendered names look like SYN_<split>_<scene>_<step>.png."""
    return bool(_SYN_NAME.match(name))


LAYOUT_FORMAT = "iclevr-layout/1"


def layout_path(root, spec_path):
    """Where the layouts of a spec's images live: beside the images (docs/layouts.md)."""
    return Path(root) / f"{Path(spec_path).stem}_layouts.json"


def read_layout_file(path):
    """A layout file -> ({image name: [objects]}, {image name: why it has no layout})."""
    data = load_json(path)
    if not isinstance(data, dict) or data.get("format") != LAYOUT_FORMAT:
        raise DataError(f"{_rel(path)}: expected a layout file (\"format\": "
                        f"\"{LAYOUT_FORMAT}\", docs/layouts.md)")
    layouts, skipped = data.get("layouts"), data.get("skipped", {})
    if not isinstance(layouts, dict) or not isinstance(skipped, dict):
        raise DataError(f"{_rel(path)}: expected \"layouts\": {{image name: [objects]}} and "
                        "optionally \"skipped\": {image name: reason}")
    return layouts, skipped


def load_layouts(path, spec):
    """A layout file -> (N, K, 5) float tensor in spec order: per object (class index, x, y,
    rx, ry), class -1 where an image has fewer than K objects."""
    return layout_tensor(read_layout_file(path)[0], spec, _rel(path))


def layout_tensor(layouts, spec, source="layouts"):
    """{image name: [objects]} (the layout file's "layouts") -> (N, K, 5) in spec order. A
    centre may lie just off the image: the renderer keeps objects that are partly in view."""
    k = max(len(v) for v in spec.values())
    out = torch.full((len(spec), k, 5), -1.0)
    for i, (name, labels) in enumerate(spec.items()):
        objs = layouts.get(name)
        where = f"{source}[{name!r}]"
        if objs is None:
            raise DataError(f"{where}: no layout for this image of the spec")
        if not isinstance(objs, list) or [o.get("label") if isinstance(o, dict) else None
                                          for o in objs] != list(labels):
            raise DataError(f"{where}: expected one object per label, in the spec's order "
                            f"{labels}")
        for j, o in enumerate(objs):
            try:
                vals = [float(o[key]) for key in ("x", "y", "rx", "ry")]
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{where}[{j}]: expected numbers x, y, rx, ry") from None
            if not (math.isfinite(vals[0]) and math.isfinite(vals[1]) and vals[2] > 0 < vals[3]):
                raise DataError(f"{where}[{j}]: position {vals[0]:g},{vals[1]:g} size "
                                f"{vals[2]:g},{vals[3]:g} (expected finite x, y and sizes > 0)")
            out[i, j] = torch.tensor([OBJECTS[labels[j]], *vals])
    return out


def missing_images(root, names):
    root = Path(root)
    return [n for n in names if not (root / n).is_file()]


def check_images(root, spec, spec_path):
    """Every image of a spec must exist under root; one line names how many do not (missing
    synthetic ones are rendered beforehand by render.ensure_images)."""
    missing = missing_images(root, list(spec))
    if missing:
        raise DataError(f"{_rel(spec_path)}: {len(missing)} of {len(spec)} images are missing "
                        f"under {_rel(root)} (first: {', '.join(missing[:3])})")


WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL modes of 16/32-bit gray PNGs


def read_image(path, size=IMAGE_SIZE):
    """PNG -> (uint8 tensor (3, size, size), its PIL mode, its (width, height)): squash-resized
    and converted to RGB like the lab's loader (Resize((64, 64)) of PIL's convert("RGB"))."""
    try:
        with Image.open(path) as im:
            mode, shape = im.mode, im.size
            if mode in WIDE_GRAY:  # PIL's RGB conversion clips these to white: never scale them
                raise DataError(f"{_rel(path)}: a {mode} image (one channel, 16 or 32 bits): "
                                "expected 8-bit RGB PNGs")
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{_rel(path)}: unreadable image ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1), mode, shape


def load_image(path, size=IMAGE_SIZE):
    """PNG -> uint8 tensor (3, size, size) (read_image)."""
    return read_image(path, size)[0]


def to_float(images):
    """uint8 [0, 255] -> float [-1, 1] (the lab's Normalize((0.5,)*3, (0.5,)*3))."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images):
    """float [-1, 1] -> uint8 [0, 255]."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def as_png(images):
    """float [-1, 1] -> the float [-1, 1] a PNG of them holds (quantised to 256 levels): what
    the judge scores in evaluate.py, so in-run scores match scores of the written files."""
    return to_float(to_uint8(images))


def _median_1d(x, k, dim):
    """Running median of window k along dim 2 or 3 of (B, C, H, W), edges replicated."""
    pad = (k // 2, k // 2, 0, 0) if dim == 3 else (0, 0, k // 2, k // 2)
    return F.pad(x, pad, mode="replicate").unfold(dim, k, 1).median(-1).values


def median_background(images, window=21):
    """The image without its objects (see foreground_masks): float (N, 3, H, W)."""
    x = torch.as_tensor(images).float()
    return _median_1d(_median_1d(x, window, 3), window, 2)


def foreground_masks(images, window=21, threshold=10, grow=1, chunk=256):
    """Where the objects are: uint8 images (N, 3, H, W) -> bool masks (N, 1, H, W).

    i-CLEVR objects are small (4-10 px at 64x64) on a smooth floor and backdrop, so a running
    median over more than twice an object's size (a row pass, then a column pass) is the image
    without its objects. Pixels that differ from it by more than threshold (of 255) on any
    channel, grown by grow px, are objects, with a thin margin and the odd specular highlight:
    a few percent of an image. Needs no labels and no renderer, so the lab's real images work
    too.
    """
    out = []
    for x in images.split(chunk):
        x = x.float()
        m = ((x - median_background(x, window)).abs().amax(1, keepdim=True) > threshold).float()
        if grow:
            m = F.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)
        out.append(m.bool())
    return torch.cat(out) if out else torch.zeros(0, 1, *images.shape[2:], dtype=torch.bool)


class ICLEVRDataset(Dataset):
    """Images of a spec file under root, as (image in [-1, 1] (3, 64, 64), multi-hot (24,)),
    plus the image's layout (K, 5) with layouts=True (the layout file beside the images) or
    layouts=PATH (attach_layouts).

    in_memory=True decodes every image once into one uint8 tensor (18,009 images: 221 MB), so
    epochs cost no decoding and the whole set can be moved to the GPU (see .images).
    """

    def __init__(self, root=DATA_ROOT, spec_path=TRAIN_JSON, in_memory=False, size=IMAGE_SIZE,
                 layouts=False):
        self.root, self.spec_path, self.size = Path(root), Path(spec_path), size
        spec = load_spec(self.spec_path)
        check_images(self.root, spec, self.spec_path)
        self.spec = spec  # the whole spec; names, labels and images drop skipped layouts
        self.names = list(spec)
        self.labels = encode_batch([spec[n] for n in self.names], _rel(self.spec_path))
        self.layouts = torch.zeros(len(spec), 0, 5)  # (N, K, 5) once a layout file is attached
        self.images = None
        if in_memory:
            self.images = torch.empty(len(self.names), 3, size, size, dtype=torch.uint8)
            # PIL decodes outside the GIL: threads cut the start of every run on many-core hosts
            converted = []
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                decoded = pool.map(lambda n: read_image(self.root / n, size), self.names)
                for i, (img, mode, _) in enumerate(tqdm(decoded, total=len(self.names),
                                                        unit="img", desc="decoding images",
                                                        leave=False, mininterval=1.0)):
                    self.images[i] = img
                    if mode != "RGB":
                        converted.append(f"{self.names[i]} {mode}")
            if converted:
                print(f"warning: {_rel(self.root)}: {len(converted)} of {len(self.names)} images "
                      f"are not RGB, converted like the lab's loader (first: "
                      f"{', '.join(converted[:3])})", file=sys.stderr)
        if layouts:
            self.attach_layouts(layout_path(self.root, self.spec_path) if layouts is True
                                else layouts)

    def attach_layouts(self, path):
        """Read a layout file (dataloader.load_layouts) into .layouts; the images it lists as
        skipped (an estimate could not place them) leave the set. Returns their number."""
        spec = self.spec
        layouts, skipped = read_layout_file(path)
        keep = [i for i, n in enumerate(self.names) if n not in skipped]
        if not keep:
            raise DataError(f"{_rel(path)}: every image of {_rel(self.spec_path)} is skipped")
        self.names = [self.names[i] for i in keep]
        self.labels = self.labels[keep]
        if self.images is not None:
            self.images = self.images[keep]
        self.layouts = layout_tensor(layouts, {n: spec[n] for n in self.names}, _rel(path))
        return len(spec) - len(keep)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        img = self.images[i] if self.images is not None else load_image(self.root / self.names[i],
                                                                         self.size)
        if self.layouts.shape[1]:
            return to_float(img), self.labels[i], self.layouts[i]
        return to_float(img), self.labels[i]


def get_dataloader(root=DATA_ROOT, spec_path=TRAIN_JSON, batch_size=64, shuffle=True,
                   num_workers=0, in_memory=False, drop_last=True, **kw):
    ds = ICLEVRDataset(root, spec_path, in_memory=in_memory, **kw)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)


def resolve_device(device="auto"):
    """'auto' -> cuda if available, else mps, else cpu; anything else is passed to torch."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def command_line(argv=None):
    """How a script was run, for results files: 'python bench/x.py --flag value' (shell-quoted,
    the script relative to the repository). argv: the script and its arguments (sys.argv)."""
    import shlex
    import sys

    script, *args = sys.argv if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["python", _rel(script), *args])


def computes_bf16(device):
    """True on CUDA and on CPUs that compute bf16 in hardware (AVX-512 BF16, AMX), where bf16
    autocast is much faster than fp32: what precision 'auto' picks, for training and sampling."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu"
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def speed_up_cuda(device):
    """On CUDA: TF32 for float32 matmuls and convolutions, and cuDNN autotuning (training and
    sampling shapes are fixed, so each shape is searched once). A no-op elsewhere."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def device_tag(device):
    """Short device name for results file names: 'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu'."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    m = re.search(r"[A-Za-z]*\d+", torch.cuda.get_device_name(device).replace("NVIDIA", ""))
    return m[0].lower() if m else "cuda"


def host(device):
    """What a measurement ran on: the GPU's name, or the CPU's architecture, the instruction set
    torch's kernels use, the threads and the bf16 instructions the CPU offers (as torch detects
    them). Throughputs of CPUs with AMX tiles and of CPUs with AVX-512 BF16 only differ too much
    to be read as one machine's."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(device)}
    import platform

    # every CPU with AMX tiles also has their bf16 instructions
    bf16 = ("amx_bf16" if torch.cpu._is_amx_tile_supported() else
            "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "none")
    return {"cpu": platform.processor() or platform.machine(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "bf16": bf16}


def first_line(e):
    """An exception as one line: its message's first line, or its type (some have none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def run_cli(main):
    """Run a script's main(); a DataError becomes one line on stderr and exit status 2."""
    try:
        return main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, one line, no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
