"""Synthetic i-CLEVR: a batched analytic ray caster in plain PyTorch (CPU or CUDA).

The world is i-CLEVR's Blender scene as given in iclevr-facts.md section 4: small rubber cubes,
spheres and cylinders on a light-gray studio backdrop, a jittered camera, three jittered area
lights and a sun. Every image is cast as a grid of rays (2x2 per output pixel over the 4:3 view),
shaded (Lambert + soft analytic shadows + a faint grazing highlight + the floor's light bounced
onto the objects), gamma-encoded and filtered down to 64x64 with the triangle filter that PIL's
bilinear resize applies when the lab's loaders squash 320x240 to 64x64.

    python render.py --make-spec train.json --scenes 6003 --objects 3 --seed 0 --prefix SYN_train_
    python render.py --spec train.json --out data/iclevr_syn          # resumable
    python render.py --labels "red sphere, cyan cube" --out x.png     # one ad-hoc image

Images depend only on (spec entry, seed): all randomness of a scene comes from a generator seeded
by (seed, sha256 of the scene key), objects are placed one at a time (image k never depends on
objects added after it), and the per-ray math avoids ops whose CPU result could depend on the
batch shape (no transcendental functions, matmuls or reductions over rays), so the same spec and
seed give byte-identical PNGs whatever the batch size or the set of files still missing.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import dataloader
from dataloader import DataError

# ---------------------------------------------------------------- the world (facts section 4)
# Lengths in Blender units, z up.
COLOR_SRGB = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215),
              "green": (29, 105, 20), "brown": (129, 74, 25), "purple": (129, 38, 192),
              "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
ALBEDO = np.array([COLOR_SRGB[c] for c in dataloader.COLORS]) / 255.0  # used as linear albedo
SIZE = 0.45
CUBE_HALF = SIZE / math.sqrt(2)  # side 0.636
CUBE_ROUND, RIM_ROUND = 0.18 * CUBE_HALF, 0.05
# Per shape, in dataloader.SHAPES order: centre height; the core of the rounded shape whose
# surface normal is the direction from the core's nearest point (bxy: half box in xy, rxy: disc
# radius, bz: half height), which bevels cube edges and rounds cylinder rims; the shadow proxy,
# a rounded vertical cylinder (core radius sa, core half height sb, rounding sr); the radius used
# by the placement rules.
SHAPES = {
    "cube": dict(hz=CUBE_HALF, bxy=CUBE_HALF - CUBE_ROUND, rxy=0.0, bz=CUBE_HALF - CUBE_ROUND,
                 sa=2 * CUBE_HALF / math.sqrt(math.pi) - CUBE_ROUND, sb=CUBE_HALF - CUBE_ROUND,
                 sr=CUBE_ROUND, radius=CUBE_HALF),
    "sphere": dict(hz=SIZE, bxy=0.0, rxy=0.0, bz=0.0, sa=0.0, sb=0.0, sr=SIZE, radius=SIZE),
    "cylinder": dict(hz=SIZE, bxy=0.0, rxy=SIZE - RIM_ROUND, bz=SIZE - RIM_ROUND,
                     sa=SIZE - RIM_ROUND, sb=SIZE - RIM_ROUND, sr=RIM_ROUND, radius=SIZE),
}
SHAPE_KEYS = ("hz", "bxy", "rxy", "bz", "sa", "sb", "sr", "radius")
SHAPE_TABLE = np.array([[SHAPES[s][k] for k in SHAPE_KEYS] for s in dataloader.SHAPES])
SPHERE, CYLINDER = dataloader.SHAPES.index("sphere"), dataloader.SHAPES.index("cylinder")

CAMERA = np.array([7.481, -6.508, 5.344])  # looks at the origin
CAMERA_JITTER = 0.5
MOVE_JITTER = 1.5  # --camera-moves: each step's camera, wide enough to shift objects by pixels
TAN_FOV = (16.0 / 35.0, 12.0 / 35.0)  # 35 mm lens, 32 x 24 mm of sensor: 49.1 x 37.8 deg
# Area lights: position, strength, tint, side length; jittered, always aimed at the origin.
LIGHTS = [((6.447, -2.905, 4.258), 100.0, (1.0, 0.932, 0.817), 0.5),   # key
          ((-4.671, -4.014, 3.011), 30.0, (0.762, 0.818, 1.0), 0.5),    # fill
          ((-1.169, 2.646, 5.816), 50.0, (1.0, 1.0, 1.0), 1.0)]         # back
LIGHT_POS = np.array([pos for pos, *_ in LIGHTS])
LIGHT_JITTER = 1.0
SUN_DIR = np.array([0.415, -0.195, 0.889]) / np.linalg.norm([0.415, -0.195, 0.889])
SUN_STRENGTH = 0.45
SUN_HALF_ANGLE = 0.1  # radians: "small angle", softened to match the reference shadows
LIGHT_SOFTNESS = 4.0  # area lights' penumbrae widened as much (indirect light blurs them too)

# Backdrop: a flat floor that curves up (radius BACKDROP_R) into a wall, BACKDROP_S0 units
# behind the origin along the nominal camera's viewing direction.
BACKDROP_DIR = np.array([-CAMERA[0], -CAMERA[1], 0.0]) / np.hypot(CAMERA[0], CAMERA[1])
BACKDROP_S0, BACKDROP_R = 7.0, 7.0
FLOOR_ALBEDO = 0.8  # Blender's default gray diffuse

# Light transport. Cycles' conventions: an area light of power P gives irradiance
# P cos cos / (pi r^2), radiance = albedo / pi * irradiance. EXPOSURE and SUN_GAIN were fitted
# (least squares on the backdrop's 8x8 block medians) to the reference renders, the object
# terms by eye and by the object tones of bench/look_compare.py.
EXPOSURE = 0.77
SUN_GAIN = 1.49
BOUNCE_OBJECT = 0.25  # floor light reaching downward-facing object surfaces
SPECULAR = 0.04       # faint white reflection of "rubber", Schlick-weighted
PENUMBRA_MIN = 0.02   # keeps the smallest shadows anti-aliased

# Placement (CLEVR's rules with i-CLEVR's settings).
PLACE_RANGE = 3.0
MIN_GAP = 1.25
MARGIN = 0.1
MIN_VISIBLE = 200 / (320 * 240)  # share of the image every object must keep
MAX_OBJECTS = 6

# Rendering grids: 2x2 rays per output pixel (then PIL's triangle filter) and a coarse 80x60
# object-ID render for the visibility rule.
OUT_SIZE = 64
SUPERSAMPLE = 2
VIS_GRID = (60, 80)
FAR = 1e3  # absent objects are parked here: behind the camera, never hit, never shadowing
DEFAULT_BATCH = {"cuda": 1024, "mps": 256, "cpu": 8}


# ---------------------------------------------------------------- specs and scenes
def make_spec(n_scenes, objects=3, min_objects=1, seed=0, prefix=dataloader.SYN_PREFIX):
    """{file name: labels}: scene s draws `objects` distinct classes (uniform, seeded) and saves
    images f"{prefix}{s:06d}_{k}.png" for k = min_objects-1 .. objects-1 with the first k+1."""
    if not 1 <= min_objects <= objects <= MAX_OBJECTS:
        raise DataError(f"objects={objects}, min_objects={min_objects}: expected "
                        f"1 <= min_objects <= objects <= {MAX_OBJECTS}")
    if n_scenes < 1:
        raise DataError(f"scenes={n_scenes}: expected at least 1 scene")
    rng = np.random.default_rng(seed)
    spec = {}
    for s in range(n_scenes):
        classes = np.argsort(rng.random(dataloader.NUM_CLASSES))[:objects]  # uniform, distinct
        for k in range(min_objects - 1, objects):
            spec[f"{prefix}{s:06d}_{k}.png"] = [dataloader.LABELS[c] for c in classes[:k + 1]]
    return spec


def plan_images(items):
    """(name, labels) pairs or a spec dict -> (scene keys, scene object lists, per image
    (scene index, object count)). A scene is a name without its trailing _<step>.png; its
    objects are the labels of its largest step and every other step must show a prefix."""
    items = list(items.items()) if isinstance(items, dict) else list(items)
    scene_of, keys, objects, best, best_name = {}, [], [], [], []
    for name, labels in items:
        dataloader.check_labels(labels, f"spec[{name!r}]")
        if len(labels) > MAX_OBJECTS:
            raise DataError(f"spec[{name!r}]: {len(labels)} objects (at most {MAX_OBJECTS})")
        m = dataloader.STEP_NAME.match(name)
        key, step = (m[1], int(m[2])) if m else (name, -1)
        s = scene_of.get(key)
        if s is None:
            scene_of[key] = len(keys)
            keys.append(key)
            objects.append(list(labels))
            best.append(step)
            best_name.append(name)
        elif step > best[s]:
            objects[s], best[s], best_name[s] = list(labels), step, name
    images = []
    for name, labels in items:
        m = dataloader.STEP_NAME.match(name)
        s = scene_of[m[1] if m else name]
        if list(labels) != objects[s][:len(labels)]:
            raise DataError(f"spec[{name!r}]: labels {labels} are not a prefix of "
                            f"{objects[s]} of {best_name[s]!r}, the scene's largest step (the "
                            "steps of one scene add objects in order)")
        images.append((s, len(labels)))
    return keys, objects, images


@dataclass
class Scenes:
    """Placed scenes as numpy arrays; slots beyond a scene's objects have shape -1."""
    cam: np.ndarray     # (S, 3) camera position
    lights: np.ndarray  # (S, 3, 3) area light positions
    xy: np.ndarray      # (S, K, 2) object positions
    angle: np.ndarray   # (S, K) rotation about z
    shape: np.ndarray   # (S, K) shape index or -1
    color: np.ndarray   # (S, K) color index

    def take(self, idx, counts):
        """Scenes idx, showing only the first counts[i] objects of each (and no more slots
        than the largest count, so that no time goes into absent objects)."""
        k = int(np.max(counts))
        sub = Scenes(self.cam[idx], self.lights[idx], self.xy[idx, :k], self.angle[idx, :k],
                     self.shape[idx, :k].copy(), self.color[idx, :k])
        sub.shape[np.arange(k) >= np.asarray(counts)[:, None]] = -1
        return sub


