"""The llmlab model: config, architecture, parameter and memory estimates.

Importing this package registers the "llmlab" architecture with transformers' Auto classes, so
`AutoConfig.from_pretrained` / `AutoModelForCausalLM.from_pretrained` load saved llmlab models.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from llmlab.model.config import LlmlabConfig
from llmlab.model.memory import count_parameters, estimate_training_memory
from llmlab.model.model import LlmlabForCausalLM, LlmlabForSequenceClassification

AutoConfig.register("llmlab", LlmlabConfig, exist_ok=True)
AutoModelForCausalLM.register(LlmlabConfig, LlmlabForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(LlmlabConfig, LlmlabForSequenceClassification, exist_ok=True)


def build_model(config: LlmlabConfig, seed: int | None = None) -> LlmlabForCausalLM:
    """A freshly initialised fp32 model; with `seed`, the same weights every time (the global
    RNG state is left untouched)."""
    if seed is None:
        return LlmlabForCausalLM(config).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlmlabForCausalLM(config).float()


__all__ = [
    "LlmlabConfig",
    "LlmlabForCausalLM",
    "LlmlabForSequenceClassification",
    "build_model",
    "count_parameters",
    "estimate_training_memory",
]
