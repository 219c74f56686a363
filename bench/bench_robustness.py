"""Bad input as a user gives it: every case runs the real command line (train.py, sample.py,
evaluate.py, evaluator.py) in a subprocess, in a temporary folder of its own that holds a tiny
data set, and checks what a user sees: the exit status, one line of error that names the file,
label or value, no traceback, and no earlier output lost.

    python bench/bench_robustness.py             # -> results/robustness.json and a summary
    python bench/bench_robustness.py -k png      # only the cases whose name contains "png"

The case list (CASES) lives here alone; tests/test_robustness.py runs it. A case folder holds:
data/img_0.png .. img_7.png and spec.json (train.py's data), cond.json and images/cond/0..3.png
(evaluate.py's), weights -> the repository's weights/ (a link), and for some cases runs/r/, a
finished one-step training run. A full disk is RLIMIT_FSIZE (`ulimit -f`): writing past it
fails with EFBIG, as writing to a full disk fails with ENOSPC, and needs no root.

A case passes when it exits with its documented status (2: bad input), stderr ends with one
"error: ..." line naming the file, label or value (or, for documented conversions, a "warning:"
line), no traceback, and no file of the folder from before the command is gone or changed (a
run's config.json, log.jsonl and loss.png count only when gone: each start rewrites them).
In results, the case folder is written <case>.

Each case is a fork of a server that has imported torch, diffusers and the other third-party
libraries once; the fork runs the script as __main__ with the user's arguments, and imports the
repository's modules afresh. --cold runs a fresh `python script.py` per case instead, exactly as
typed (every case then imports torch itself; tests/test_robustness.py checks both agree).
"""
import argparse
import atexit
import hashlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import re
import resource
import runpy
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "results" / "robustness.json"
IMAGES = 8  # training images of the tiny data set
LABELS = ["red sphere", "cyan cube", "gray cylinder", "blue cube", "green sphere",
          "yellow cube", "purple cylinder", "brown sphere"]
CONDITIONS = [["red sphere"], ["cyan cylinder", "cyan cube"], ["gray cube", "blue sphere"],
              ["yellow cylinder", "green cube", "red cube"]]
TIMEOUT_S = 300
# Files of a run folder that every start of the run rewrites by design: only their loss counts.
RUN_RECORDS = re.compile(r"^runs/[^/]+/(config\.json|log\.jsonl|loss\.png)$")
TQDM_FRAME = re.compile(r"\d+%\|.*\| *\d+/\d+")  # progress bars also go to stderr


# ---------------------------------------------------------------- commands

def flags(defaults, **changes):
    """{flag: value} plus changes (keyword a_b is flag --a-b) -> argument list."""
    merged = {**defaults, **{"--" + k.replace("_", "-"): v for k, v in changes.items()}}
    return [str(a) for kv in merged.items() for a in kv]


TRAIN = {"--data-root": "data", "--train-json": "spec.json", "--preset": "tiny",
         "--max-steps": 1, "--batch-size": 2, "--device": "cpu", "--runs-dir": "runs",
         "--run-name": "r"}
SAMPLE = {"--checkpoint": "weights/ddpm", "--out": "out", "--device": "cpu"}
EVALUATE = {"--images": "images", "--conditions": "cond.json", "--device": "cpu"}


def train(**changes):
    return ["train.py", *flags(TRAIN, **changes)]


def sample(**changes):
    return ["sample.py", *flags(SAMPLE, **changes)]


def evaluate(**changes):
    return ["evaluate.py", *flags(EVALUATE, **changes), "--no-fd"]


# ---------------------------------------------------------------- broken inputs

def png16(path, rgb):
    """uint8 (H, W, 3) -> a 16-bit-per-channel RGB PNG (what Blender writes at color depth 16),
    encoded by hand: PIL writes no 16-bit RGB."""
    h, w, _ = rgb.shape
    rows = (rgb.astype(">u2") * 257).reshape(h, -1)
    raw = b"".join(b"\x00" + r.tobytes() for r in rows)

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    head = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head)
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def break_png(path, kind):
    """Replace the PNG at path by a broken or unusual one of the same picture."""
    path = Path(path)
    if kind == "missing":
        path.unlink()
        return
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "gray":
        Image.fromarray(rgb).convert("L").save(path)
    elif kind == "rgba":
        Image.fromarray(rgb).convert("RGBA").save(path)
    elif kind == "16bit":
        png16(path, rgb)
    elif kind == "16bit-gray":
        gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(path)  # PIL mode I;16
    elif kind == "size":
        Image.fromarray(rgb).resize((96, 72)).save(path)
    else:
        raise ValueError(kind)


KINDS = {"missing": "missing", "empty": "0 bytes", "truncated": "its first half only",
         "gray": "grayscale (L)", "rgba": "RGBA", "16bit": "16-bit RGB",
         "16bit-gray": "16-bit grayscale (I;16)", "size": "96x72"}


