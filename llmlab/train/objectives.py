"""Training objectives as pure functions of (model, batch). Each returns a summed loss; the loop
normalises by `count()` over the whole optimizer step (so gradient accumulation is exact).

    obj = OBJECTIVES["lm"]()
    loss_sum, extra = obj(model, {"input_ids": x, "labels": x})
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmlab.model.model import LlmlabForCausalLM, core_model

IGNORE_INDEX = -100  # label value that contributes no loss (prompt tokens, padding)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood; labels aligned with inputs (shifted here)."""
    # (B, T, V) -> (B*(T-1), V) predictions for positions 1..T-1
    pred = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    target = labels[:, 1:].reshape(-1)
    return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """How many positions carry a next-token target (the normaliser of the mean loss)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


CHUNK_AUTO_BYTES = 256 * 2**20  # `chunked_loss: auto` chunks when a micro-batch's fp32 logits would exceed this


def chunk_tokens_for(model: torch.nn.Module, tokens: int, mode: str, chunk_tokens: int) -> int:
    """How many positions per chunk the loss or log-probs of a forward over `tokens` positions take
    through llmlab's head: 0 = the plain path (full logits). `mode` "on" chunks, "off" never,
    "auto" when the fp32 logits would exceed CHUNK_AUTO_BYTES; other models always take the plain path."""
    if mode == "off" or not isinstance(core_model(model), LlmlabForCausalLM):
        return 0
    vocab = core_model(model).config.vocab_size
    return chunk_tokens if mode == "on" or tokens * vocab * 4 > CHUNK_AUTO_BYTES else 0


class LanguageModeling:
    """Causal LM loss on every token (pretraining); also SFT when labels mask the prompt.

    `chunked`: "auto" (when a micro-batch's fp32 logits would exceed CHUNK_AUTO_BYTES), "on" or
    "off" — llmlab's own model then computes the loss through its head `chunk_tokens` scored
    positions at a time (`llmlab.model.loss`) and never builds the full logits; other models
    always take the plain path."""

    def __init__(self, chunked: str = "off", chunk_tokens: int = 4096):
        self.chunked, self.chunk_tokens = chunked, chunk_tokens

    @classmethod
    def from_train(cls, train: Any) -> "LanguageModeling":
        return cls(str(train.chunked_loss), train.loss_chunk_tokens)

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return target_count(batch["labels"])

    def use_chunks(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
        return chunk_tokens_for(model, batch["input_ids"].numel(), self.chunked, self.chunk_tokens) > 0

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.use_chunks(model, batch):
            return model(**inputs, labels=batch["labels"], loss_chunk_tokens=self.chunk_tokens).loss, {}
        logits = model(**inputs).logits
        return token_nll_sum(logits, batch["labels"]), {}


OBJECTIVES = {"lm": LanguageModeling}
