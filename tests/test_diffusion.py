"""model.py, train.py, sample.py on the CPU with the tiny preset and a fake 12-image data folder.

The scripts run as subprocesses (the real CLI paths); the library functions are called directly
where that is cheaper.
"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataloader import LABELS, DataError, encode_batch, run_cli  # noqa: E402
from model import (ConditionalUNet, build_model, count_params, export_fp16,  # noqa: E402
                   flops_per_image, load_weights, make_noise_scheduler)
from sample import SAMPLERS, generate, load_model  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

COLORS = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215),
          "green": (29, 105, 20), "brown": (129, 74, 25), "purple": (129, 38, 192),
          "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
TINY = ["--preset", "tiny", "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2"]


# One thread per process: on a shared 2-core machine, OpenMP threads spinning against other jobs
# make the tiny model up to 50x slower; one thread keeps the file at about a minute.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run(script, *args, cwd, expect=0, timeout=300):
    """Run a repository script as a user would; return the CompletedProcess."""
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout, env=ENV)
    assert p.returncode == expect, f"{script} exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def safetensors_dict(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 64x64 PNGs of colored squares with a spec in the lab's format (names never rendered)."""
    root = tmp_path_factory.mktemp("fake")
    spec = {}
    for i in range(12):
        labels = [LABELS[(7 * i + 5 * k) % 24] for k in range(1 + i % 3)]
        im = Image.new("RGB", (64, 64), (120, 120, 120))
        draw = ImageDraw.Draw(im)
        for k, name in enumerate(labels):
            draw.rectangle([8 + 18 * k, 24, 18 + 18 * k, 34], fill=COLORS[name.split()[0]])
        fname = f"fake_{i:03d}_{i % 3}.png"
        im.save(root / fname)
        spec[fname] = labels
    (root / "spec.json").write_text(json.dumps(spec))
    return ["--data-root", root, "--train-json", root / "spec.json"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Run a: 3 steps, then resumed to 6 (flags not repeated); run b: 6 steps uninterrupted.
    Both use a 6-step cosine schedule, so the LR schedule must continue across the resume."""
    runs = tmp_path_factory.mktemp("runs")
    common = [*data, "--runs-dir", runs, "--device", "cpu"]
    run("train.py", *TINY, "--max-steps", 3, "--lr-decay-steps", 6, "--run-name", "a", *common,
        cwd=runs)
    p = run("train.py", "--run-name", "a", "--resume", "latest", "--max-steps", 6,
            "--runs-dir", runs, cwd=runs)
    assert "resumed from" in p.stdout and "step 3" in p.stdout
    run("train.py", *TINY, "--max-steps", 6, "--lr-decay-steps", 6, "--run-name", "b", *common,
        cwd=runs)
    return runs


def test_resume_matches_uninterrupted(runs):
    a, b = runs / "a" / "checkpoint-6", runs / "b" / "checkpoint-6"
    for sub in ("model", "ema"):
        wa, wb = safetensors_dict(a / sub), safetensors_dict(b / sub)
        assert wa.keys() == wb.keys() and any(k.startswith("label_proj") for k in wa)
        diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert diff <= 1e-6, f"{sub}: resumed run differs by {diff}"
    # the resumed run kept its saved config (tiny preset, batch 4) and logged each step once
    cfg = json.loads((runs / "a" / "config.json").read_text())
    assert cfg["preset"] == "tiny" and cfg["batch_size"] == 4 and cfg["max_steps"] == 6
    recs = [r for r in train._read_log(runs / "a" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    # the training clock goes on from the checkpoint (--max-minutes, --lr-by-time count it)
    state = runs / "a" / "checkpoint-3" / train.STATE_FILE
    saved_s = torch.load(state, weights_only=True)["train_seconds"]
    assert recs[2]["elapsed_s"] <= saved_s <= recs[3]["elapsed_s"] <= recs[5]["elapsed_s"]
    assert (runs / "a" / "loss.png").is_file()
    assert torch.load(a / train.STATE_FILE, weights_only=True)["step"] == 6
    # a fresh run in a folder that already has checkpoints is refused, not mixed in
    cfg = train.parse_args(["--run-name", "a", "--runs-dir", str(runs)])
    with pytest.raises(DataError, match="already has checkpoints"):
        train.train(cfg)


def test_config_paths_are_relative_to_the_repository(tmp_path, monkeypatch):
    # config.json keeps repository paths relative, so a run resumes after the checkout moves
    cfg = train.parse_args([])
    assert (cfg.data_root, cfg.train_json, cfg.runs_dir) == ("data/iclevr_syn", "train.json",
                                                             "runs")
    assert train.repo_path(cfg.train_json) == ROOT / "train.json"
    # typed paths are relative to the current directory; outside the repository they are kept
    # absolute, inside it they become repository-relative
    monkeypatch.chdir(tmp_path)
    cfg = train.parse_args(["--data-root", "mine", "--train-json", str(ROOT / "train.json")])
    assert cfg.data_root == str(tmp_path / "mine") and cfg.train_json == "train.json"
    assert train.repo_path(cfg.data_root) == tmp_path / "mine"


def test_sample_cli_writes_everything(runs, tmp_path):
    out = tmp_path / "images"
    p = run("sample.py", "--checkpoint", runs / "b", "--sampler", "dpm++", "--steps", 2,
            "--guidance", 2, "--seed", 0, "--out", out, cwd=tmp_path)
    assert "checkpoint-6" in p.stdout  # says which checkpoint it used
    for name in ("test", "new_test"):
        files = sorted((out / name).glob("*.png"), key=lambda f: int(f.stem))
        assert [f.stem for f in files] == [str(i) for i in range(32)]
        assert {Image.open(f).size for f in files} == {(64, 64)}
        assert Image.open(out / f"{name}_grid.png").size == (8 * 66 + 2, 4 * 66 + 2)
    w, h = Image.open(out / "denoise_process.png").size
    assert w >= 8 * 66 + 2 and h == 2 * 66 + 2  # >= 8 frames; x_t row and x0 row
    assert len(list(out.rglob("*.png"))) == 32 + 32 + 3


def test_every_sampler_runs_and_seeds_are_per_image(runs):
    model, sched_cfg = load_model(runs / "b", torch.device("cpu"))
    y = encode_batch([["red sphere"], ["blue cube", "cyan cylinder"], ["gray cube"]])
    for name in SAMPLERS:
        img = generate(model, y, sampler=name, steps=2, guidance=2.0, seed=1,
                       scheduler_config=sched_cfg, progress=False)
        assert img.shape == (3, 3, 64, 64) and img.isfinite().all() and img.abs().max() <= 1
    # image i depends on (seed, i) only: same result for any batch size, stochastic ddpm too
    for name in ("ddpm", "dpm++"):
        kw = dict(sampler=name, steps=3, guidance=2.0, scheduler_config=sched_cfg,
                  progress=False)
        whole = generate(model, y, seed=5, batch_size=3, **kw)
        split = generate(model, y, seed=5, batch_size=2, **kw)
        ones = generate(model, y, seed=5, batch_size=1, **kw)
        torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)
        torch.testing.assert_close(whole, ones, atol=1e-5, rtol=0)
        other = generate(model, y, seed=6, batch_size=3, **kw)
        assert (whole - other).abs().max() > 0.1
    # guidance 1 skips the unconditional half but is the same sampler
    img, traj = generate(model, y[:1], steps=4, guidance=1.0, scheduler_config=sched_cfg,
                         return_trajectory=True, progress=False)
    assert traj["x_t"].shape == (5, 1, 3, 64, 64) and traj["x0"].shape == (4, 1, 3, 64, 64)
    torch.testing.assert_close(traj["x_t"][-1].clamp(-1, 1), img)
    # a guidance interval guides only its steps (4 dpm++ steps: t = 999, 749, 499, 249)
    kw = dict(steps=4, seed=3, scheduler_config=sched_cfg, progress=False)
    guided, plain = generate(model, y, guidance=3.0, **kw), generate(model, y, guidance=1.0, **kw)
    assert (guided - plain).abs().max() > 1e-3
    torch.testing.assert_close(generate(model, y, guidance=3.0, guidance_interval=(0, 999), **kw),
                               guided)
    torch.testing.assert_close(generate(model, y, guidance=3.0, guidance_interval=(0, 200), **kw),
                               plain)
    some = generate(model, y, guidance=3.0, guidance_interval=(500, 999), **kw)
    assert (some - guided).abs().max() > 1e-4 and (some - plain).abs().max() > 1e-4


@pytest.mark.parametrize("conditioning", ["embed", "concat"])
def test_save_pretrained_roundtrip(conditioning, tmp_path):
    torch.manual_seed(0)
    m = build_model("tiny", conditioning=conditioning).eval()
    with torch.no_grad():
        for p in m.label_proj.parameters():
            p.normal_()  # not the init values, so a lost projection would show
    m.save_pretrained(tmp_path, max_shard_size="500KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # sharded
    m2 = load_weights(tmp_path)
    assert isinstance(m2, ConditionalUNet) and m2.config.conditioning == conditioning
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([10, 900])
    y = encode_batch([["red sphere"], ["cyan cube", "gray cylinder"]])
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y), m2(x, t, y), atol=0, rtol=0)
        assert (m2(x, t, y) - m2(x, t, torch.zeros_like(y))).abs().max() > 1e-3


def test_presets_sizes():
    tiny, default = build_model("tiny"), build_model("default")
    assert count_params(tiny) < 1e6
    assert count_params(default) <= 16e6 and flops_per_image(default) <= 9e9
    assert abs(count_params(build_model("seed")) - 113.7e6) < 0.2e6
    fast = build_model("fast")  # same capacity, under a third of default's cost per image
    assert count_params(fast) <= 16e6 and flops_per_image(fast) <= flops_per_image(default) / 3
    xattn, xfast = build_model("xattn"), build_model("xfast")  # xattn at fast's token grid
    assert count_params(xfast) <= 20e6 and flops_per_image(xfast) <= flops_per_image(xattn) / 2.5
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for m in (fast, xfast):
            assert m(x, torch.tensor([500]), torch.zeros(1, 24)).shape == x.shape


def test_export_fp16(runs, tmp_path):
    dst = export_fp16(runs / "b", tmp_path / "weights")
    assert (dst / "config.json").is_file() and (dst / "scheduler_config.json").is_file()
    shipped = safetensors_dict(dst)
    assert {v.dtype for v in shipped.values()} == {torch.float16}
    model, sched_cfg = load_model(dst, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ema = safetensors_dict(runs / "b" / "checkpoint-6" / "ema")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ema[k], atol=1e-3, rtol=1e-3)
    assert sched_cfg["prediction_type"] == "v_prediction"
    # the trained preset's shipped weights: several fp16 shards, each at most 15 MiB
    big = tmp_path / "big"
    build_model("xattn").save_pretrained(big / "ema")
    make_noise_scheduler().save_config(big / "scheduler")
    dst = export_fp16(big, tmp_path / "big_weights")
    shards = list(dst.glob("*.safetensors"))
    assert len(shards) >= 2 and max(f.stat().st_size for f in shards) <= 15 * 2**20
    assert count_params(load_model(dst, torch.device("cpu"))[0]) == count_params(
        build_model("xattn"))
    # sample.py on shipped weights, with an ad-hoc condition
    out = tmp_path / "custom"
    sample.main(["--checkpoint", str(tmp_path / "weights"), "--labels", "red sphere, cyan cube",
                 "--num-images", "2", "--steps", "2", "--out", str(out)])
    assert sorted(f.name for f in out.iterdir()) == ["custom_0.png", "custom_1.png",
                                                     "custom_grid.png"]


def test_sample_defaults_come_from_the_checkpoint(runs, tmp_path, capsys):
    """sample_config.json beside shipped weights sets sample.py's defaults; flags still win."""
    dst = export_fp16(runs / "b", tmp_path / "weights")
    (dst / sample.SAMPLE_CONFIG).write_text('{"sampler": "ddim", "steps": 3, "guidance": 1.5}')
    args = ["--checkpoint", str(dst), "--labels", "red sphere", "--num-images", "1"]
    sample.main([*args, "--out", str(tmp_path / "a")])
    assert "ddim 3 steps, guidance 1.5" in capsys.readouterr().out
    sample.main([*args, "--sampler", "dpm++", "--guidance", "1", "--out", str(tmp_path / "b")])
    assert "dpm++ 25 steps, guidance 1.0" in capsys.readouterr().out  # saved steps: ddim's


def test_speedrun_recipe_yields_to_user_flags(runs, monkeypatch):
    import speedrun

    args, rest = speedrun.parse_args(["--short", "--seeds", "0", "--lr", "1e-3", "--preset",
                                      "fast", "--no-lr-by-time"])
    assert args.short and args.seeds == [0] and rest == ["--lr", "1e-3", "--preset", "fast",
                                                         "--no-lr-by-time"]
    assert args.ddpm_baseline == 0  # off unless asked; 1000 steps when asked without a number
    assert [speedrun.parse_args(a)[0].ddpm_baseline for a in (
        ["--ddpm-baseline", "--cuda-graph"], ["--ddpm-baseline", "3"])] == [1000, 3]
    cfg = train.parse_args(speedrun.train_flags("r", 2.0, "cpu", rest))
    assert (cfg.lr, cfg.preset, cfg.lr_by_time) == (1e-3, "fast", False)  # the user's
    # the CPU recipe's: a small batch, bf16 autocast
    assert (cfg.batch_size, cfg.warmup_steps, cfg.max_minutes) == (32, 200, 2.0)
    assert cfg.mixed_precision == "bf16" and not cfg.cuda_graph  # on the CPU: no graph
    assert train.parse_args([]).preset == "ground"
    assert train.parse_args(speedrun.train_flags("r", 2.0, "cpu", [])).preset == "ground"
    # resuming a run keeps its own recipe (run a: tiny, batch 4), not RECIPE; the budget is new
    cfg = train.parse_args(speedrun.train_flags("a", 3.0, "cpu", ["--resume", "latest",
                                                                 "--runs-dir", str(runs)]))
    assert (cfg.preset, cfg.batch_size, cfg.warmup_steps, cfg.max_minutes) == ("tiny", 4, 2, 3.0)
    # on a GPU the recipe also captures the step in a CUDA graph, unless the user says no
    monkeypatch.setattr(speedrun.dl, "resolve_device", lambda d: torch.device("cuda"))
    flags = speedrun.train_flags("r", 2.0, "auto", ["--no-cuda-graph"])
    assert flags.index("--cuda-graph") < flags.index("--no-cuda-graph")
    assert train.parse_args(flags).preset == "xattn" and train.parse_args(flags).batch_size == 256
    assert "--cuda-graph" not in speedrun.train_flags("r", 2.0, "auto", ["--resume", "latest"])


def test_speedrun_end_to_end(data, tmp_path):
    """speedrun.py's whole path on the CPU (tiny preset, fake data, 2 seeds, 2 sampler steps):
    train for the budget, choose guidance on validation, score both files per seed, FD, seed 0
    written by sample.py and scored from its PNGs, the DDPM row; the results file has the keys
    issue 5 asks for and the wall time of each stage."""
    p = run("speedrun.py", "--minutes", 0.01, "--seeds", 0, 1, "--steps", 2, "--val-conditions",
            4, "--guidance-grid", 1, 3, "--ddpm-baseline", 2, "--results-dir", tmp_path,
            "--device", "cpu", *TINY, *data, "--runs-dir", tmp_path / "runs", "--warmup-steps", 1,
            cwd=tmp_path, timeout=600)
    r = json.loads((tmp_path / "speedrun-cpu.json").read_text())
    # the number an ablation is judged by, printed where a GPU call's output ends
    mean = sum(r["accuracy_mean"].values()) / 2
    assert f"mean of the files' means: {mean:.4f}" in p.stdout.splitlines()[-2]
    for key in ("device", "train_minutes", "train_images_per_s", "sampler", "sampler_steps",
                "guidance", "fd", "command", "versions", "peak_gpu_memory_gb", "steps"):
        assert key in r, key
    assert (r["sampler"], r["sampler_steps"], r["device"]) == ("dpm++", 2, "cpu")
    assert r["guidance"] in (1.0, 3.0) and set(r["guidance_sweep_validation"]) == {"1.0", "3.0"}
    assert {k: len(v) for k, v in r["accuracy"].items()} == {"test": 2, "new_test": 2}
    assert r["steps"] >= 1 and r["train_config"]["preset"] == "tiny"
    assert r["train_config"]["data_root"] == str(data[1])  # the data it was given, not the default
    assert set(r["fd"]) == set(r["fd_floor"]) == {"test", "new_test"}
    assert min(r["fd_floor"].values()) > 0 and r["ddpm1000_no_guidance_seed0"]["steps"] == 2
    assert list(r["phase_seconds"]) == ["judge", "data", "train", "guidance_sweep", "seeds", "fd",
                                        "seed0_pngs", "ddpm"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["written_at"])
    # sample.py's seed-0 PNGs, scored from disk, are the images speedrun.py scored in memory
    assert {k: round(v, 4) for k, v in r["seed0_from_png"].items()} == {
        k: v[0] for k, v in r["accuracy"].items()}
    images = tmp_path / "runs" / "speedrun-cpu" / "images"
    assert len(list((images / "test").glob("*.png"))) == 32
    assert (images / "new_test_grid.png").is_file() and (images / "denoise_process.png").is_file()


def test_slow_device_says_when_the_first_status_line_comes(data, tmp_path):
    p = run("train.py", *TINY, *data, "--log-every", 100000, "--max-steps", 100000,
            "--max-minutes", 0.03, "--runs-dir", tmp_path, "--device", "cpu", cwd=tmp_path)
    assert re.search(r"s/step on cpu: the next status line comes at step 100000, in about ",
                     p.stdout), p.stdout
    assert "try --preset tiny" not in p.stdout  # it is tiny already


def test_fg_weight_loss_is_a_weighted_pixel_mean():
    sched = make_noise_scheduler(prediction_type="epsilon")
    pred = torch.randn(2, 3, 64, 64)
    model = lambda x, t, y, layout: pred  # noqa: E731  (a fixed prediction: the loss is known)
    x0, noise, t = torch.zeros(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.tensor([5, 9])
    y = None
    err = (pred - noise).square().mean(1, keepdim=True)  # (2, 1, 64, 64), epsilon target
    plain = train.diffusion_loss(model, sched, x0, y, None, noise, t)
    torch.testing.assert_close(plain, err.mean())
    torch.testing.assert_close(train.diffusion_loss(model, sched, x0, y, None, noise, t,
                                                    weight=torch.full((2, 1, 64, 64), 3.0)), plain)
    w = torch.ones(2, 1, 64, 64)
    w[:, :, :8] = 10.0  # the top 8 rows of each image weigh 10
    want = ((err * w).sum((1, 2, 3)) / w.sum((1, 2, 3))).mean()
    torch.testing.assert_close(
        train.diffusion_loss(model, sched, x0, y, None, noise, t, weight=w), want)


def test_nonfinite_loss_stops_cleanly(data, tmp_path):
    p = run("train.py", *TINY, *data, "--runs-dir", tmp_path, "--run-name", "nan",
            "--max-steps", 6, "--save-every", 1, "--lr", "1e30", "--warmup-steps", 0,
            "--device", "cpu", cwd=tmp_path, expect=1)
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("error: non-finite loss") and "last good checkpoint" in err
    assert "Traceback" not in p.stderr
    ckpts = sorted(d.name for d in (tmp_path / "nan").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-1"]  # the diverged state was not saved
    assert not list((tmp_path / "nan").glob(".tmp-*"))


def test_sigterm_saves_a_final_checkpoint(data, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *map(str, data), "--runs-dir",
           str(tmp_path), "--run-name", "term", "--max-steps", "100000", "--save-every", "0",
           "--device", "cpu", "--fg-weight", "4"]  # (also runs the object-weighted loss)
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=ENV)
    try:
        for line in p.stdout:
            if line.startswith("step 2/"):
                p.send_signal(signal.SIGTERM)
                break
        out = p.stdout.read()
        assert p.wait(timeout=120) == 0, out
    finally:
        p.kill()
    step = int(re.search(r"stopped at step (\d+): SIGTERM", out).group(1))
    assert step >= 2 and (tmp_path / "term" / f"checkpoint-{step}" / "ema").is_dir()
    assert json.loads((tmp_path / "term" / "config.json").read_text())["fg_weight"] == 4
    # resumed with a budget it has already spent: nothing more is trained or saved
    p = run("train.py", "--run-name", "term", "--runs-dir", tmp_path, "--resume", "latest",
            "--max-minutes", "0.0001", cwd=tmp_path)
    assert "nothing to train" in p.stdout and "saved" not in p.stdout, p.stdout
    assert sorted(d.name for d in (tmp_path / "term").glob("checkpoint-*")) == [
        f"checkpoint-{step}"]


def test_clear_one_line_errors(runs, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    p = run("sample.py", "--checkpoint", missing, cwd=tmp_path, expect=2)
    assert p.stderr.strip() == f"error: {missing}: checkpoint not found"
    cases = [
        (sample.main, ["--checkpoint", str(runs / "b"), "--labels", "red sphere, pink cube"],
         "'pink cube'"),
        (sample.main, ["--checkpoint", str(runs)], "not a checkpoint"),
        (sample.main, ["--checkpoint", str(runs / "b"), "--sampler", "ddpm", "--steps", "0"],
         "--steps"),
        (train.main, ["--resume", str(missing)], str(missing)),
        (train.main, ["--cuda-graph", "--device", "cpu"], "--cuda-graph: needs a CUDA device"),
        (train.main, ["--fg-weight", "0"], "--fg-weight: expected a positive weight, got 0.0"),
    ]
    for main, argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: main(argv))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_two_process_training(data, tmp_path):
    """train.py under torchrun with 2 CPU processes (gloo), the code path of `accelerate launch
    --num_processes 2` on two GPUs: one global batch, ranks end with identical weights, rank 0
    alone logs and saves, and a resume goes on from the checkpoint."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(29500 + os.getpid() % 1000), str(ROOT / "train.py"),
              "--runs-dir", str(tmp_path), "--run-name", "ddp", "--device", "cpu"]
    cmd = launch + [*TINY, *map(str, data), "--max-steps", "3", "--eval-every", "3",
                    "--eval-steps", "2"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "cpu:0 x2" in p.stdout and "global batch 8" in p.stdout, p.stdout
    # rank 0 evaluates with the shipped judge while rank 1 waits at the barrier
    assert "eval step 3: validation accuracy" in p.stdout
    log = train._read_log(tmp_path / "ddp" / "log.jsonl")
    ev = next(r for r in log if "eval_val_acc" in r)  # the split covers all 1-3-object kinds
    assert ev["step"] == 3 and sorted(ev["eval_val_by_objects"]) == ["1", "2", "3"]
    assert sum(d["total"] for d in ev["eval_val_by_objects"].values()) > 128  # every object
    assert all(0 <= d["accuracy"] <= 1 for d in ev["eval_val_by_objects"].values())
    assert log[0]["world_size"] == 2
    ranks = next(r for r in log if r.get("event") == "ranks")
    assert ranks["in_sync"] and len(ranks["param_checksums"]) == 2
    saved = load_weights(tmp_path / "ddp" / "checkpoint-3" / "model")
    assert ranks["param_checksums"][0] == pytest.approx(train.param_checksum(saved).item(),
                                                        rel=1e-12)
    # each rank has its own data/noise stream, checkpointed separately
    rng = [torch.load(tmp_path / "ddp" / "checkpoint-3" / f"rng-{r}.pt", weights_only=True)
           for r in (0, 1)]
    assert not torch.equal(rng[0]["gen"], rng[1]["gen"])
    p = subprocess.run(launch + ["--resume", "latest", "--max-steps", "5"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed from" in p.stdout and "at step 3" in p.stdout, p.stdout
    assert [c.name for c in train.list_checkpoints(tmp_path / "ddp")] == ["checkpoint-3",
                                                                          "checkpoint-5"]
    log = train._read_log(tmp_path / "ddp" / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]  # each step logged once
    assert [r["in_sync"] for r in log if r.get("event") == "ranks"] == [True, True]


def test_train_and_sample_xattn_preset(data, tmp_path):
    """The real xattn preset: 2 training steps (about 13 s, mostly imports), then sample.py."""
    run("train.py", "--preset", "xattn", "--batch-size", 2, "--max-steps", 2, "--log-every", 1,
        "--warmup-steps", 1, *data, "--runs-dir", tmp_path, "--run-name", "x", "--device", "cpu",
        cwd=tmp_path)
    cfg = json.loads((tmp_path / "x" / "checkpoint-2" / "ema" / "config.json").read_text())
    assert cfg["conditioning"] == "xattn"
    out = tmp_path / "images"
    p = run("sample.py", "--checkpoint", tmp_path / "x", "--steps", 2, "--labels",
            "red sphere, cyan cube", "--num-images", 2, "--out", out, cwd=tmp_path)
    assert "checkpoint-2" in p.stdout
    assert sorted(f.name for f in out.iterdir()) == ["custom_0.png", "custom_1.png",
                                                     "custom_grid.png"]
    assert {Image.open(out / f"custom_{i}.png").size for i in range(2)} == {(64, 64)}