def png(where, kind):
    """Setup: break image 3 of the training set ("data") or of evaluate.py's folder ("images").
    A setup's .what describes its input in results."""
    name = "data/img_3.png" if where == "data" else "images/cond/3.png"

    def make(d):
        break_png(d / name, kind)
    make.what = f"{name} {KINDS[kind]}"
    return make


def text(name, content):
    """Setup: a file with this content."""
    def make(d):
        (d / name).write_text(content)
    make.what = f"{name} {content}"
    return make


def folder(name):
    """Setup: an empty folder."""
    def make(d):
        (d / name).mkdir()
    make.what = f"{name}/ empty"
    return make


def bare_state_dict(d):
    """Setup: the shipped judge saved as a bare state_dict (no {"model": ...} around it)."""
    import torch

    from evaluator import evaluation_model

    torch.save(evaluation_model(device="cpu").resnet18.state_dict(), d / "judge.pth")


bare_state_dict.what = "judge.pth torch.save(state_dict) of weights/judge"


# ---------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    name: str
    args: list  # script and arguments, run in the case folder
    says: str  # the error (or warning) line names this: the file, label or value
    setup: object = None  # setup(case folder) writes the broken input
    exit: int = 2  # the documented exit status (2: bad input)
    warns: bool = False  # exit 0 with a documented "warning:" line
    run: bool = False  # the folder holds runs/r/, a finished one-step run
    fsize: int = 0  # RLIMIT_FSIZE in bytes (a full disk), 0 = none


CASES = [
    # labels typed on the command line (every one is a string there: a number is a name)
    Case("labels-unknown", sample(labels="red sphere, pink cube"), "'pink cube'"),
    Case("labels-empty", sample(labels=""), "--labels"),
    Case("labels-duplicate", sample(labels="red sphere, red sphere"), "'red sphere'"),
    Case("labels-number", sample(labels="red sphere, 7"), "'red sphere, 7'"),
    # condition files
    Case("conditions-unknown", sample(conditions="bad.json"), "'pink cube'",
         text("bad.json", '[["red sphere"], ["pink cube"]]')),
    Case("conditions-empty", sample(conditions="bad.json"), "bad.json[1]",
         text("bad.json", '[["red sphere"], []]')),
    Case("conditions-duplicate", sample(conditions="bad.json"), "'cyan cube'",
         text("bad.json", '[["cyan cube", "cyan cube"]]')),
    Case("conditions-non-string", sample(conditions="bad.json"), "bad.json[0]",
         text("bad.json", '[["red sphere", 7]]')),
    Case("conditions-nested-list", sample(conditions="bad.json"), "bad.json[0]",
         text("bad.json", '[["red sphere", ["cyan cube"]]]')),
    Case("conditions-object", sample(conditions="bad.json"), "bad.json",
         text("bad.json", '{"0": ["red sphere"]}')),
    Case("conditions-malformed-json", sample(conditions="bad.json"), "bad.json",
         text("bad.json", '[["red sphere"], ["cyan cube"')),
    # the training folder
    *[Case(f"train-png-{kind}", train(), "img_3.png", png("data", kind))
      for kind in ("missing", "empty", "truncated", "16bit-gray")],
    *[Case(f"train-png-{kind}", train(), "img_3.png", png("data", kind), exit=0, warns=True)
      for kind in ("gray", "rgba")],
    Case("train-png-16bit", train(), "", png("data", "16bit"), exit=0),
    Case("train-png-size", train(), "", png("data", "size"), exit=0),  # squash-resized
    # evaluate.py's folder
    *[Case(f"evaluate-png-{kind}", evaluate(), "3.png", png("images", kind))
      for kind in ("missing", "empty", "truncated", "16bit-gray")],
    *[Case(f"evaluate-png-{kind}", evaluate(), "3.png", png("images", kind), exit=0, warns=True)
      for kind in ("gray", "rgba", "size")],
    Case("evaluate-png-16bit", evaluate(), "", png("images", "16bit"), exit=0),
    # checkpoints
    Case("sample-checkpoint-missing", sample(checkpoint="nowhere"), "nowhere"),
    Case("sample-checkpoint-empty", sample(checkpoint="empty"), "empty", folder("empty")),
    Case("sample-checkpoint-judge", sample(checkpoint="weights/judge"), "weights/judge"),
    Case("evaluate-checkpoint-ddpm", evaluate(checkpoint="weights/ddpm"), "weights/ddpm"),
    Case("evaluate-checkpoint-bare-state-dict", evaluate(checkpoint="judge.pth"), "",
         bare_state_dict, exit=0),  # documented: a bare state dict is unambiguous too
    # numbers
    Case("train-max-steps-0", train(max_steps=0), "--max-steps"),
    Case("train-batch-size-0", train(batch_size=0), "--batch-size"),
    Case("sample-guidance-negative", sample(labels="red sphere", guidance=-1), "--guidance"),
    # a full disk while a checkpoint is written; the earlier checkpoint must survive
    Case("train-disk-full", train(max_steps=2, resume="latest"), "checkpoint-2", run=True,
         fsize=256 * 2**10),
    Case("export-disk-full", ["evaluator.py", "--export", "checkpoint.pth"], "checkpoint.pth",
         text("checkpoint.pth", "an earlier export"), fsize=256 * 2**10),
    # a diverging run stops with exit status 1 and names the last good checkpoint
    Case("train-nan-loss", train(max_steps=3, lr="1e30", warmup_steps=0, save_every=1,
                                 log_every=1), "checkpoint-1", exit=1),
]


