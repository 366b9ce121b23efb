"""Where llmlab keeps its state: caches, the MLflow store, Prefect's home, stage-result records.

Everything lives under one state directory, `<project>/.llmlab` by default (the current working
directory is the project), or `$LLMLAB_STATE_DIR` when set. Nothing here imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir(create: bool = True) -> Path:
    """The state directory; created on first use (unless `create` is False)."""
    root = Path(os.environ.get("LLMLAB_STATE_DIR") or Path.cwd() / ".llmlab").resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    """A folder under the state directory's cache (extracted text, tokenized data); created."""
    path = state_dir().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


QUIET_OFFLINE_DEFAULTS = {
    # nothing leaves 127.0.0.1 (MLflow accepts only the string "true" for DO_NOT_TRACK)
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # every tqdm bar (lm-evaluation-harness draws several per benchmark); llmlab prints its own progress lines
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_defaults() -> None:
    """No telemetry, no progress bars from transformers, datasets or anything drawing with tqdm; values
    already set win. Call before those libraries are imported (tqdm reads its setting at import)."""
    for key, value in QUIET_OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
