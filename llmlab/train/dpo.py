"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290).

With z = (log πθ(yw|x) − log πref(yw|x)) − (log πθ(yl|x) − log πref(yl|x)), the log-probabilities
summed over the response tokens only (prompt and padding masked with IGNORE_INDEX):

    loss = (1 − ε) · −log σ(β z) + ε · −log σ(−β z)      (ε = label_smoothing: conservative DPO)
         + sft_weight · NLL(yw | x) / |yw|                (RPO, Pang et al. 2024: mean NLL per
                                                           chosen-response token)
    rewards/chosen = β (log πθ(yw|x) − log πref(yw|x)), rewards/rejected likewise,
    margin = chosen − rejected, accuracy = [rewards/chosen > rewards/rejected]

Batches come from `llmlab.data.preference`: 2B rows, the B chosen sequences then the B rejected
ones. The objective follows the loop's protocol: `count(batch)` is B (pairs), and `__call__`
returns the loss and the metrics summed over the pairs, so the loop divides by the step's pairs.

    objective = DPOObjective(beta=0.2, reference=model_reference(frozen_copy))
    # or, LoRA: the same peft model with its adapters switched off
    objective = DPOObjective(beta=0.2, reference=model_reference(peft_model, disable_adapters=True))
    loss_sum, metrics = objective(model, batch)

Reference log-probabilities come from `batch["ref_logps"]` when present (precomputed, e.g. by
`attach_reference_logps`), else from the `reference` callable, run under no_grad.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from llmlab.train.objectives import IGNORE_INDEX, chunk_tokens_for

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "segment_ids")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probabilities of the labelled tokens: position t's logits predict label
    t+1 (shifted here, like `token_nll_sum`); IGNORE_INDEX positions contribute 0."""
    pred = logits[:, :-1].float()
    target = labels[:, 1:]
    token_logps = -F.cross_entropy(pred.reshape(-1, pred.size(-1)), target.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none")
    return token_logps.view(target.shape).sum(-1)


def response_logps(model: torch.nn.Module, batch: dict, chunked: str = "off", chunk_tokens: int = 4096) -> torch.Tensor:
    """(B,) `sequence_logps` of the batch's labels under `model`; with chunking on (or "auto" and
    big logits) llmlab's model scores them through its head in chunks, never building (B, T, V)."""
    labels = batch["labels"]
    n = chunk_tokens_for(model, labels.numel(), chunked, chunk_tokens)
    if n:
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts label t+1
        return model(**_model_inputs(batch), logps_targets=targets, loss_chunk_tokens=n).logps.sum(-1)
    return sequence_logps(model(**_model_inputs(batch)).logits, labels)