# ---------------------------------------------------------------- the shared tiny data set

def make_base(base):
    """The tiny data set every case folder starts from."""
    rng = np.random.default_rng(0)
    (base / "data").mkdir(parents=True)
    spec = {}
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            base / "data" / f"img_{i}.png")
        spec[f"img_{i}.png"] = [LABELS[i]]
    (base / "spec.json").write_text(json.dumps(spec))
    (base / "cond.json").write_text(json.dumps(CONDITIONS))
    (base / "images" / "cond").mkdir(parents=True)
    for i in range(len(CONDITIONS)):
        shutil.copy(base / "data" / f"img_{i}.png", base / "images" / "cond" / f"{i}.png")


def make_run(base, cold=False):
    """base/runs/r/: a finished one-step training run, for the cases that resume it."""
    exit, _, stderr = run_command(train(), base, cold=cold)
    if exit != 0:
        raise RuntimeError(f"the base training run failed: {stderr.strip()[-500:]}")


def case_folder(base, case, parent):
    d = Path(tempfile.mkdtemp(prefix=f"{case.name}-", dir=parent))
    for name in ("data", "images"):
        shutil.copytree(base / name, d / name)
    for name in ("spec.json", "cond.json"):
        shutil.copy(base / name, d / name)
    if case.run:
        shutil.copytree(base / "runs", d / "runs")
    (d / "weights").symlink_to(ROOT / "weights")
    if case.setup:
        case.setup(d)
    return d


# ---------------------------------------------------------------- running and judging

# Third-party modules the scripts import: a fork server imports them once, and each case is a
# fork of it that runs the script as __main__ (the repository's modules are imported afresh).
# Why: importing them takes most of a failing command's seconds on a slow CPU.
PRELOAD = ["numpy", "PIL.Image", "tqdm", "scipy.stats", "torch", "torch.nn.functional",
           "torch.utils.data", "torchvision", "safetensors.torch", "accelerate",
           "accelerate.utils", "diffusers", "diffusers.configuration_utils", "diffusers.models",
           "diffusers.schedulers", "diffusers.optimization", "diffusers.training_utils",
           "diffusers.utils.torch_utils", "matplotlib.pyplot"]
_FORKS = None


def forks():
    """The fork server's context; the server starts once per process, with one thread per
    case (two cases share two cores; torch reads OMP_NUM_THREADS when it loads)."""
    global _FORKS
    if _FORKS is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # for the server only: the caller's stays
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        _FORKS = ctx
    return _FORKS


def run_script(args, cwd, fsize, out, err, status):
    """In a forked child: run a repository script as __main__, exiting as python would; the
    exit status also goes to the file status (the fork server's report of it can be lost when
    two cases end at once)."""
    if fsize:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [str(ROOT / args[0]), *args[1:]]
    sys.path[0] = str(ROOT)  # python puts the script's folder first
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # what python does with an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # as at the end of python; multiprocessing then flushes and exits
    Path(status).write_text(str(code))
    sys.exit(code)


def run_command(args, cwd, fsize=0, cold=False):
    """Run a repository script as a user would, from cwd -> (exit status, stdout, stderr).
    cold: a fresh `python script.py` process instead of a fork of the warm server."""
    if cold:
        def limit():  # only a system call: safe between fork and exec
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            p = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd,
                               env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                               preexec_fn=limit if fsize else None)
        except subprocess.TimeoutExpired as e:
            return "timeout", e.stdout or "", e.stderr or ""
        return p.returncode, p.stdout, p.stderr
    with tempfile.TemporaryDirectory(prefix="streams-") as t:
        out, err, status = (Path(t) / name for name in ("stdout", "stderr", "status"))
        p = forks().Process(target=run_script,
                            args=(args, str(cwd), fsize, str(out), str(err), str(status)))
        p.start()
        p.join(TIMEOUT_S)
        exit = p.exitcode  # negative: killed by that signal
        if p.is_alive():
            p.kill()
            p.join()
            exit = "timeout"
        elif status.is_file():  # what the script exited with, however the server reported it
            exit = int(status.read_text())
        return exit, *(f.read_text(errors="replace") if f.is_file() else "" for f in (out, err))


