"""Bad input as users give it: the matrix of bench/bench_robustness.py (its CASES), every case
the real command line in a subprocess, judged by what a user sees."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_robustness as rb  # noqa: E402

@pytest.fixture(scope="module")
def results():
    return {r["case"]: r for r in rb.run_matrix(rb.CASES, workers=2)}


@pytest.mark.parametrize("case", rb.CASES, ids=[c.name for c in rb.CASES])
def test_bad_input(results, case):
    r = results[case.name]
    assert not r["traceback"], f"traceback: {r['command']}"
    assert r["exit"] == case.exit, f"{r['command']}: {r['stderr_first_line']}"
    assert not r["files_lost"], r["files_lost"]
    if case.exit:  # one line of error, naming what is wrong
        assert r["stderr_lines"] >= 1 and r["error"], r["stderr_first_line"]
    assert r["ok"], f"{r['problem']}: {r['command']}"


def test_case_names_are_unique():
    names = [c.name for c in rb.CASES]
    assert len(set(names)) == len(names)


def test_warm_runner_answers_like_a_fresh_python(results):
    """The fork server (which imports torch once for all cases) is what a user's own
    `python sample.py ...` does: the same exit status and the same lines."""
    case = next(c for c in rb.CASES if c.name == "labels-unknown")
    cold = rb.run_matrix([case], workers=1, cold=True)[0]
    warm = results[case.name]
    for key in ("exit", "stderr_first_line", "error", "stderr_lines", "traceback"):
        assert cold[key] == warm[key], key
