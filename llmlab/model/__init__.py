"""The llmlab model: config, architecture, parameter and memory estimates.

Importing `llmlab.model.model` (which any of the model classes or `build_model` does) registers the
"llmlab" architecture with transformers' Auto classes, so `AutoConfig.from_pretrained` /
`AutoModelForCausalLM.from_pretrained` load saved llmlab models. The names below are loaded on first
use, so `llmlab.model.memory` and `llmlab.model.config` (what plans and estimates read) come without
torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {
    "LlmlabConfig": "llmlab.model.config",
    "LlmlabForCausalLM": "llmlab.model.model",
    "LlmlabForSequenceClassification": "llmlab.model.model",
    "build_model": "llmlab.model.model",
    "count_parameters": "llmlab.model.memory",
    "estimate_training_memory": "llmlab.model.memory",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'llmlab.model' has no attribute {name!r}")


__all__ = sorted(_HOMES)