def snapshot(folder):
    """{path relative to folder: sha1} of its files; links (weights/) are not followed."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                out[p.relative_to(folder).as_posix()] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def lost_files(before, after):
    """Files there before that are gone, or changed (a run's records only count when gone)."""
    return sorted(p for p, h in before.items()
                  if p not in after or (after[p] != h and not RUN_RECORDS.match(p)))


def stderr_lines(stderr):
    """What stderr shows once progress bars have cleared: its non-blank lines."""
    lines = (s.strip() for s in re.split(r"[\r\n]", stderr))
    return [s for s in lines if s and not TQDM_FRAME.search(s)]


def verdict(case, exit, lines, traceback, lost):
    """Why a case misses the bar ("" when it meets it)."""
    errors = [s for s in lines if s.startswith("error: ")]
    warnings = [s for s in lines if s.startswith("warning: ")]
    if traceback:
        return "traceback"
    if exit != case.exit:
        return f"exit status {exit}, expected {case.exit}"
    if lost:
        return f"lost {', '.join(lost)}"
    if case.exit != 0:
        if len(errors) != 1 or lines[-1] != errors[0]:
            return "no single error line at the end of stderr"
        if case.says not in errors[0]:
            return f"the error does not name {case.says}"
    elif case.warns and not any(case.says in w for w in warnings):
        return f"no warning naming {case.says}"
    return ""


def run_case(case, base, parent, cold=False):
    from dataloader import command_line

    d = case_folder(base, case, parent)
    before = snapshot(d)
    t = time.time()
    exit, _, stderr = run_command(case.args, d, case.fsize, cold)
    lines = stderr_lines(stderr.replace(str(d), "<case>"))  # no temporary names in results
    lost = lost_files(before, snapshot(d))
    traceback = "Traceback (most recent call last)" in stderr
    left = sorted(p for p in snapshot(d) if ".tmp" in p)
    limit = f"ulimit -f {case.fsize // 1024}; " if case.fsize else ""
    what = [getattr(case.setup, "what", "")] + ["runs/r/ a finished one-step run"] * case.run
    r = {"case": case.name, "command": limit + command_line(case.args),
         "input": "; ".join(w for w in what if w), "exit": exit,
         "expected_exit": case.exit, "stderr_first_line": lines[0] if lines else "",
         "error": next((s for s in lines if s.startswith("error: ")), ""),
         "stderr_lines": len(lines), "traceback": traceback, "files_lost": lost,
         "temporaries_left": left, "seconds": round(time.time() - t, 1)}
    r["problem"] = verdict(case, exit, lines, traceback, lost)
    r["ok"] = not r["problem"]
    shutil.rmtree(d, ignore_errors=True)
    return r


def run_matrix(cases, workers=2, cold=False):
    """Run the cases against one shared tiny data set, workers at a time -> their results."""
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        base = Path(tmp) / "base"
        make_base(base)
        if any(c.run for c in cases):
            make_run(base, cold)
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda c: run_case(c, base, tmp, cold), cases))


def summary(results):
    """Markdown-ready lines: one per case, then the count."""
    out = ["| case | exit | first line of stderr | traceback | files lost | verdict |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        first = r["stderr_first_line"].replace("|", "\\|")
        first = first if len(first) <= 110 else first[:107] + "..."
        out.append(f"| {r['case']} | {r['exit']} | {first} | {'yes' if r['traceback'] else 'no'}"
                   f" | {', '.join(r['files_lost']) or 'no'} | {r['problem'] or 'ok'} |")
    ok = sum(r["ok"] for r in results)
    out.append(f"\n{ok} of {len(results)} cases meet the bar")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only the cases whose name contains this")
    ap.add_argument("--workers", type=int, default=2, help="cases run at once")
    ap.add_argument("--cold", action="store_true",
                    help="each case a fresh `python script.py` process, not a fork of the warm "
                         "server (slower: every case imports torch)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    import torch  # only for the record

    from dataloader import _rel, command_line, write_json

    cases = [c for c in CASES if args.k in c.name]
    t = time.time()
    results = run_matrix(cases, args.workers, args.cold)
    print(summary(results))
    write_json(args.out, {"bench": "robustness", "device": "cpu", "torch": torch.__version__,
                          "command": command_line(), "runner": "cold" if args.cold else "warm",
                          "seconds": round(time.time() - t),
                          "passing": sum(r["ok"] for r in results), "cases": results})
    print(f"wrote {_rel(args.out)}")


if __name__ == "__main__":
    main()
