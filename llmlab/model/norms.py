"""Normalisation layers, looked up by `config.norm_type` in `NORMS`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / sqrt(mean(x^2) + eps) * weight, no centring and no bias.

    Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", arXiv 1910.07467.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so low-precision activations do not lose the mean of squares.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """Standard LayerNorm with weight and bias (Ba et al. 2016, arXiv 1607.06450)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}
