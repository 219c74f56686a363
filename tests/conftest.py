"""Tests import the top-level scripts as modules and run them as subprocesses from the repo root."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Two slow cores: keep torch from oversubscribing them when tests run subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    # diffusers' multistep schedulers call np.array() on a torch tensor, which numpy 2 flags;
    # harmless, and not ours to fix: keep it out of every test run's summary.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
