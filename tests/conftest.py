"""Tests import the top-level scripts as modules and run them as subprocesses from the repo root."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Two slow cores: keep torch from oversubscribing them when tests run subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")
