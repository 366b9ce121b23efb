"""Next-token cross-entropy through the LM head in chunks: the fp32 logits of [batch, sequence,
vocabulary] never exist at once.

    loss_sum = chunked_nll_sum(hidden, model.lm_head, labels, chunk_tokens=4096)

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

