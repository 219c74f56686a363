"""Nothing lost: checkpoints broken in every way a crash or a full disk leaves them, real signals
(kill -9 in the middle of a checkpoint write, Ctrl-C, a second Ctrl-C) on real train.py
processes, --keep-last, and malformed run configs. Tiny preset, a dozen fake images, CPU."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from dataloader import DataError  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--preset", "tiny", "--batch-size", "4", "--log-every", "1", "--warmup-steps", "1",
        "--device", "cpu", "--max-minutes", "0"]
# train.py with torch.save slowed down: after writing train_state.pt into a folder whose path
# holds $PAUSE_AT, it touches $MARKER and sleeps, so a test can signal the process exactly
# while a checkpoint is half-way to its final name.
PAUSED_TRAIN = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch
import train
from dataloader import run_cli

real_save = torch.save


def save(obj, f, *args, **kw):
    real_save(obj, f, *args, **kw)
    if str(f).endswith("train_state.pt") and os.environ["PAUSE_AT"] in str(f):
        open(os.environ["MARKER"], "w").close()
        time.sleep(300)


torch.save = save
run_cli(lambda: train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(fake_data):
    return fake_data


def train_py(*args, cwd, expect=0):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr
    return p


def paused_train(tmp_path, pause_at, *args):
    """train.py that pauses inside the checkpoint write whose folder matches pause_at ->
    (Popen, marker path)."""
    runner = tmp_path / "paused_train.py"
    runner.write_text(PAUSED_TRAIN.format(root=str(ROOT)))
    marker = tmp_path / "paused"
    env = {**ENV, "PAUSE_AT": pause_at, "MARKER": str(marker)}
    p = subprocess.Popen([sys.executable, str(runner), *map(str, args)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, marker


def wait_for(predicate, p, timeout=180):
    t0 = time.time()
    while not predicate():
        if p.poll() is not None:
            raise AssertionError(f"exited early ({p.returncode}): {p.communicate()}")
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


def checkpoints(run_dir):
    return sorted((int(c.name.split("-")[1]) for c in run_dir.glob("checkpoint-*")))


def logged_steps(run_dir):
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if "loss" in r]


def test_kill_9_while_a_checkpoint_is_written_loses_nothing(data, tmp_path):
    p, marker = paused_train(tmp_path, ".tmp-checkpoint-4", *TINY, *data, "--runs-dir",
                             tmp_path, "--run-name", "k", "--max-steps", 6, "--save-every", 2)
    wait_for(marker.exists, p)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    run_dir = tmp_path / "k"
    # the write in flight never got its final name; the one before it is whole
    assert checkpoints(run_dir) == [2]
    assert (run_dir / ".tmp-checkpoint-4" / "train_state.pt").is_file()
    assert train.checkpoint_problem(run_dir / "checkpoint-2") is None
    out = train_py("--runs-dir", tmp_path, "--run-name", "k", "--resume", "latest",
                   "--max-steps", 6, cwd=tmp_path).stdout
    assert f"resumed from {run_dir / 'checkpoint-2'} at step 2" in out
    assert checkpoints(run_dir) == [2, 4, 6] and not list(run_dir.glob(".tmp-*"))
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # the killed steps 3-4 were redone


def test_ctrl_c_saves_and_a_second_ctrl_c_leaves_no_half_checkpoint(data, tmp_path):
    args = [*TINY, *data, "--runs-dir", tmp_path, "--max-steps", 100000, "--save-every", 0]
    # one Ctrl-C: the step finishes, a checkpoint is saved, exit 0
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args), "--run-name",
                          "c1"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "c1" / "log.jsonl").is_file()
             and len(logged_steps(tmp_path / "c1")) >= 2, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "SIGINT: stopping after this step and saving a checkpoint" in out
    step = checkpoints(tmp_path / "c1")[-1]
    assert f"stopped at step {step}: SIGINT" in out
    assert train.checkpoint_problem(tmp_path / "c1" / f"checkpoint-{step}") is None

    # a second Ctrl-C while that checkpoint is written: out at once, nothing half-written
    p, marker = paused_train(tmp_path, ".tmp-checkpoint-", *args, "--run-name", "c2")
    wait_for(lambda: (tmp_path / "c2" / "log.jsonl").is_file()
             and len(logged_steps(tmp_path / "c2")) >= 2, p)
    p.send_signal(signal.SIGINT)
    wait_for(marker.exists, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert "Traceback" not in err
    assert checkpoints(tmp_path / "c2") == [] and not list((tmp_path / "c2").glob(".tmp-*"))


def test_keep_last_and_resume_skip_a_broken_newest_checkpoint(data, tmp_path):
    run_dir = tmp_path / "r"
    common = ["--runs-dir", tmp_path, "--run-name", "r"]
    train_py(*TINY, *data, *common, "--max-steps", 3, "--save-every", 1, "--keep-last", 2,
             cwd=tmp_path)
    assert checkpoints(run_dir) == [2, 3]
    state = run_dir / "checkpoint-3" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as a crash might leave it
    out = train_py(*common, "--resume", "latest", "--max-steps", 4, cwd=tmp_path).stdout
    assert (f"--resume: skipping {run_dir / 'checkpoint-3'} ({state}: unreadable") in out
    assert f"resumed from {run_dir / 'checkpoint-2'} at step 2" in out
    # the broken checkpoint-3 was written again; the newest two complete ones stay
    assert checkpoints(run_dir) == [3, 4]
    assert all(train.checkpoint_problem(run_dir / f"checkpoint-{s}") is None for s in (3, 4))
    # every checkpoint broken: one line, nothing started
    for s in (3, 4):
        (run_dir / f"checkpoint-{s}" / "train_state.pt").write_bytes(b"")
    p = train_py(*common, "--resume", "latest", "--max-steps", 5, cwd=tmp_path, expect=2)
    assert p.stderr.strip().splitlines()[-1].startswith(
        f"error: {run_dir}: no complete checkpoint to resume from (newest: "
        f"{run_dir / 'checkpoint-4' / 'train_state.pt'}: unreadable (")
    assert checkpoints(run_dir) == [3, 4]


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("ckpt")
    train_py(*TINY, *data, "--runs-dir", runs, "--run-name", "x", "--max-steps", 1, cwd=runs)
    return runs / "x" / "checkpoint-1"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKS = {  # what a crash or a full disk can leave, and the words that must name it
    "no model/": (lambda c: shutil.rmtree(c / "model"), "model/config.json: missing"),
    "ema/config.json truncated": (lambda c: truncate(c / "ema" / "config.json"),
                                  "ema/config.json: not valid JSON"),
    "no scheduler/": (lambda c: shutil.rmtree(c / "scheduler"),
                      "scheduler/scheduler_config.json: missing"),
    "ema weights truncated": (lambda c: truncate(next((c / "ema").glob("*.safetensors"))),
                              "unreadable weights"),
    "model weights missing": (lambda c: next((c / "model").glob("*.safetensors")).unlink(),
                              "model: no *.safetensors weights"),
    "train_state.pt empty": (lambda c: (c / "train_state.pt").write_bytes(b""),
                             "train_state.pt: unreadable"),
    "train_state.pt truncated": (lambda c: truncate(c / "train_state.pt"),
                                 "train_state.pt: unreadable"),
    "train_state.pt missing": (lambda c: (c / "train_state.pt").unlink(),
                               "train_state.pt: missing"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_a_broken_checkpoint_is_named_in_one_line(checkpoint, tmp_path, case):
    broken = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint, broken)
    BREAKS[case][0](broken)
    problem = train.checkpoint_problem(broken)
    assert problem is not None and BREAKS[case][1] in problem and "\n" not in problem
    cfg = train.TrainConfig(resume=str(broken))
    with pytest.raises(DataError, match=f"^cannot resume from {broken}: "):
        train._find_resume(cfg)


def test_a_broken_checkpoint_named_on_the_command_line_stops_in_one_line(checkpoint, tmp_path):
    broken = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(checkpoint.parent, broken.parent)
    (broken / "train_state.pt").write_bytes(b"")
    p = train_py("--resume", broken, "--max-steps", 2, cwd=tmp_path, expect=2)
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: cannot resume from {broken}: "
                                f"{broken / 'train_state.pt'}: unreadable")


@pytest.mark.parametrize("content, message", [
    ("{", "config.json: malformed JSON"),
    ("[1, 2]", "config.json: expected a JSON object of training options"),
    ('{"batch_size": "32"}', 'config.json: batch_size = "32" (expected int)'),
    ('{"lr_by_time": 1}', "config.json: lr_by_time = 1 (expected bool)"),
])
def test_a_malformed_run_config_stops_the_resume_in_one_line(checkpoint, tmp_path, content,
                                                             message):
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint.parent, run_dir)
    (run_dir / "config.json").write_text(content)
    with pytest.raises(DataError) as e:
        train.parse_args(["--resume", str(run_dir)])
    assert message in str(e.value) and "\n" not in str(e.value)
