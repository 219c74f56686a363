"""Condition sets beyond the two benchmark files, made once with a fixed seed and committed
under bench/conditions/ (the format of test.json: one label list per condition):

    unseen       2-3 distinct objects whose set no training image shows (train.json) and no
                 benchmark file asks for (every pair of classes is in train.json, so these are
                 all 3-object sets)
    four         4 distinct objects (the training images hold at most 3)
    same_color   2 or 3 objects sharing a color (half each), plus one other object for the 2s
                 half the time
    same_shape   2 objects sharing a shape in different colors, plus one other object half the
                 time

    python bench/make_condition_sets.py            # rewrites bench/conditions/*.json

Classes are distinct within a condition, as in i-CLEVR; bench/bench_conditions.py scores them.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataloader as dl  # noqa: E402

OUT = dl.ROOT / "bench" / "conditions"
N = 64  # conditions per set, as many as test.json
SEED = 2026


def unseen(rng, seen):
    k = int(rng.integers(2, 4))
    c = [dl.LABELS[i] for i in rng.choice(dl.NUM_CLASSES, k, replace=False)]
    return c if frozenset(c) not in seen else None


def four(rng, seen):
    return [dl.LABELS[i] for i in rng.choice(dl.NUM_CLASSES, 4, replace=False)]


def same_color(rng, seen):
    color = dl.COLORS[rng.integers(len(dl.COLORS))]
    k = int(rng.integers(2, 4))
    c = [f"{color} {s}" for s in rng.choice(dl.SHAPES, k, replace=False)]
    if k == 2 and rng.random() < 0.5:  # one object of another color beside the pair
        c.append(f"{rng.choice([x for x in dl.COLORS if x != color])} {rng.choice(dl.SHAPES)}")
    return c


def same_shape(rng, seen):
    shape = dl.SHAPES[rng.integers(len(dl.SHAPES))]
    c = [f"{x} {shape}" for x in rng.choice(dl.COLORS, 2, replace=False)]
    if rng.random() < 0.5:  # a third object, of another shape
        c.append(f"{rng.choice([x for x in dl.COLORS])} "
                 f"{rng.choice([s for s in dl.SHAPES if s != shape])}")
    return c


SETS = {"unseen": unseen, "four": four, "same_color": same_color, "same_shape": same_shape}


def make(seen, n=N, seed=SEED):
    """{set name: n conditions}, each set from its own generator of (seed, set index)."""
    out = {}
    for i, (name, draw) in enumerate(SETS.items()):
        rng, conds, keys = np.random.default_rng([seed, i]), [], set()
        while len(conds) < n:
            c = draw(rng, seen)
            if c is not None and frozenset(c) not in keys:
                keys.add(frozenset(c))
                conds.append([str(x) for x in c])
        out[name] = conds
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    seen = {frozenset(v) for v in dl.load_spec(dl.TRAIN_JSON).values()}
    seen |= {frozenset(c) for p in dl.TEST_JSONS for c in dl.load_conditions(p)}
    for name, conds in make(seen).items():
        dl.write_json(args.out / f"{name}.json", conds, indent=None)
        print(f"{dl._rel(args.out / name)}.json: {len(conds)} conditions")


if __name__ == "__main__":
    dl.run_cli(main)
