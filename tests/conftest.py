"""Test-wide settings: offline, no telemetry, all llmlab state in a temporary folder.

Environment variables are set at import time, before any test module imports prefect or mlflow.
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

_STATE = Path(tempfile.mkdtemp(prefix="llmlab-test-state-"))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "LLMLAB_STATE_DIR": str(_STATE),
    "PREFECT_HOME": str(_STATE / "prefect"),
    "LLMLAB_PREFECT_IDLE_SECONDS": "0",  # a run's local Prefect server stops when the run ends
}.items():
    os.environ[key] = value
(_STATE / "prefect").mkdir(parents=True, exist_ok=True)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs two workers (pytest-xdist): each takes its share of the cores, and llmlab subprocesses
    # inherit it, so the two never run more torch threads than there are cores (a run of two threads beside a
    # worker of one took the demo test 2.8 times as long as alone)
    threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from any test module


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A fresh llmlab state dir for one test (own caches, own MLflow store)."""
    path = tmp_path / "state"
    monkeypatch.setenv("LLMLAB_STATE_DIR", str(path))
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    # the demo test is the longest by far: first (make test keeps the collection order, --no-loadscope-reorder),
    # so that one worker runs it while the other runs the rest
    items.sort(key=lambda item: item.path.name != "test_demo_quality.py")

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def pytest_unconfigure(config):
    """The suite's state folder goes when the suite ends (servers the tests started are stopped by then)."""
    import shutil

    shutil.rmtree(_STATE, ignore_errors=True)
