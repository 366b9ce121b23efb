"""Reward-model training on preference pairs with the Bradley–Terry loss (InstructGPT, arXiv 2203.02155 §3.5):

    loss = −log σ(r(x, y_chosen) − r(x, y_rejected))

r is a sequence-classification model's single logit (`LlmlabForSequenceClassification`: a linear
head on the backbone's last hidden state). Batches are the dpo stage's (`llmlab.data.preference`):
2B right-padded rows, the B chosen then the B rejected. The score is read at the response's last
token (its end-of-turn marker): whatever the chat template adds after it (a newline) is masked, so
the reward sits on the same token it sits on when PPO scores `prompt + completion` text.

    objective = RewardObjective()
    loss_sum, metrics = objective(reward_model, batch)     # count(batch) = B pairs
    reward_evaluate(reward_model, val_batches)             # eval/loss, eval/accuracy, eval/margin
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmlab.train.objectives import IGNORE_INDEX


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(B,) −log σ(chosen − rejected)."""
    return -F.logsigmoid(chosen - rejected)


def response_end_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The attention mask cut after each row's last labelled (response) token."""
    labelled = batch["labels"] != IGNORE_INDEX
    cols = torch.arange(labelled.size(1), device=labelled.device).expand_as(labelled)
    last = torch.where(labelled, cols, torch.full_like(cols, -1)).max(dim=1).values
    last = torch.where(last >= 0, last, batch["attention_mask"].sum(1) - 1)  # no label: the last real token
    return batch["attention_mask"] * (cols <= last[:, None]).long()


def pair_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) scores of a 2B-row preference batch. What follows the response
    is masked and set to the pad id, so models that find the last token by the mask (ours) and by
    the pad id (transformers' classifiers) both read the score at the response's end."""
    mask = response_end_mask(batch)
    pad = getattr(getattr(getattr(model, "module", model), "config", None), "pad_token_id", None)  # DDP: the module's
    ids = batch["input_ids"] if pad is None else torch.where(mask.bool(), batch["input_ids"], torch.full_like(batch["input_ids"], pad))
    scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    half = scores.size(0) // 2
    return scores[:half], scores[half:]


class RewardObjective:
    """The loop protocol: count = pairs; the loss and metrics come back summed over pairs."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].size(0) // 2

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = pair_scores(model, batch)
        losses = bradley_terry_loss(chosen, rejected)
        with torch.no_grad():
            metrics = {"reward/accuracy": (chosen > rejected).float().sum(), "reward/margin": (chosen - rejected).sum(),
                       "reward/chosen": chosen.sum(), "reward/rejected": rejected.sum()}
        return losses.sum(), metrics


@torch.no_grad()
def reward_evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Held-out Bradley–Terry loss, pair accuracy (chosen scored higher) and mean margin."""
    device = next(model.parameters()).device
    objective = RewardObjective()
    totals = {"eval/loss": 0.0, "eval/accuracy": 0.0, "eval/margin": 0.0}
    pairs = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, m = objective(model, batch)
        totals["eval/loss"] += float(loss)
        totals["eval/accuracy"] += float(m["reward/accuracy"])
        totals["eval/margin"] += float(m["reward/margin"])
        pairs += objective.count(batch)
    return {k: v / max(pairs, 1) for k, v in totals.items()}
