"""model.py, train.py, sample.py on the CPU with the tiny preset and a fake 12-image data folder.

The scripts run as subprocesses (the real CLI paths); the library functions are called directly
where that is cheaper.
"""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import assert_shards_hold, grid_tiles, read_png  # noqa: E402
from dataloader import (DataError, encode, encode_batch, host, load_conditions,  # noqa: E402
                        run_cli, to_uint8, validation_conditions)
from model import (ConditionalUNet, build_model, count_params, export_fp16,  # noqa: E402
                   flops_per_image, load_weights, make_noise_scheduler)
from sample import SAMPLERS, generate, load_model  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

TINY_MODEL = ["--preset", "tiny", "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2"]
# --max-minutes 0: no time budget, so the LR schedule follows the steps alone (deterministic)
TINY = [*TINY_MODEL, "--max-minutes", "0"]


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
def data(fake_data):
    return fake_data


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


def assert_loss_png_plots_the_log(run_dir, tmp_path_factory, steps):
    """run_dir/loss.png is train.plot_loss's drawing of run_dir/log.jsonl's loss records (all
    `steps` of them), and a plot of fewer records would look different."""
    log = train._read_log(run_dir / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == list(range(1, steps + 1))
    full, half = tmp_path_factory.mktemp("plot") / run_dir.name, tmp_path_factory.mktemp(
        "plot") / run_dir.name
    for d, keep in ((full, steps), (half, steps // 2)):
        d.mkdir()
        d.joinpath("log.jsonl").write_text("".join(
            json.dumps(r) + "\n" for r in log if r.get("step", 0) <= keep))
        train.plot_loss(d)
    shipped = (run_dir / "loss.png").read_bytes()
    assert shipped == (full / "loss.png").read_bytes()
    assert shipped != (half / "loss.png").read_bytes()


def test_resume_matches_uninterrupted(runs, tmp_path_factory):
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
    # the resumed run logged the uninterrupted run's losses, step for step
    recs_b = [r for r in train._read_log(runs / "b" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in recs_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(recs, recs_b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-7), (ra, rb)
    # loss.png is the curve of all six logged steps (redrawn after the resume), not of the
    # first three: the plot of a copy of the log is byte-identical, that of its first half not
    assert_loss_png_plots_the_log(runs / "a", tmp_path_factory, steps=6)
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


def assert_same_pixels(got, want, what, levels=1):
    """uint8 images equal up to `levels` (bf16 autocast in another process may round a pixel
    to the next level; a wrong image is off by tens of levels)."""
    diff = (got.int() - want.int()).abs().max().item()
    assert got.shape == want.shape and diff <= levels, f"{what}: {diff} levels apart"


def assert_pngs_are_the_images(folder, want, grid=None):
    """folder/{i}.png hold the images want (N, 3, 64, 64) uint8, nothing else is there, and
    the grid's tiles are those PNGs."""
    names = sorted(f.name for f in folder.iterdir())
    assert names == sorted(f"{i}.png" for i in range(len(want)))
    pngs = torch.stack([read_png(folder / f"{i}.png") for i in range(len(want))])
    assert_same_pixels(pngs, want, folder.name)
    if grid is not None:
        assert torch.equal(grid_tiles(grid, len(want)), pngs)


def test_sample_cli_writes_the_generated_images(runs, tmp_path):
    out = tmp_path / "images"
    p = run("sample.py", "--checkpoint", runs / "b", "--sampler", "dpm++", "--steps", 2,
            "--guidance", 2, "--seed", 0, "--out", out, cwd=tmp_path)
    assert "checkpoint-6" in p.stdout  # says which checkpoint it used
    assert sorted(f.name for f in out.iterdir()) == ["denoise_process.png", "new_test",
                                                     "new_test_grid.png", "test",
                                                     "test_grid.png"]
    # each file's PNGs are generate()'s images of its conditions in file order, and its grid
    # tiles them 8 to a row
    model, sched_cfg = load_model(runs / "b" / "checkpoint-6", torch.device("cpu"))
    kw = dict(sampler="dpm++", steps=2, guidance=2.0, seed=0, scheduler_config=sched_cfg,
              progress=False)
    for name in ("test", "new_test"):
        labels = encode_batch(load_conditions(ROOT / f"{name}.json"))
        assert_pngs_are_the_images(out / name, to_uint8(generate(model, labels, **kw)),
                                   out / f"{name}_grid.png")
    # the denoising strip: 10 frames of x_t from the noise on top, the x0 estimates below, the
    # last bottom frame the image; 9 steps, so that there are enough states for 10 frames
    final, traj = generate(model, encode(sample.PROCESS_LABELS)[None], **{**kw, "steps": 9},
                           return_trajectory=True)
    strip = grid_tiles(out / "denoise_process.png", 20, nrow=10)
    assert_same_pixels(strip[:10], to_uint8(traj["x_t"][:, 0]), "x_t row")
    assert_same_pixels(strip[10:19], to_uint8(traj["x0"][:, 0]), "x0 row")
    assert_same_pixels(strip[19], to_uint8(final[0]), "last frame")


class CleanImageOracle(torch.nn.Module):
    """A stand-in model whose v-prediction always implies the same clean image: 0.4 or -0.4
    per channel, from the first three labels (gray, red, blue cube), -0.4 everywhere for the
    null condition. A correct sampler must land on it, with CFG's u + w (c - u) applied."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.config = types.SimpleNamespace(image_size=64, conditioning="embed")

    @staticmethod
    def clean(y):
        return (0.4 * (2 * y[:, :3] - 1))[:, :, None, None].expand(len(y), 3, 64, 64)

    def forward(self, x, t, y, layout=None):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (a.sqrt() * x - self.clean(y)) / (1 - a).sqrt()  # v = (sqrt(a) x_t - x0) / ..


def test_every_sampler_lands_on_the_clean_image_the_model_predicts():
    sched = make_noise_scheduler(prediction_type="v_prediction")  # the recipe's (train.py)
    oracle = CleanImageOracle(sched.alphas_cumprod)
    y = encode_batch([["gray cube"], ["red cube", "blue cube"], ["yellow cylinder"]])
    c, u = oracle.clean(y), oracle.clean(torch.zeros_like(y))
    for w in (1.0, 1.5):
        for name in SAMPLERS:
            for steps in (2, 5):
                img = generate(oracle, y, sampler=name, steps=steps, guidance=w, device="cpu",
                               scheduler_config=sched.config, progress=False)
                torch.testing.assert_close(img, u + w * (c - u), atol=1e-5, rtol=0,
                                           msg=lambda m: f"{name} {steps} steps, w {w}: {m}")


def test_samplers_differ_and_seeds_are_per_image(runs):
    model, sched_cfg = load_model(runs / "b", torch.device("cpu"))
    y = encode_batch([["red sphere"], ["blue cube", "cyan cylinder"], ["gray cube"]])
    # each name builds its own sampler: from the same noise, four different images
    imgs = {name: generate(model, y, sampler=name, steps=3, guidance=2.0, seed=1,
                           scheduler_config=sched_cfg, progress=False) for name in SAMPLERS}
    for i, a in enumerate(SAMPLERS):
        for b in list(SAMPLERS)[i + 1:]:
            assert (imgs[a] - imgs[b]).abs().max() > 1e-3, (a, b)
    # image i depends on (seed, i) only: same result for any batch size, stochastic ones too
    for name in ("ddpm", "dpm++", "dpm++sde"):
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
    assert_shards_hold(tmp_path, m.state_dict(), 500_000)
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
    # both run at full size and read the labels (fast through the embedding, xfast's tokens
    # through cross-attention) even untrained
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        for m in (fast, xfast):
            null, red = m(x, t, torch.zeros(1, 24)), m(x, t, encode_batch([["red sphere"]]))
            assert null.shape == x.shape and (null - red).abs().max() > 1e-4


def test_export_fp16(runs, tmp_path):
    ckpt = runs / "b" / "checkpoint-6"
    dst = export_fp16(runs / "b", tmp_path / "weights")  # a run: its latest checkpoint's EMA
    # the model's and the training schedule's configs travel unchanged
    for src, name in ((ckpt / "ema", "config.json"), (ckpt / "scheduler",
                                                      "scheduler_config.json")):
        assert json.loads((dst / name).read_text()) == json.loads((src / name).read_text())
    shipped = safetensors_dict(dst)
    assert {v.dtype for v in shipped.values()} == {torch.float16}
    model, sched_cfg = load_model(dst, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ema = safetensors_dict(ckpt / "ema")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ema[k], atol=1e-3, rtol=1e-3)
    assert sched_cfg["prediction_type"] == "v_prediction"
    # the trained preset's shipped weights: several fp16 shards, each at most 15 MiB
    big, net = tmp_path / "big", build_model("xattn")
    net.save_pretrained(big / "ema")
    make_noise_scheduler().save_config(big / "scheduler")
    dst = export_fp16(big, tmp_path / "big_weights")
    shards = list(dst.glob("*.safetensors"))
    assert len(shards) >= 2 and max(f.stat().st_size for f in shards) <= 15 * 2**20
    loaded = load_model(dst, torch.device("cpu"))[0].state_dict()  # every tensor, as fp16
    assert loaded.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(loaded[k], v.half().float()), k
    # sample.py on shipped weights, with an ad-hoc condition: the PNGs are generate()'s
    # images with sample.py's defaults (dpm++, guidance 2, seed 0), the grid tiles them
    out = tmp_path / "custom"
    sample.main(["--checkpoint", str(tmp_path / "weights"), "--labels", "red sphere, cyan cube",
                 "--num-images", "2", "--steps", "2", "--out", str(out)])
    assert sorted(f.name for f in out.iterdir()) == ["custom_0.png", "custom_1.png",
                                                     "custom_grid.png"]
    want = to_uint8(generate(model, encode(["red sphere", "cyan cube"])[None].repeat(2, 1),
                             sampler="dpm++", steps=2, guidance=sample.GUIDANCE, seed=0,
                             scheduler_config=sched_cfg, progress=False))
    pngs = torch.stack([read_png(out / f"custom_{i}.png") for i in range(2)])
    assert torch.equal(pngs, want)  # the same process and weights: exact
    assert torch.equal(grid_tiles(out / "custom_grid.png", 2), pngs)


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
    # train.py's --seed is not an abbreviation of speedrun.py's --seeds
    own, passed = speedrun.parse_args(["--seed", "1"])
    assert own.seeds == [0, 1, 2, 3, 4] and passed == ["--seed", "1"]
    assert [speedrun.parse_args(a)[0].ddpm_baseline for a in (
        ["--ddpm-baseline", "--cuda-graph"], ["--ddpm-baseline", "3"])] == [1000, 3]
    cfg = train.parse_args(speedrun.train_flags("r", 2.0, "cpu", rest))
    assert (cfg.lr, cfg.preset, cfg.lr_by_time) == (1e-3, "fast", False)  # the user's
    # the CPU recipe's: a small batch, bf16 autocast where the CPU computes it
    assert (cfg.batch_size, cfg.warmup_steps, cfg.max_minutes) == (16, 200, 2.0)
    assert cfg.mixed_precision == "auto" and not cfg.cuda_graph  # on the CPU: no graph
    # `python train.py` trains what the CPU speedrun trains: the shipped model's recipe
    assert train.parse_args(speedrun.train_flags("r", 40.0, "cpu", [])) == train.parse_args(
        ["--run-name", "r", "--device", "cpu"])
    assert (train.parse_args([]).preset, train.parse_args([]).max_minutes) == ("ground-shape", 40)
    # --recipe cpu on a GPU replays the CPU recipe (ablations at the CPU's budget)
    monkeypatch.setattr(speedrun.dl, "resolve_device", lambda d: torch.device("cuda"))
    assert train.parse_args(speedrun.train_flags("r", 2.0, "cuda", [], recipe="cpu")) == \
        train.parse_args(["--run-name", "r", "--max-minutes", "2.0", "--device", "cuda"])
    monkeypatch.undo()
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
            "--device", "cpu", *TINY_MODEL, *data, "--runs-dir", tmp_path / "runs",
            "--warmup-steps", 1,
            cwd=tmp_path, timeout=600)
    r = json.loads((tmp_path / "speedrun-cpu.json").read_text())
    # the number an ablation is judged by, printed where a GPU call's output ends
    mean = sum(r["accuracy_mean"].values()) / 2
    assert f"mean of the files' means: {mean:.4f}" in p.stdout.splitlines()[-2]
    for key in ("device", "train_minutes", "train_images_per_s", "sampler", "sampler_steps",
                "guidance", "fd", "command", "versions", "peak_gpu_memory_gb", "steps"):
        assert key in r, key
    assert (r["sampler"], r["sampler_steps"], r["device"]) == ("dpm++", 2, "cpu")
    assert r["host"] == host("cpu")  # which CPU: their throughputs differ by a lot
    # which judge scored, and on what it was trained (weights/judge's own judge.json)
    meta = json.loads((ROOT / "weights" / "judge" / "judge.json").read_text())["config"]
    assert r["judge"] == {"checkpoint": "weights/judge",
                          "trained_on": ["our renders", *meta["data"]]}
    # the guidance scale scored is the one that did best on validation (the lower FD of the
    # same validation images on a tie)
    sweep = {float(g): a for g, a in r["guidance_sweep_validation"].items()}
    fds = {float(g): f for g, f in r["guidance_sweep_validation_fd"].items()}
    assert set(sweep) == set(fds) == {1.0, 3.0} and fds[1.0] != fds[3.0]
    assert r["guidance"] == max(sweep, key=lambda g: (sweep[g], -fds[g]))
    assert {k: len(v) for k, v in r["accuracy"].items()} == {"test": 2, "new_test": 2}
    assert r["steps"] >= 1 and r["train_config"]["preset"] == "tiny"
    assert r["train_config"]["data_root"] == str(data[1])  # the data it was given, not the default
    assert set(r["fd"]) == set(r["fd_floor"]) == {"test", "new_test"}
    # a few seconds of training on colored squares: far from the renders, unlike more renders
    assert all(r["fd"][k] > 2 * r["fd_floor"][k] for k in r["fd"]), (r["fd"], r["fd_floor"])
    assert r["ddpm1000_no_guidance_seed0"]["steps"] == 2
    assert list(r["phase_seconds"]) == ["judge", "data", "train", "guidance_sweep", "seeds", "fd",
                                        "seed0_pngs", "ddpm"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["written_at"])
    # sample.py's seed-0 PNGs, scored from disk, are the images speedrun.py scored in memory
    assert {k: round(v, 4) for k, v in r["seed0_from_png"].items()} == {
        k: v[0] for k, v in r["accuracy"].items()}
    # ... and they are the final checkpoint's images at seed 0 with the settings it reports
    run_dir = tmp_path / "runs" / "speedrun-cpu"
    model, sched_cfg = load_model(sample.latest_checkpoint(run_dir), torch.device("cpu"))
    for name in ("test", "new_test"):
        labels = encode_batch(load_conditions(ROOT / f"{name}.json"))
        want = to_uint8(generate(model, labels, sampler=r["sampler"], steps=r["sampler_steps"],
                                 guidance=r["guidance"], seed=0, scheduler_config=sched_cfg,
                                 progress=False))
        assert_pngs_are_the_images(run_dir / "images" / name, want,
                                   run_dir / "images" / f"{name}_grid.png")


def test_slow_device_says_when_the_first_status_line_comes(data, tmp_path):
    p = run("train.py", *TINY, *data, "--log-every", 100000, "--max-steps", 100000,
            "--max-minutes", 0.03, "--runs-dir", tmp_path, "--device", "cpu", cwd=tmp_path)
    assert re.search(r"s/step on cpu: the next status line comes at step 100000, in about ",
                     p.stdout), p.stdout
    assert "quick CPU demo" not in p.stdout  # it is tiny already, and has a time budget


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
    # the checkpoint left is step 1's, with finite weights (huge, at this learning rate) to
    # resume or sample from
    ckpt = tmp_path / "nan" / "checkpoint-1"
    assert torch.load(ckpt / train.STATE_FILE, weights_only=True)["step"] == 1
    for sub in ("model", "ema"):
        bad = [k for k, v in safetensors_dict(ckpt / sub).items() if not v.isfinite().all()]
        assert not bad, f"{sub}: non-finite {bad[:3]}"
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
    # the final checkpoint holds the state at the step it stopped, every step before logged
    ckpt = tmp_path / "term" / f"checkpoint-{step}"
    assert step >= 2 and torch.load(ckpt / train.STATE_FILE, weights_only=True)["step"] == step
    assert [r["step"] for r in train._read_log(tmp_path / "term" / "log.jsonl")
            if "loss" in r] == list(range(1, step + 1))
    assert safetensors_dict(ckpt / "ema").keys() == safetensors_dict(ckpt / "model").keys()
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


def free_port():
    """A TCP port nothing listens on now: the OS's pick for port 0 (a port derived from the
    process id can collide with another run's rendezvous on a shared machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training(data, tmp_path):
    """train.py under torchrun with 2 CPU processes (gloo), the code path of `accelerate launch
    --num_processes 2` on two GPUs: one global batch, ranks end with identical weights, rank 0
    alone logs and saves, and a resume goes on from the checkpoint."""
    def launch():  # a fresh free port for each rendezvous
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), str(ROOT / "train.py"),
                "--runs-dir", str(tmp_path), "--run-name", "ddp", "--device", "cpu"]

    cmd = launch() + [*TINY, *map(str, data), "--max-steps", "3", "--eval-every", "3",
                    "--eval-steps", "2"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "cpu:0 x2" in p.stdout and "global batch 8" in p.stdout, p.stdout
    # rank 0 evaluates with the shipped judge while rank 1 waits at the barrier
    assert "eval step 3: validation accuracy" in p.stdout
    log = train._read_log(tmp_path / "ddp" / "log.jsonl")
    ev = next(r for r in log if "eval_val_acc" in r)  # the split covers all 1-3-object kinds
    assert ev["step"] == 3 and sorted(ev["eval_val_by_objects"]) == ["1", "2", "3"]
    # every one of the validation conditions (--eval-conditions), grouped by how many objects
    # it asks for, and the logged accuracy is the pooled hits over labels of the groups
    by_k = ev["eval_val_by_objects"]
    conds = validation_conditions(train.TrainConfig().eval_conditions)
    kinds = {str(k): sum(len(c) == k for c in conds) for k in (1, 2, 3)}
    assert {k: d["images"] for k, d in by_k.items()} == kinds
    assert all(d["total"] == int(k) * d["images"] for k, d in by_k.items())
    assert all(d["accuracy"] == round(d["correct"] / d["total"], 4) for d in by_k.values())
    assert ev["eval_val_acc"] == pytest.approx(sum(d["correct"] for d in by_k.values())
                                               / sum(d["total"] for d in by_k.values()))
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
    p = subprocess.run(launch() + ["--resume", "latest", "--max-steps", "5"], cwd=tmp_path,
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
    # the PNGs are the xattn model's images of the condition (sample.py's defaults), tiled
    model, sched_cfg = load_model(tmp_path / "x" / "checkpoint-2", torch.device("cpu"))
    want = to_uint8(generate(model, encode(["red sphere", "cyan cube"])[None].repeat(2, 1),
                             steps=2, scheduler_config=sched_cfg, progress=False))
    pngs = torch.stack([read_png(out / f"custom_{i}.png") for i in range(2)])
    assert_same_pixels(pngs, want, "xattn custom")
    assert torch.equal(grid_tiles(out / "custom_grid.png", 2), pngs)


def test_logit_normal_timesteps_favour_the_middle():
    cfg = train.TrainConfig(t_sampling="logit-normal", batch_size=4000)
    gen = torch.Generator().manual_seed(0)
    t = train.draw_timesteps(cfg, 4000, gen)
    assert t.min() >= 0 and t.max() < cfg.num_train_timesteps
    middle = ((t >= 250) & (t < 750)).float().mean()
    assert 0.7 < middle < 0.8  # sigmoid(N(0, 1)) in (0.25, 0.75): 0.73; uniform: 0.5
    u = train.draw_timesteps(train.TrainConfig(), 4000, gen)
    assert 0.45 < ((u >= 250) & (u < 750)).float().mean() < 0.55


def test_a_loss_that_stays_far_above_its_lowest_stops_the_run():
    """A blown-up network keeps a finite loss many times its lowest: three status lines in a
    row over 5x stop the run with one line; a single high line and short lines do not."""
    from types import SimpleNamespace

    run = SimpleNamespace(step=0, loss_floor=math.inf, loss_high=0, good_ckpt=None)

    def line(loss, steps=50):
        last, run.step = run.step, run.step + steps
        train.check_diverging(run, loss, last)

    for loss in (0.14, 0.03, 0.012, 0.05, 0.2, 0.011):  # one high line, then back: training
        line(loss)
    assert (run.loss_floor, run.loss_high) == (0.011, 0)
    line(1.0, steps=5)  # a mean of 5 batches is not compared
    line(0.2)
    line(0.21)
    assert run.loss_high == 2
    with pytest.raises(train.NonFiniteLoss, match=r"^the loss diverged: 0\.2000 at step 455, "
                       r"3 status lines in a row over 5x its lowest mean 0\.0110 \(try a lower "
                       r"--lr or another --seed\); last good checkpoint: none$"):
        line(0.2)


def test_budget_schedule_runs_over_lr_decay_steps():
    """--lr-by-time anneals over --lr-decay-steps where given (a short run on a long run's
    schedule), else over --max-steps, or over the minutes if they run out first."""
    cfg = train.parse_args(["--max-steps", "400", "--lr-decay-steps", "4357",
                            "--warmup-steps", "200", "--max-minutes", "60"])
    f = train._budget_lr_factor
    assert f(cfg, 100, 0.0) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 100 / 4357)))
    assert f(cfg, 200, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 200 / 4357)))
    assert f(cfg, 200, 30 * 60.0) == pytest.approx(0.5)  # half the minutes: half the cosine
    cfg.lr_decay_steps = 0
    assert f(cfg, 200, 0.0) == pytest.approx(0.5)  # half of --max-steps