def response_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """(B,) how many labelled (predicted) tokens each sequence has."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses (B,), chosen_rewards (B,), rejected_rewards (B,)) from summed sequence
    log-probabilities; the rewards are detached (metrics)."""
    if not beta > 0:
        raise ValueError(f"DPO beta must be > 0, not {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"DPO label_smoothing must be in [0, 0.5), not {label_smoothing}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    logits = beta * (chosen_logratio - rejected_logratio)
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def model_reference(model: torch.nn.Module, disable_adapters: bool = False, chunked: str = "off",
                    chunk_tokens: int = 4096) -> Callable[[dict], torch.Tensor]:
    """A reference callable: batch -> (2B,) summed response log-probs of `model`, in eval mode
    (restored afterwards) and under no_grad. With `disable_adapters`, `model` is a peft model whose
    adapters are switched off for the call (the policy's own base weights as the reference).
    `chunked` / `chunk_tokens` as `response_logps`."""

    @torch.no_grad()
    def reference(batch: dict) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            ctx = model.disable_adapter() if disable_adapters else contextlib.nullcontext()
            with ctx:
                return response_logps(model, batch, chunked, chunk_tokens)
        finally:
            model.train(was_training)

    return reference


def _as_reference(reference) -> Callable[[dict], torch.Tensor]:
    return model_reference(reference) if isinstance(reference, torch.nn.Module) else reference


class DPOObjective:
    """The DPO loss as a training objective (see the module docstring)."""

    def __init__(self, beta: float = 0.2, label_smoothing: float = 0.0, sft_weight: float = 0.0,
                 reference: Callable[[dict], torch.Tensor] | torch.nn.Module | None = None,
                 chunked: str = "off", chunk_tokens: int = 4096):
        if not beta > 0:
            raise ValueError(f"DPO beta must be > 0, not {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPO label_smoothing must be in [0, 0.5), not {label_smoothing}")
        if not sft_weight >= 0:
            raise ValueError(f"DPO sft_weight must be >= 0, not {sft_weight}")
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.sft_weight = sft_weight
        self.reference = None if reference is None else _as_reference(reference)
        self.chunked, self.chunk_tokens = chunked, chunk_tokens

    @staticmethod
    def _pairs(batch: dict) -> int:
        rows = batch["input_ids"].shape[0]
        if rows % 2:
            raise ValueError(f"a preference batch has 2B rows (B chosen, then B rejected); this one has {rows}")
        return rows // 2

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return self._pairs(batch)

    def reference_logps(self, batch: dict) -> torch.Tensor:
        if batch.get("ref_logps") is not None:
            return batch["ref_logps"]
        if self.reference is None:
            raise ValueError("DPO needs reference log-probabilities: the batch has no 'ref_logps' "
                             "and the objective was given no reference")
        with torch.no_grad():
            return self.reference(batch)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B = self._pairs(batch)
        labels = batch["labels"]
        logps = response_logps(model, batch, self.chunked, self.chunk_tokens)
        ref = self.reference_logps(batch).detach().to(device=logps.device, dtype=logps.dtype)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:B], logps[B:], ref[:B], ref[B:], self.beta, self.label_smoothing)
        loss = losses.sum()
        if self.sft_weight:
            n_tokens = response_token_counts(labels[:B]).clamp(min=1).to(logps.dtype)
            loss = loss + self.sft_weight * (-logps[:B] / n_tokens).sum()
        metrics = {
            "dpo/accuracy": (chosen_rewards > rejected_rewards).float().sum(),
            "dpo/margin": (chosen_rewards - rejected_rewards).sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
        }
        return loss, metrics


@torch.no_grad()
def dpo_evaluate(model: torch.nn.Module, objective: DPOObjective, batches: list[dict]) -> dict[str, float]:
    """Held-out DPO loss, preference accuracy, margin and rewards (means over pairs)."""
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    pairs = 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, extra = objective(model, batch)
            n = objective.count(batch)
            pairs += n
            for key, value in {"eval/loss": loss, **{f"eval/{k.split('/')[-1] if k.startswith('dpo/') else k}": v
                                                     for k, v in extra.items()}}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
    return {k: v / max(pairs, 1) for k, v in totals.items()}


def precompute_reference_logps(reference_model, batches: Iterable[dict]) -> list[torch.Tensor]:
    """(2B,) reference log-probs of each batch, in order (on the CPU); `reference_model` is a model
    (run in eval mode) or a reference callable."""
    reference = _as_reference(reference_model)
    return [reference(batch).detach().float().cpu() for batch in batches]


def attach_reference_logps(reference_model, pairs: list[dict], batch_size: int, pad_id: int,
                           device: torch.device | str | None = None) -> list[dict]:
    """Store each pair's reference log-probs in it as `ref_logps` = (chosen, rejected), so batches
    built from these pairs carry `ref_logps` and training needs no reference model. Returns `pairs`
    (changed in place)."""
    from llmlab.data.preference import eval_batches

    batches = eval_batches(pairs, batch_size, pad_id)
    if device is not None:
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    for start, logps in zip(range(0, len(pairs), batch_size),
                            precompute_reference_logps(reference_model, batches)):
        B = logps.shape[0] // 2
        for k in range(B):
            pairs[start + k]["ref_logps"] = (float(logps[k]), float(logps[B + k]))
    return pairs
