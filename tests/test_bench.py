"""bench/: the tables of README and docs/results.md come from the results files; the wheel
slimmer; the CPU bench."""
import json
import subprocess
import sys
import zipfile

import torch
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
                                         "neither": 2, "more_objects": 4, "fewer_objects": 1},
                                "new_test": {"missed": 3, "wrong_shape": 1, "wrong_color": 0,
                                             "neither": 2, "more_objects": 2,
                                             "fewer_objects": 0}}
    base["accuracy_by_objects_all_seeds"] = {  # pooled over both files: 1: 9/10, 2: 7/20
        "test": {"1": {"correct": 4, "total": 5}, "2": {"correct": 3, "total": 10}},
        "new_test": {"1": {"correct": 5, "total": 5}, "2": {"correct": 4, "total": 10}}}
    runs = {"h200-short-base": ({}, 0.0), "h200-short-b128": ({"batch_size": 128}, 0.05),
            "h200-short-fgw": ({"fg_weight": 10.0}, -0.02), "h100-short-base": ({}, 0.2),
            "h100-short-lr": ({"lr": 1e-3}, 0.1)}
    for name, (change, plus) in runs.items():
        r = {**base, "train_config": {**base["train_config"], **change},
             "device": "NVIDIA " + name[:4].upper(),
             "accuracy_mean": {k: v + plus for k, v in base["accuracy_mean"].items()},
             "learning_curve": [{"step": 500, "train_minutes": 0.3, "val_accuracy": 0.2},
                                {"step": 1000, "train_minutes": 0.6, "val_accuracy": 0.4}]}
        (tmp_path / f"speedrun-{name}.json").write_text(json.dumps(r))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    tables.ablation_table()
    out = capsys.readouterr().out
    # one table per GPU, each against its own "base" run, which comes first (though "b128"
    # sorts before it): runs on different GPUs are never compared
    assert [line for line in out.splitlines() if line.startswith("###")] == [
        "### Ablations on NVIDIA H100: short speedruns (`speedrun.py --short`), 5 seeds each",
        "### Ablations on NVIDIA H200: short speedruns (`speedrun.py --short`), 5 seeds each"]
    rows = [line.split(" | ") for line in out.splitlines()
            if line.startswith("| ") and not line.startswith(("| run", "| ---"))]
    assert [r[:3] for r in rows] == [
        ["| base", "(reference)", "+0.0000"], ["| lr", "lr 0.001", "-0.1000"],
        ["| base", "(reference)", "+0.0000"], ["| b128", "batch 128", "+0.0500"],
        ["| fgw", "object weight 10.0", "-0.0200"]]
    assert all("3 / 1 / 4; 6 / 1" in r and "0.20@500 0.40@1000" in r for r in rows)
    assert all("1: 0.90, 2: 0.35" in r for r in rows)
    # the curves figure: one line per run, labelled with its name and its file's device tag,
    # drawn through its learning curve's (minutes, accuracy) points (the figure is caught
    # before it is closed)
    import matplotlib.pyplot as plt
    from PIL import Image

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    png = tables.plot_curves(tmp_path / "curves.png")
    close(figures[0])  # pyplot's figure list lets go of it; the Axes stay readable
    (ax,) = figures[0].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in ax.get_lines()}
    assert lines == {f"{name.split('-')[-1]} ({name[:4]})": ([0.3, 0.6], [0.2, 0.4])
                     for name in runs}
    with Image.open(png) as im:
        assert im.size == (600, 400)  # what was saved is that 6 x 4 in figure at 100 dpi
    # once a full speedrun says when it ran, its recipe's short run becomes the reference (a
    # file without written_at, like the one-month-old default-preset speedrun, never does)
    newest = {**base, "train_config": {**base["train_config"], "batch_size": 128},
              "written_at": "2026-12-01T10:00:00Z"}
    (tmp_path / "speedrun-h200-6.5min.json").write_text(json.dumps(newest))
    (tmp_path / "speedrun-h200-old.json").write_text(json.dumps(
        {**base, "written_at": "2026-11-01T10:00:00Z"}))
    tables.ablation_table()
    rows = [line.split(" | ")[:3] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| run", "| ---"))]
    assert rows == [
        ["| base", "(reference)", "+0.0000"], ["| lr", "lr 0.001", "-0.1000"],
        ["| b128", "(reference)", "+0.0000"], ["| base", "batch 256", "-0.0500"],
        ["| fgw", "object weight 10.0, batch 256", "-0.0700"]]


def test_guidance_table_quotes_the_results_file(capsys):
    tables.guidance_table()
    out = capsys.readouterr().out
    r = json.loads((ROOT / "results" / "guidance-cpu.json").read_text())
    for name, v in r["settings"].items():
        m = v["misses"]
        assert (f"| {name} | {v['guidance']} | ") in out
        assert (f"| {v['accuracy']:.4f} | {tables.by_objects(v['by_objects'])} | "
                f"{m['more_objects']} | {m['fewer_objects']} |") in out


def test_slim_wheel_drops_pipelines_and_their_record_lines(tmp_path):
    kept = ["diffusers/__init__.py", "diffusers/pipelines/__init__.py",
            "diffusers/pipelines/pipeline_utils.py", "diffusers/models/unets/unet_2d.py"]
    gone = ["diffusers/pipelines/flux/pipeline_flux.py", "diffusers/commands/env.py",
            "diffusers/modular_pipelines/x.py", "diffusers/models/controlnets/c.py"]
    record = "diffusers-0.0.dist-info/RECORD"
    whl = tmp_path / "diffusers-0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name in kept + gone:
            z.writestr(name, "x = 1\n" * 1000)
        z.writestr(record, "".join(f"{n},sha256=abc,6000\n" for n in kept + gone) + f"{record},,\n")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "slim_wheel.py"), str(whl)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    with zipfile.ZipFile(whl) as z:
        assert sorted(z.namelist()) == sorted(kept + [record])
        lines = z.read(record).decode().splitlines()
    assert [line.split(",")[0] for line in lines] == kept + [record]
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "slim_wheel.py"),
                        str(tmp_path / "record")], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "not a wheel" in p.stderr


