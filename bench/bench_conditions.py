"""What a grounded model gets right beyond one accuracy: the benchmark files and the condition sets
of bench/conditions/ (bench/make_condition_sets.py), each scored by the judge for several seeds,
with per set

    accuracy          the lab's rule, mean and std over seeds, and pooled by number of objects
    shape confusion   asked shape -> drawn shape, all seeds pooled: a missed object's drawn
                      shape is that of an object of its color that the judge found but was not
                      asked for ("none" when there is no such object)
    by image row      accuracy of the objects whose layout puts them far from the camera (high
                      in the image), in the middle, or near it (ROW_EDGES)

    python bench/bench_conditions.py                                  # weights/ddpm, 5 seeds
    python bench/bench_conditions.py --checkpoint DIR --tag=-before --sets test new_test

Writes results/conditions-<device><tag>.json.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataloader as dl  # noqa: E402

SETS_DIR = dl.ROOT / "bench" / "conditions"
ROWS = ("far", "middle", "near")
# Object rows (y, pixels of 64) that split far | middle | near. Every i-CLEVR scene's first object
# stands at the origin, about row 29, so the middle bin holds those and the others split on
# either side (training layouts: rows 16-54, a fifth above 26 and a fifth below 34).
ROW_EDGES = (26.0, 34.0)


def condition_files():
    """{name: path}: the two benchmark files, then the committed condition sets."""
    files = {p.stem: p for p in dl.TEST_JSONS}
    files.update({p.stem: p for p in sorted(SETS_DIR.glob("*.json"))})
    return files


def object_records(rows, layouts, edges):
    """(asked label, drawn shape, row bin) per asked object of per_image rows."""
    out = []
    for r, lay in zip(rows, layouts):
        extra = list(r["extra"])
        for label in r["labels"]:
            cls = dl.OBJECTS[label]
            y = float(lay[(lay[:, 0] == cls).nonzero()[0, 0], 2])
            row = ROWS[int(np.searchsorted(edges, y, side="right"))]
            drawn = label.split()[1]
            if label in r["missing"]:
                same = [e for e in extra if e.split()[0] == label.split()[0]]
                drawn = same[0].split()[1] if same else "none"
                if same:
                    extra.remove(same[0])
            out.append((label, drawn, row))
    return out


def summarize(accs, rows, objects):
    """One set's part of the results."""
    from evaluator import by_objects

    shapes = dl.SHAPES + ["none"]
    confusion = {a: {d: 0 for d in shapes} for a in dl.SHAPES}
    by_row = {r: [0, 0] for r in ROWS}
    for label, drawn, row in objects:
        confusion[label.split()[1]][drawn] += 1
        by_row[row][0] += drawn == label.split()[1]
        by_row[row][1] += 1
    return {"accuracy": [round(a, 4) for a in accs],
            "accuracy_mean": round(float(np.mean(accs)), 4),
            "accuracy_std": round(float(np.std(accs)), 4),
            "by_objects": by_objects(rows), "shape_confusion": confusion,
            "by_row": {r: {"correct": c, "total": n, "accuracy": round(c / max(n, 1), 4)}
                       for r, (c, n) in by_row.items()}}


def score_set(net, sched_cfg, judge, conds, seeds, cfg, device, edges):
    import sample
    from evaluator import per_image

    labels = dl.encode_batch(conds)
    accs, rows, objects = [], [], []
    for seed in seeds:
        # what generate would draw
        layouts = sample.prior_layouts(net, labels, seed, order=dl.listed_order(conds))
        images = sample.generate(net, labels, layouts=layouts, seed=seed, device=device,
                                 scheduler_config=sched_cfg, progress=False, **cfg)
        scores = judge.scores(dl.as_png(images))
        accs.append(float(judge.compute_acc(scores, labels)))
        r = per_image(scores, labels)
        rows += r
        objects += object_records(r, layouts, edges)
    return summarize(accs, rows, objects)


def main(argv=None):
    import sample
    from evaluator import by_objects_text, evaluation_model

    files = condition_files()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=dl.ROOT / "weights" / "ddpm")
    ap.add_argument("--sets", nargs="+", default=list(files), choices=list(files))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--label", default=None,
                    help="what the weights are, for the tables (default: the results file "
                         "their sample_config.json names)")
    ap.add_argument("--results-dir", type=Path, default=dl.ROOT / "results")
    args = ap.parse_args(argv)
    device = dl.resolve_device(args.device)
    net, sched_cfg = sample.load_model(args.checkpoint, device)
    if not sample.is_grounded(net):
        raise dl.DataError(f"{dl._rel(args.checkpoint)}: needs a grounded model (layouts)")
    cfg = sample.scored_settings(args.checkpoint)
    judge = evaluation_model(device=device)
    edges = list(ROW_EDGES)
    result = {"device": dl.device_tag(device), "command": dl.command_line(),
              "checkpoint": dl.portable_path(args.checkpoint),
              "label": args.label or "the weights of "
                       f"{sample.sample_config(args.checkpoint).get('speedrun', '?')}",
              "sampling": cfg,
              "seeds": args.seeds, "row_edges_px": edges, "sets": {}}
    path = args.results_dir / f"conditions-{dl.device_tag(device)}{args.tag}.json"
    for name in args.sets:
        t = time.time()
        part = score_set(net, sched_cfg, judge, dl.load_conditions(files[name]), args.seeds,
                         cfg, device, edges)
        result["sets"][name] = {**part, "seconds": round(time.time() - t, 1)}
        print(f"{name:10s} {part['accuracy_mean']:.4f} +- {part['accuracy_std']:.4f} | "
              f"{by_objects_text(part['by_objects'], 4)} | rows " + ", ".join(
                  f"{r} {v['accuracy']:.3f}" for r, v in part["by_row"].items()), flush=True)
        dl.write_json(path, result)
    print(f"wrote {dl._rel(path)}")


if __name__ == "__main__":
    dl.run_cli(main)