def scene_rng(seed, key):
    """The scene's own generator: depends on (seed, key) only (sha256, not Python's hash)."""
    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _place(rngs, sc, radius, k, todo, tries):
    """Draw object k of the scenes todo by CLEVR's rejection rules: a gap of MIN_GAP to every
    object, no near-alignment (within MARGIN) along the camera's left/right/front/behind. Each
    scene draws blocks of 64 candidates from its own generator until one is valid (the first
    valid one wins: plain rejection sampling, batched over scenes); after every 16 fruitless
    blocks its minimum gap shrinks, so crowded scenes still finish."""
    while len(todo):
        u = np.stack([rngs[s].random((64, 3)) for s in todo])  # (T, 64, 3)
        cand = u[..., :2] * (2 * PLACE_RANGE) - PLACE_RANGE
        dx = cand[..., 0, None] - sc.xy[todo, None, :k, 0]  # (T, 64, k)
        dy = cand[..., 1, None] - sc.xy[todo, None, :k, 1]
        gap = np.sqrt(dx * dx + dy * dy) - radius[todo, k, None, None] - radius[todo, None, :k]
        ok = (gap >= (MIN_GAP * 0.8 ** (tries[todo] // 16))[:, None, None]).all(2)
        cam = sc.cam[todo, :2] / np.sqrt((sc.cam[todo, :2] ** 2).sum(1, keepdims=True))
        bx, by = -cam[:, 0, None, None], -cam[:, 1, None, None]  # "behind"; right = (by, -bx)
        for m in (np.abs(dx * by - dy * bx), np.abs(dx * bx + dy * by)):
            ok &= ~((m > 0) & (m < MARGIN)).any(2)
        tries[todo] += 1
        found, first = ok.any(1), ok.argmax(1)
        done, pick = todo[found], first[found]
        sc.xy[done, k] = cand[found, pick]
        sc.angle[done, k] = u[found, pick, 2] * (2 * math.pi)
        todo = todo[~found]
        if len(todo) and tries[todo].max() > 1000:
            raise RuntimeError("object placement failed after 64,000 draws")


def sample_scenes(keys, objects, seed=0, device="cpu", chunk=None, progress=False):
    """Place every scene: camera and light jitter, then objects one at a time (the first at
    the origin), each redrawn until every object so far keeps MIN_VISIBLE of the image (by
    coarse ID renders of `chunk` scenes at a time)."""
    n, k_max = len(keys), max(len(o) for o in objects)
    sc = Scenes(np.zeros((n, 3)), np.zeros((n, 3, 3)), np.zeros((n, k_max, 2)),
                np.zeros((n, k_max)), np.full((n, k_max), -1), np.zeros((n, k_max), int))
    rngs = [scene_rng(seed, key) for key in keys]
    for s, (rng, objs) in enumerate(zip(rngs, objects)):
        u = rng.random(13)
        sc.cam[s] = CAMERA + (2 * u[:3] - 1) * CAMERA_JITTER
        sc.lights[s] = LIGHT_POS + (2 * u[3:12].reshape(3, 3) - 1) * LIGHT_JITTER
        sc.angle[s, 0] = u[12] * 2 * math.pi
        cls = np.array([dataloader.OBJECTS[label] for label in objs])
        sc.shape[s, :len(objs)], sc.color[s, :len(objs)] = cls // 8, cls % 8
    radius = np.where(sc.shape >= 0, SHAPE_TABLE[sc.shape, SHAPE_KEYS.index("radius")], 0.0)
    device = torch.device(device)
    chunk = chunk or 4 * DEFAULT_BATCH.get(device.type, 8)
    bar = tqdm(total=sum(len(o) - 1 for o in objects), desc="placing objects", unit="obj",
               disable=not progress, mininterval=1.0, leave=False)
    with _workers(device) as pmap:
        for k in range(1, k_max):
            todo = np.array([s for s in range(n) if len(objects[s]) > k], dtype=int)
            tries = np.zeros(n, dtype=int)
            while len(todo):
                _place(rngs, sc, radius, k, todo, tries)
                parts = [sc.take(part, np.full(len(part), k + 1))
                         for part in np.array_split(todo, -(-len(todo) // chunk))]
                ok = np.concatenate([(f >= MIN_VISIBLE).all(1) for f in
                                     pmap(lambda part: visible_fraction(part, device), parts)])
                bar.update(int(ok.sum()))
                todo = todo[~ok]
    bar.close()
    return sc


# ---------------------------------------------------------------- layouts
def project_objects(sc, size=OUT_SIZE):
    """Where each object slot lands in the size x size image (the 4:3 view squashed to 1:1):
    centre (x, y) in pixels from the top-left corner (pixel i spans [i, i + 1)), apparent radius
    (rx, ry) in pixels of a sphere of SIZE at the object's distance (the same for every shape,
    so labels can be reassigned to a layout), and depth (distance to the camera). Returns
    (S, K, 5) float arrays; slots without an object hold NaN."""
    cam = sc.cam
    fwd = -cam / np.linalg.norm(cam, axis=1, keepdims=True)
    right = np.stack([fwd[:, 1], -fwd[:, 0], np.zeros(len(cam))], 1)
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    up = np.cross(right, fwd)
    hz = np.where(sc.shape >= 0, SHAPE_TABLE[sc.shape, SHAPE_KEYS.index("hz")], np.nan)
    rel = np.concatenate([sc.xy, hz[..., None]], 2) - cam[:, None]  # (S, K, 3)
    depth = (rel * fwd[:, None]).sum(2)
    u = (rel * right[:, None]).sum(2) / depth / TAN_FOV[0]
    v = (rel * up[:, None]).sum(2) / depth / TAN_FOV[1]
    half = size / 2
    x, y = (u + 1) * half, (1 - v) * half
    rx, ry = (SIZE / depth / t * half for t in TAN_FOV)
    return np.stack([x, y, rx, ry, np.linalg.norm(rel, axis=2)], 2)


def moved_cameras(keys, images, seed):
    """(N, 3) camera positions, one per image, for renders whose camera moves between the steps
    of a scene (--camera-moves): each step's camera is jittered afresh from its own (seed, scene,
    step) generator; the placement keeps the scene's camera."""
    return np.stack([CAMERA + (2 * scene_rng(seed, f"{keys[s]}\0step{count}").random(3) - 1)
                     * MOVE_JITTER for s, count in images])


def image_scenes(sc, images, cams, lo, hi):
    """Scenes of images[lo:hi] ((scene, object count) pairs), through cams[lo:hi] if given."""
    scene_idx, counts = np.array(images[lo:hi]).T
    sub = sc.take(scene_idx, counts)
    if cams is not None:
        sub.cam = cams[lo:hi]
    return sub


def spec_layouts(spec, seed=0, device="auto", camera_moves=False):
    """{image name: [{"label", "x", "y", "rx", "ry", "depth"}, ...]} for every image of a spec,
    objects in the spec's label order, from the same placement as render_spec (no shading)."""
    items = list(spec.items()) if isinstance(spec, dict) else list(spec)
    keys, objects, images = plan_images(items)
    sc = sample_scenes(keys, objects, seed, dataloader.resolve_device(device))
    cams = moved_cameras(keys, images, seed) if camera_moves else None
    geo = np.round(project_objects(image_scenes(sc, images, cams, 0, len(images))), 2)
    out = {}
    for i, (name, labels) in enumerate(items):
        out[name] = [dict(label=label, **dict(zip(("x", "y", "rx", "ry", "depth"),
                                                  map(float, geo[i, k]))))
                     for k, label in enumerate(labels)]
    return out


def write_layouts(spec, path, seed=0, device="auto", camera_moves=False):
    """The layout file of a spec's renders (format: docs/layouts.md)."""
    data = {"format": dataloader.LAYOUT_FORMAT, "image_size": OUT_SIZE, "seed": seed,
            "layouts": spec_layouts(spec, seed, device, camera_moves)}
    dataloader.write_json(path, {**data, "camera_moves": True} if camera_moves else data,
                          indent=None)
    return path


# ---------------------------------------------------------------- ray casting
def _dot(a, b):
    # explicit sums (not .sum()) keep every result independent of the batch shape
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _normalize(v):
    return v / torch.sqrt(_dot(v, v) + 1e-20)


class _Batch:
    """One batch of scenes as float32 tensors shaped to broadcast over rays: per-object values
    (B, K), vectors with a leading axis of 3, per-scene ones (B, 1)."""

    def __init__(self, sc, device):
        def t(a):
            return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)

        cam = sc.cam
        fwd = -cam / np.linalg.norm(cam, axis=1, keepdims=True)
        right = np.stack([fwd[:, 1], -fwd[:, 0], np.zeros(len(cam))], 1)
        right /= np.linalg.norm(right, axis=1, keepdims=True)
        up = np.cross(right, fwd)
        self.o, self.fwd, self.right, self.up = (t(v.T[:, :, None]) for v in (cam, fwd, right, up))
        present = sc.shape >= 0
        self.shape = torch.as_tensor(np.where(present, sc.shape, SPHERE), device=device)
        geo = SHAPE_TABLE[np.where(present, sc.shape, SPHERE)]  # (B, K, len(SHAPE_KEYS))
        for i, key in enumerate(SHAPE_KEYS[:-1]):
            setattr(self, key, t(geo[..., i]))
        xy = np.where(present[..., None], sc.xy, [FAR, -FAR])
        self.k = sc.shape.shape[1]
        self.cx, self.cy = t(xy[..., 0]), t(xy[..., 1])
        # libm per element: numpy's vectorised sin/cos may round differently by array length
        self.cos, self.sin = (t(np.frompyfunc(f, 1, 1)(sc.angle).astype(float))
                              for f in (math.cos, math.sin))
        self.albedo = t(ALBEDO[sc.color].transpose(2, 0, 1))  # (3, B, K)
        self.lights = t(sc.lights.transpose(2, 1, 0)[..., None])  # (3, L, B, 1)
        self.aim = t((sc.lights / np.linalg.norm(sc.lights, axis=2, keepdims=True))
                     .transpose(2, 1, 0)[..., None])  # area lights face the origin
        self.tints = [t(tint)[:, None, None] for _, _, tint, _ in LIGHTS]
        self.sun = t(SUN_DIR)[:, None, None]
        self.device = device

    def obj(self, k):
        """Object slot k's centre and rotation, each (B, 1)."""
        return (self.cx[:, k:k + 1], self.cy[:, k:k + 1], self.hz[:, k:k + 1],
                self.cos[:, k:k + 1], self.sin[:, k:k + 1])


def _rays(b, grid):
    """Unit ray directions (3, B, H*W) through the centres of an HxW grid over the 4:3 view."""
    h, w = grid
    ar = lambda n: torch.arange(n, device=b.device, dtype=torch.float32) + 0.5  # noqa: E731
    u = (ar(w) * (2.0 / w) - 1) * TAN_FOV[0]
    v = (1 - ar(h) * (2.0 / h)) * TAN_FOV[1]
    u, v = u.repeat(h)[None], v.repeat_interleave(w)[None]  # (1, H*W), row-major
    return _normalize(b.fwd + u * b.right + v * b.up)


def _hit_objects(b, d):
    """Nearest object along each ray: (t (B, N), inf where none; slot index (B, N))."""
    o = b.o
    inf = torch.tensor(float("inf"), device=b.device)
    dxy2 = d[0] * d[0] + d[1] * d[1]
    t_floor = -o[2] / d[2]  # the horizontal planes the shapes share
    t_cube_top = (2 * CUBE_HALF - o[2]) / d[2]
    t_top = (2 * SIZE - o[2]) / d[2]
    ts = []
    for k in range(b.k):
        cx, cy, cz, cs, sn = b.obj(k)
        shape = b.shape[:, k:k + 1]
        ox, oy, oz = o[0] - cx, o[1] - cy, o[2] - cz
        bxy = ox * d[0] + oy * d[1]
        c0 = ox * ox + oy * oy - SIZE * SIZE
        # sphere
        bs = bxy + oz * d[2]
        disc = bs * bs - (c0 + oz * oz)
        t_s = torch.where(disc > 0, -bs - torch.sqrt(disc.clamp_min(0)), inf)
        # cylinder: side, else top cap
        disc = bxy * bxy - dxy2 * c0
        t_side = (-bxy - torch.sqrt(disc.clamp_min(0))) / dxy2
        z = o[2] + t_side * d[2]
        px, py = ox + t_top * d[0], oy + t_top * d[1]
        t_c = torch.where((disc > 0) & (z >= 0) & (z <= 2 * SIZE), t_side,
                          torch.where(px * px + py * py <= SIZE * SIZE, t_top, inf))
        # cube: slabs in the object's rotated frame
        lox, loy = cs * ox + sn * oy, cs * oy - sn * ox
        ldx, ldy = cs * d[0] + sn * d[1], cs * d[1] - sn * d[0]
        tx1, tx2 = (-CUBE_HALF - lox) / ldx, (CUBE_HALF - lox) / ldx
        ty1, ty2 = (-CUBE_HALF - loy) / ldy, (CUBE_HALF - loy) / ldy
        t_near = torch.maximum(torch.maximum(torch.minimum(tx1, tx2), torch.minimum(ty1, ty2)),
                               torch.minimum(t_floor, t_cube_top))
        t_far = torch.minimum(torch.minimum(torch.maximum(tx1, tx2), torch.maximum(ty1, ty2)),
                              torch.maximum(t_floor, t_cube_top))
        t_b = torch.where(t_near < t_far, t_near, inf)
        t = torch.where(shape == SPHERE, t_s, torch.where(shape == CYLINDER, t_c, t_b))
        ts.append(torch.where(t > 0, t, inf))
    return torch.stack(ts).min(0)


def _hit_backdrop(b, d):
    """Ray vs floor + quarter-cylinder sweep + wall: (t (B, N), normal (3, B, N))."""
    o = b.o
    bd = torch.tensor(BACKDROP_DIR, dtype=torch.float32, device=b.device)[:, None, None]
    s0, r = BACKDROP_S0, BACKDROP_R
    so, sd = _dot(o, bd), _dot(d, bd)  # coordinates along the backdrop direction
    t_floor = torch.where(d[2] < 0, -o[2] / d[2], float("inf"))
    on_floor = so + t_floor * sd <= s0
    # sweep: circle of radius r around (s0, r) in the (s, z) plane, its lower-back quarter
    ps, pz = so - s0, o[2] - r
    a = sd * sd + d[2] * d[2]
    bq = ps * sd + pz * d[2]
    disc = bq * bq - a * (ps * ps + pz * pz - r * r)
    t_c = (-bq + torch.sqrt(disc.clamp_min(0))) / a  # far root: the inside of the sweep
    s_c, z_c = so + t_c * sd, o[2] + t_c * d[2]
    on_curve = (disc > 0) & (s_c >= s0) & (z_c <= r)
    t = torch.where(on_floor, t_floor, torch.where(on_curve, t_c, (s0 + r - so) / sd))
    # normals: up on the floor, towards the sweep's axis on the curve, to the camera on the wall
    ns = torch.where(on_floor, 0.0, torch.where(on_curve, (s0 - s_c) / r, -1.0))
    nz = torch.where(on_floor, 1.0, torch.where(on_curve, (r - z_c) / r, 0.0))
    return t, torch.stack([ns * bd[0], ns * bd[1], nz])


@torch.inference_mode()
def visible_fraction(sc, device="cpu"):
    """Share of the image each object slot covers (S, K), from a coarse ID render."""
    b = _Batch(sc, torch.device(device))
    d = _rays(b, VIS_GRID)
    t_obj, slot = _hit_objects(b, d)
    slot = torch.where(t_obj < _hit_backdrop(b, d)[0], slot, b.k)
    counts = torch.zeros(slot.shape[0], b.k + 1, device=b.device, dtype=torch.int64)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    return counts[:, :b.k].cpu().numpy() / slot.shape[1]


def _visibility(b, m, l, half_angle, self_slot):
    """Soft visibility of a light in direction l (unit) from the points whose offsets to each
    object's centre are m[k]: a product over objects of a ramp of the distance between the
    shadow ray's closest approach to the centre and a rounded vertical cylinder standing in for
    the object (a cube by its area-equivalent cylinder), over a penumbra that widens with the
    distance travelled."""
    vis = None
    for k, (mx, my, mz) in enumerate(m):
        ts = (mx * l[0] + my * l[1] + mz * l[2]).clamp_min(0)
        qx, qy, qz = ts * l[0] - mx, ts * l[1] - my, ts * l[2] - mz
        u = torch.sqrt(qx * qx + qy * qy) - b.sa[:, k:k + 1]
        w = qz.abs() - b.sb[:, k:k + 1]
        uc, wc = u.clamp_min(0), w.clamp_min(0)
        sd = torch.sqrt(uc * uc + wc * wc) + torch.maximum(u, w).clamp_max(0) - b.sr[:, k:k + 1]
        x = (sd / (ts * (2 * half_angle) + 2 * PENUMBRA_MIN) + 0.5).clamp(0, 1)
        v = torch.where(self_slot == k, 1.0, x * x * (3 - 2 * x))
        vis = v if vis is None else vis * v
    return vis


_SRGB_LUT = {}


def _srgb(x):
    """Linear [0, 1] -> sRGB [0, 255] through a table indexed by sqrt(x): exact and
    batch-independent (torch's pow may round differently in its vector and scalar paths)."""
    n = 16384
    if x.device not in _SRGB_LUT:
        lin = (np.arange(n) / (n - 1)) ** 2
        enc = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
        _SRGB_LUT[x.device] = torch.tensor(enc * 255, dtype=torch.float32, device=x.device)
    return _SRGB_LUT[x.device][(torch.sqrt(x.clamp(0, 1)) * (n - 1) + 0.5).long()]


def _downsample(img):
    """(B, 3, 2H, 2W) -> (B, 3, H, W) with weights [1, 3, 3, 1] / 8 per axis: PIL's bilinear
    (triangle) filter for a 2x reduction, edges replicated. Explicit slices, no conv kernels."""
    x = torch.cat([img[..., :1], img, img[..., -1:]], 3)
    x = (x[..., 0:-3:2] + 3 * x[..., 1:-2:2] + 3 * x[..., 2:-1:2] + x[..., 3::2]) * 0.125
    x = torch.cat([x[..., :1, :], x, x[..., -1:, :]], 2)
    return (x[..., 0:-3:2, :] + 3 * x[..., 1:-2:2, :] + 3 * x[..., 2:-1:2, :]
            + x[..., 3::2, :]) * 0.125


@torch.inference_mode()
def shade(sc, device="cpu", grid=(240, 320)):
    """Cast an HxW grid of rays over each scene's 4:3 view -> sRGB float (S, 3, H, W)."""
    b = _Batch(sc, torch.device(device))
    d = _rays(b, grid)
    t_obj, slot = _hit_objects(b, d)
    t_bg, n_bg = _hit_backdrop(b, d)
    is_obj = t_obj < t_bg
    p = b.o + torch.where(is_obj, t_obj, t_bg) * d
    self_slot = torch.where(is_obj, slot, -1)

    # object normals from the rounded extrusion around the hit point (bevels, soft rims)
    def g(a):
        return torch.gather(a, 1, slot)

    cs, sn = g(b.cos), g(b.sin)
    qx, qy, qz = p[0] - g(b.cx), p[1] - g(b.cy), p[2] - g(b.hz)
    lx, ly = cs * qx + sn * qy, cs * qy - sn * qx
    bxy = g(b.bxy)
    wx = torch.sign(lx) * (lx.abs() - bxy).clamp_min(0)
    wy = torch.sign(ly) * (ly.abs() - bxy).clamp_min(0)
    rr = torch.sqrt(wx * wx + wy * wy)
    scale = (rr - g(b.rxy)).clamp_min(0) / (rr + 1e-12)
    wx, wy = wx * scale, wy * scale
    wz = torch.sign(qz) * (qz.abs() - g(b.bz)).clamp_min(0)
    n_obj = _normalize(torch.stack([cs * wx - sn * wy, sn * wx + cs * wy, wz]))
    n = torch.where(is_obj, n_obj, n_bg)
    albedo = torch.where(is_obj, torch.stack([g(a) for a in b.albedo]), FLOOR_ALBEDO)

    m = [(cx - p[0], cy - p[1], cz - p[2]) for cx, cy, cz, _, _ in map(b.obj, range(b.k))]
    irr = 0
    for i, (_, strength, _, side) in enumerate(LIGHTS):
        # area light aimed at the origin: Lambertian emitter, inverse-square falloff
        lv = b.lights[:, i] - p
        dist2 = _dot(lv, lv)
        dist = torch.sqrt(dist2)
        l = lv / dist
        e = _dot(n, l).clamp_min(0) * _dot(l, b.aim[:, i]).clamp_min(0) / dist2
        e = e * _visibility(b, m, l, (0.5 * LIGHT_SOFTNESS * side) / dist, self_slot)
        irr = irr + b.tints[i] * (e * (strength / math.pi))
    e = _dot(n, b.sun).clamp_min(0) * (SUN_GAIN * SUN_STRENGTH)
    irr = irr + e * _visibility(b, m, b.sun, SUN_HALF_ANGLE, self_slot)
    # indirect light: the lit floor seen by downward-facing object surfaces; "rubber" adds a
    # faint white reflection of the direct light that grows towards grazing angles (Schlick)
    c = 1 - _dot(n, d).neg().clamp(0, 1)
    c2 = c * c
    gloss = torch.where(is_obj, SPECULAR * (0.04 + 0.96 * c2 * c2 * c), 0.0)
    bounce = torch.where(is_obj, (0.5 * BOUNCE_OBJECT) * (1 - n[2]), 0.0)
    radiance = (albedo + gloss) * (irr * (1 / math.pi)) + albedo * bounce
    return _srgb(radiance * EXPOSURE).view(3, len(sc.cam), *grid).transpose(0, 1)


@torch.inference_mode()
def render_scenes(sc, device="cpu", size=OUT_SIZE):
    """Render placed scenes (Scenes, shape -1 = absent) -> uint8 (S, 3, size, size)."""
    img = shade(sc, device, (size * SUPERSAMPLE, size * SUPERSAMPLE))
    return _downsample(img).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- public entry points
@contextlib.contextmanager
def _workers(device):
    """A map over batches. On the CPU, one Python thread per torch thread, each running
    single-threaded ops (torch releases the GIL inside them): torch's own intra-op threads
    wait for each other at every op, which collapses when another process holds a core."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield map
        return
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(threads)
    try:
        yield pool.map
    finally:
        pool.shutdown(cancel_futures=True)  # an interrupted run drops its queued batches
        torch.set_num_threads(threads)


def _render_images(items, seed, device, batch_size, progress, camera_moves=False):
    """Yield (first index, uint8 batch on device) over every (name, labels) of items."""
    keys, objects, images = plan_images(items)
    device = dataloader.resolve_device(device)
    bs = batch_size or DEFAULT_BATCH.get(device.type, 8)
    sc = sample_scenes(keys, objects, seed, device, progress=progress)
    cams = moved_cameras(keys, images, seed) if camera_moves else None
    with _workers(device) as pmap:
        starts = range(0, len(images), bs)
        batches = pmap(lambda i: render_scenes(image_scenes(sc, images, cams, i, i + bs),
                                               device), starts)
        with tqdm(total=len(images), desc="rendering", unit="img", disable=not progress,
                  mininterval=1.0) as bar:
            for i, imgs in zip(starts, batches):
                yield i, imgs
                bar.update(len(imgs))


def render_tensor(items, seed=0, device="auto", batch_size=None, progress=False,
                  camera_moves=False):
    """Render (name, labels) pairs or a spec dict -> uint8 tensor (N, 3, 64, 64) on device."""
    items = list(items.items()) if isinstance(items, dict) else list(items)
    out = torch.empty(len(items), 3, OUT_SIZE, OUT_SIZE, dtype=torch.uint8,
                      device=dataloader.resolve_device(device))
    if items:
        for i, imgs in _render_images(items, seed, device, batch_size, progress,
                                      camera_moves):
            out[i:i + len(imgs)] = imgs
    return out


def _write_png(path, chw):
    """uint8 (3, H, W) CPU tensor -> PNG, written to a temporary name and renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(chw.permute(1, 2, 0).numpy()).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def render_spec(spec, out_dir, seed=0, device="auto", batch_size=None, progress=True,
                camera_moves=False):
    """Write a 64x64 PNG for every spec entry into out_dir, skipping files that exist.
    Returns the number of images rendered."""
    out_dir = Path(out_dir)
    plan_images(spec)  # validate the whole spec, not only its missing part
    todo = [(n, labels) for n, labels in spec.items() if not (out_dir / n).is_file()]
    if not todo:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    # PNG encoding (zlib) releases the GIL: a few writer threads keep up with a GPU renderer
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, imgs in _render_images(todo, seed, device, batch_size, progress, camera_moves):
            list(pool.map(_write_png, [out_dir / todo[i + k][0] for k in range(len(imgs))],
                          imgs.cpu()))
    return len(todo)


def ensure_images(root, spec, spec_path, device="auto"):
    """Render the missing images of a spec under root when they are the project's own
    (synthetic names); missing real ones (the lab's) are only reported, since nothing can be
    downloaded."""
    missing = dataloader.missing_images(root, list(spec))
    if missing and all(dataloader.is_synthetic_name(n) for n in missing):
        print(f"rendering {len(missing)} missing images of {dataloader._rel(spec_path)} into "
              f"{dataloader._rel(root)}")
        render_spec({n: spec[n] for n in missing}, root, device=device)
    dataloader.check_images(root, spec, spec_path)


def ensure_layouts(spec, spec_path, root, seed=0, device="auto"):
    """The layout file of a spec's renders under root (the project's own images); written from
    the renderer's placement (no shading) when missing. Other images: estimate_layouts.py."""
    path = dataloader.layout_path(root, spec_path)
    if path.is_file():
        return path
    print(f"writing the layouts of {len(spec)} images to {dataloader._rel(path)}")
    return write_layouts(spec, path, seed, device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n" + __doc__.split("\n\n")[2])
    ap.add_argument("--spec", type=Path,
                    help="spec JSON {file name: labels} to render (default: train.json)")
    ap.add_argument("--out", type=Path, help="output folder for --spec (default "
                    "data/iclevr_syn), PNG file for --labels (default outputs/render.png)")
    ap.add_argument("--make-spec", type=Path, metavar="FILE", help="write a new spec JSON")
    ap.add_argument("--scenes", type=int, default=6003, help="--make-spec: number of scenes")
    ap.add_argument("--objects", type=int, default=3, help="--make-spec: objects per scene")
    ap.add_argument("--min-objects", type=int, default=1,
                    help="--make-spec: objects in a scene's first saved image")
    ap.add_argument("--prefix", default=dataloader.SYN_PREFIX, help="--make-spec: name prefix")
    ap.add_argument("--labels", help='render one image, e.g. "red sphere, cyan cube"')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    ap.add_argument("--camera-moves", action="store_true",
                    help="--spec: move the camera between the steps of a scene (a test of "
                         "estimate_layouts.py's fallback; the lab's data keeps it still)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per batch (default: 8 on a CPU, 1024 on a GPU)")
    args = ap.parse_args()
    if sum(x is not None for x in (args.spec, args.make_spec, args.labels)) > 1:
        ap.error("give at most one of --spec, --make-spec, --labels")
    if args.make_spec:
        spec = make_spec(args.scenes, args.objects, args.min_objects, args.seed, args.prefix)
        args.make_spec.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.make_spec.with_name(f".{args.make_spec.name}.tmp")
        lines = (f"{json.dumps(n)}: {json.dumps(labels)}" for n, labels in spec.items())
        tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one image per line
        os.replace(tmp, args.make_spec)
        print(f"wrote {len(spec)} images of {args.scenes} scenes to {args.make_spec}")
    elif args.labels:
        labels = dataloader.parse_labels(args.labels)
        out = args.out or dataloader.ROOT / "outputs" / "render.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_png(out, render_tensor([(out.name, labels)], args.seed, args.device)[0].cpu())
        print(f"wrote {out}")
    else:
        out = args.out or dataloader.DATA_ROOT
        spec = dataloader.load_spec(args.spec or dataloader.TRAIN_JSON)
        n = render_spec(spec, out, args.seed, args.device, args.batch_size,
                        camera_moves=args.camera_moves)
        print(f"rendered {n} of {len(spec)} images into {out} ({len(spec) - n} already there)")
        layouts = dataloader.layout_path(out, args.spec or dataloader.TRAIN_JSON)
        print(f"wrote {write_layouts(spec, layouts, args.seed, args.device, args.camera_moves)}")


if __name__ == "__main__":
    dataloader.run_cli(main)
