"""Training objectives as pure functions of (model, batch). Each returns a summed loss; the loop
normalises by `count()` over the whole optimizer step (so gradient accumulation is exact).

    obj = OBJECTIVES["lm"]()
    loss_sum, extra = obj(model, {"input_ids": x, "labels": x})
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class LanguageModeling:
    """Causal LM loss on every token (pretraining); also SFT when labels mask the prompt."""

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return target_count(batch["labels"])

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        return token_nll_sum(logits, batch["labels"]), {}


OBJECTIVES = {"lm": LanguageModeling}
