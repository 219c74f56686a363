"""bench/tables.py: README's tables come from the results files (CPU, no GPU results needed)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import tables  # noqa: E402


def test_speedrun_table_quotes_the_results_file(capsys):
    tables.speedrun_table()
    out = capsys.readouterr().out
    r = json.loads((ROOT / "results" / "speedrun-h200.json").read_text())
    assert (f"| {r['device']} | {r['train_minutes']} min, {r['steps']} steps | "
            f"{r['train_images_per_s']:.0f} |") in out
    assert f"{r['accuracy_mean']['test']:.4f} ± {r['accuracy_std']['test']:.4f}" in out
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "tables.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and out in p.stdout, p.stderr  # the script prints the same table


def test_ablation_table_and_curves(tmp_path, monkeypatch, capsys):
    base = json.loads((ROOT / "results" / "speedrun-h200.json").read_text())
    base["misses_all_seeds"] = {"test": {"missed": 5, "wrong_shape": 2, "wrong_color": 1,
                                         "neither": 2},
                                "new_test": {"missed": 3, "wrong_shape": 1, "wrong_color": 0,
                                             "neither": 2}}
    runs = {"base": {}, "b128": {"batch_size": 128}, "fgw": {"fg_weight": 10.0}}
    for name, change in runs.items():
        r = {**base, "train_config": {**base["train_config"], **change},
             "learning_curve": [{"step": 500, "train_minutes": 0.3, "val_accuracy": 0.2},
                                {"step": 1000, "train_minutes": 0.6, "val_accuracy": 0.4}]}
        (tmp_path / f"speedrun-h200-short-{name}.json").write_text(json.dumps(r))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    tables.ablation_table()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    # "base" is the reference and comes first, though "b128" sorts before it
    assert [row.split(" | ")[0] for row in rows] == ["| base", "| b128", "| fgw"]
    assert [row.split(" | ")[1] for row in rows] == ["(reference)", "batch 128",
                                                     "object weight 10.0"]
    assert all(" | 3 / 1 / 4 | 0.20@500 0.40@1000 | " in row for row in rows)
    png = tables.plot_curves(tmp_path / "curves.png")
    assert png.stat().st_size > 5000
