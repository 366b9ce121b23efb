"""Next-token cross-entropy through the LM head in chunks: the fp32 logits of [batch, sequence,
vocabulary] never exist at once.

    loss_sum = chunked_nll_sum(hidden, model.lm_head, labels, chunk_tokens=4096)
    logps, entropy = chunked_target_logps(hidden, model.lm_head, targets, 4096, temperature=1.0, entropy=True)

Only positions with a target (label != -100 after the shift) are scored, so an SFT batch whose
prompts are masked pays for its answers only. Each chunk's logits are recomputed in the backward
pass (activation checkpointing of the head), so peak memory holds one chunk's logits, at the cost
of one more head matmul per chunk. Equal to `F.cross_entropy(head(hidden).float(), ...)` summed,
up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_nll(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, reduction="sum")  # (n, V) fp32 for this chunk only


def chunked_nll_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Summed next-token NLL of `labels` (aligned with the inputs; shifted here) from the final
    hidden states (B, T, d), `chunk_tokens` scored positions at a time."""
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # (B, T) -> (B*T,)
    keep = (target != IGNORE_INDEX).nonzero().squeeze(1)  # positions with a next-token target
    flat = hidden.reshape(-1, hidden.size(-1)).index_select(0, keep)  # (B*T, d) -> (n, d)
    target = target.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.size(0), chunk_tokens):
        piece, goal = flat[start:start + chunk_tokens], target[start:start + chunk_tokens]
        if torch.is_grad_enabled() and piece.requires_grad:
            total = total + checkpoint(_chunk_nll, head, piece, goal, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, piece, goal)
    return total



def _chunk_logps(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor, temperature: float,
                 entropy: bool) -> torch.Tensor:
    z = head(hidden).float() / temperature  # (n, V) fp32 for this chunk only
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, target[:, None]).squeeze(-1) - lse
    if not entropy:
        return logp
    return torch.stack([logp, lse - (torch.softmax(z, dim=-1) * z).sum(-1)])  # H = logsumexp(z) - sum p z


def chunked_target_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_tokens: int,
                         temperature: float = 1.0, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probabilities of `targets` (B, T) — position t's token under the softmax of
    head(hidden[:, t]) / temperature; IGNORE_INDEX positions get 0 — and, with `entropy`, the (B, T)
    entropy of that distribution; `chunk_tokens` positions at a time, each chunk's logits recomputed
    in the backward pass. What DPO's sequence log-probs and PPO/GRPO's token log-probs need,
    without the (B, T, V) logits."""
    B, T = targets.shape
    flat_target = targets.reshape(-1)
    keep = (flat_target != IGNORE_INDEX).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.size(-1)).index_select(0, keep)
    goal = flat_target.index_select(0, keep)
    pieces = []
    for start in range(0, flat.size(0), chunk_tokens):
        args = (head, flat[start:start + chunk_tokens], goal[start:start + chunk_tokens], temperature, entropy)
        if torch.is_grad_enabled() and flat.requires_grad:
            pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(*args))
    values = torch.cat(pieces, dim=-1) if pieces else hidden.new_zeros((2, 0) if entropy else (0,), dtype=torch.float32)
    rows = values if entropy else values[None]  # (k, n): log-probs, and entropies
    out = [hidden.new_zeros(B * T, dtype=torch.float32).index_put((keep,), row).view(B, T) for row in rows]
    return out[0], (out[1] if entropy else None)