def test_cpu_sample_bench_untrained_weights_load_like_shipped_ones(tmp_path):
    import bench_cpu_sample
    import sample
    from model import build_model, count_params

    info = bench_cpu_sample.untrained_weights("tiny", tmp_path / "w")
    assert info["preset"] == "tiny" and info["params"] == count_params(build_model("tiny"))
    net, _ = sample.load_model(tmp_path / "w", "cpu")  # what sample.py --checkpoint does
    assert net.config.conditioning == build_model("tiny").config.conditioning
    assert sample.sample_config(tmp_path / "w") == sample.sample_config(ROOT / "weights" / "ddpm")
    # the shipped weights name the results file that scored them (the CPU check's reference)
    ref = json.loads(bench_cpu_sample.shipped_speedrun().read_text())
    assert ref["guidance"] == sample.sample_config(ROOT / "weights" / "ddpm")["guidance"]


def test_results_page_and_readme_table_are_what_tables_py_writes():
    """docs/results.md is written by `python bench/tables.py --write` and README's headline table
    is pasted from its output; after new results land, run it again (this fails until then)."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "tables.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    page = tables.results_page()
    assert (ROOT / "docs" / "results.md").read_text() == page, \
        "docs/results.md is stale: run python bench/tables.py --write"
    assert len([t for t in page.split("\n\n") if t.startswith("| ")]) >= 8
    headline = tables.captured(tables.headline_table).strip()
    assert headline in (ROOT / "README.md").read_text()
    assert p.stdout.rstrip() == (tables.captured(tables.headline_table) + page).rstrip()
    # the headline quotes the shipped model's own results file
    assert json.loads((ROOT / "weights" / "ddpm" / "sample_config.json").read_text())[
        "speedrun"] in headline

def test_condition_sets_are_what_the_script_makes_and_follow_their_rules(tmp_path):
    import dataloader as dl
    import make_condition_sets

    p = subprocess.run([sys.executable, str(ROOT / "bench" / "make_condition_sets.py"), "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    sets = {}
    for name in make_condition_sets.SETS:  # the committed files are the script's, byte for byte
        committed = ROOT / "bench" / "conditions" / f"{name}.json"
        assert committed.read_bytes() == (tmp_path / f"{name}.json").read_bytes(), name
        sets[name] = dl.load_conditions(committed)
    seen = {frozenset(v) for v in dl.load_spec(dl.TRAIN_JSON).values()}
    colors = lambda c: [x.split()[0] for x in c]  # noqa: E731
    shapes = lambda c: [x.split()[1] for x in c]  # noqa: E731
    assert all(len(c) in (2, 3) and frozenset(c) not in seen for c in sets["unseen"])
    assert all(len(set(c)) == 4 for c in sets["four"])
    assert all(max(colors(c).count(x) for x in colors(c)) >= 2 for c in sets["same_color"])
    assert {max(colors(c).count(x) for x in colors(c)) for c in sets["same_color"]} == {2, 3}
    assert all(max(shapes(c).count(x) for x in shapes(c)) == 2 for c in sets["same_shape"])
    assert all(len(v) == 64 and len({frozenset(c) for c in v}) == 64 for v in sets.values())


def test_condition_bench_pairs_missed_objects_with_what_was_drawn():
    import bench_conditions

    # image 0: red cube asked, drawn as a red sphere; blue sphere found. Image 1: the far green
    # cylinder missing with nothing of its color found; the near one found.
    rows = [{"labels": ["red cube", "blue sphere"], "missing": ["red cube"],
             "extra": ["red sphere"], "correct": 1, "total": 2},
            {"labels": ["green cylinder", "gray cube"], "missing": ["green cylinder"],
             "extra": ["yellow sphere"], "correct": 1, "total": 2}]
    from dataloader import OBJECTS

    at = lambda label, x, y: [float(OBJECTS[label]), x, y, 3.0, 3.0]  # noqa: E731
    layouts = torch.tensor([[at("red cube", 10, 40), at("blue sphere", 30, 29)],
                            [at("green cylinder", 20, 20), at("gray cube", 40, 36)]])
    recs = bench_conditions.object_records(rows, layouts, list(bench_conditions.ROW_EDGES))
    assert recs == [("red cube", "sphere", "near"), ("blue sphere", "sphere", "middle"),
                    ("green cylinder", "none", "far"), ("gray cube", "cube", "near")]
    part = bench_conditions.summarize([0.5], rows, recs)
    assert part["shape_confusion"]["cube"] == {"cube": 1, "sphere": 1, "cylinder": 0, "none": 0}
    assert part["by_row"]["near"] == {"correct": 1, "total": 2, "accuracy": 0.5}


def test_sampling_bench_rows_are_the_settings_the_images_were_sampled_with(tmp_path):
    import evaluate
    import sample
    from dataloader import as_png, encode_batch, listed_order, validation_conditions
    from evaluator import evaluation_model

    out = tmp_path / "sampling.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_sampling.py"), "--conditions",
                        "2", "--seeds", "1", "--settings", "shipped", "w1.0", "raw weights",
                        "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "skipped 'raw weights': it needs --raw-checkpoint" in p.stdout
    r = json.loads(out.read_text())
    scored = sample.scored_settings(sample.WEIGHTS_DIR)  # what the shipped row must sample with
    assert list(r["settings"]) == ["shipped", "w1.0"]
    shipped, w1 = r["settings"]["shipped"], r["settings"]["w1.0"]
    assert {k: shipped[k] for k in scored} == scored and scored["guidance"] != 1.0
    assert w1["guidance"] == 1.0 and w1["sampler"] == scored["sampler"]
    # the shipped row's FD is that of the images sample.generate makes at the bench's seed
    model, cfg = sample.load_model(sample.WEIGHTS_DIR, torch.device("cpu"))
    conds = validation_conditions(2)
    images = sample.generate(model, encode_batch(conds), seed=10**6, scheduler_config=cfg,
                             order=listed_order(conds), progress=False, **scored)
    judge = evaluation_model(device="cpu")
    fd = evaluate.fd_against_renders(judge, as_png(images), conds)
    assert abs(shipped["fd"] - fd) < 1e-2 and abs(w1["fd"] - fd) > 1e-2
    assert abs(r["fd_floor"] - evaluate.fd_floor(judge, conds, 1)) < 1e-2


def test_judges_bench_names_an_unknown_guidance_judge_in_one_line():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_judges.py"), "--tag", "x",
                        "--guidance-judge", "mixed"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        "error: --guidance-judge: no judge named 'mixed' in --judges (expected one of shipped, "
        "blender)"]


def test_layout_fidelity_bench_moves_labels_to_the_same_positions_in_another_order():
    from bench_layout_fidelity import labels_moved_along

    nan = float("nan")
    lay = torch.tensor([[[1, 32, 29, 3, 4], [9, 50, 40, 4, 5], [17, 10, 35, 3, 4]],
                        [[5, 32, 29, 3, 4], [-1, nan, nan, nan, nan], [-1, nan, nan, nan, nan]]])
    moved = labels_moved_along(lay)
    assert moved[0, :, 0].tolist() == [17, 1, 9]  # the first label now stands second
    assert moved[1, 0, 0] == 5 and torch.equal(moved[..., 1:].nan_to_num(-7),
                                               lay[..., 1:].nan_to_num(-7))
    assert lay[0, 0, 0] == 1  # the input is left as it was


def test_overview_lists_every_lever_file_once_with_its_numbers(capsys):
    tables.overview_table()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    for path in sorted((ROOT / "results").glob("sampling-*.json")):
        r = json.loads(path.read_text())
        for name, v in r["settings"].items():
            want = f"| sampling: {name}; labels take the prior's positions in " \
                   f"{v.get('order', 'random')} order |"
            hit = [line for line in rows if line.startswith(want) and path.name in line]
            assert len(hit) == 1 and f"| {v['fd']:.1f} ({r['fd_floor']:.1f}) |" in hit[0]
    for name in tables.CPU_RUNS:
        if (ROOT / "results" / name).is_file():
            assert sum(line.endswith(f"| `results/{name}` |") for line in rows) == 1


def test_results_name_the_cpu_they_ran_on():
    import dataloader as dl

    h = dl.host("cpu")
    assert h["threads"] == torch.get_num_threads() and h["cpu"]
    assert h["bf16"] in ("amx_bf16", "avx512_bf16", "none")
    if h["bf16"] != "none":  # bf16 in hardware: precision "auto" trains in bf16 there
        assert dl.computes_bf16("cpu")
    r = {"device": "cpu", "host": {"cpu": "Intel(R) Xeon(R) Processor", "threads": 2,
                                   "bf16": "amx_bf16"}}
    assert tables.device_cell(r) == "cpu (Intel(R) Xeon(R) Processor, 2 threads, bf16: amx-bf16)"
    assert tables.device_cell(r, "2-core CPU").startswith("2-core CPU (Intel(R) Xeon(R)")
    assert tables.device_cell({"device": "cpu"}) == "cpu"  # files from before hosts were recorded


def test_profile_bench_puts_each_operator_in_one_kind(tmp_path):
    from bench_profile_step import OTHER, kind_of

    assert kind_of("aten::convolution_backward") == "convolution backward"
    assert kind_of("aten::mkldnn_convolution") == "convolution forward"
    assert kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert kind_of("aten::addmm") == kind_of("aten::mm") != kind_of("aten::mul")
    assert kind_of("aten::lerp_") == OTHER
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, "bench/bench_profile_step.py", "--preset", "tiny-ground",
                    "--batch", "2", "--steps", "1", "--out", out], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    kinds = r["kinds_ms"]
    assert abs(sum(kinds.values()) - r["step_ms_profiled"]) < 0.1 * len(kinds)
    assert kinds["convolution forward"] > 0 and kinds["convolution backward"] > 0
    assert r["host"]["threads"] >= 1 and r["batch_size"] == 2


def test_activation_bench_sees_a_blown_up_stream():
    from bench_activations import stream_sizes
    from model import build_model

    torch.manual_seed(0)
    net = build_model("tiny-ground").eval()
    sizes = stream_sizes(net, torch.device("cpu"))
    assert list(sizes) == ["conv_in", "down_blocks.0", "down_blocks.1", "mid_block",
                           "up_blocks.0", "up_blocks.1", "conv_out"]
    with torch.no_grad():  # a stage whose output grows 1000x: the stream after it grows too
        net.unet.down_blocks[0].resnets[0].conv2.weight.mul_(1000)
    blown = stream_sizes(net, torch.device("cpu"))
    assert blown["conv_in"] == sizes["conv_in"]
    assert blown["down_blocks.0"] > 50 * sizes["down_blocks.0"]
