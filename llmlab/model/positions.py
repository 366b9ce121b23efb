"""Positional information: sinusoidal embeddings, rotary embeddings (RoPE, YaRN) and ALiBi.

Everything here is computed from position ids at call time; nothing is a registered buffer, because
transformers 5 `from_pretrained` builds models on the meta device and non-persistent buffers come
back uninitialised. Tables are tiny (positions x head_dim / 2) next to a forward pass.
"""

from __future__ import annotations

import math

import torch


def sinusoidal_embedding(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Absolute sinusoidal position embeddings, added to the token embeddings.

    Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762:
    PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)).
    positions: (B, T) int -> (B, T, dim).
    """
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, dim/2)
    # Interleave sin and cos so even dims hold sin, odd dims cos, as in the paper.
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (B, T, dim/2, 2)
    return pe.flatten(-2).to(dtype)  # (B, T, dim/2, 2) -> (B, T, dim)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """RoPE inverse frequencies theta^(-2i/d), i = 0 .. d/2 - 1: shape (head_dim / 2,).

    Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv 2104.09864.
    """
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def yarn_inv_freq(
    head_dim: int,
    theta: float,
    scale: float,
    original_max_seq_len: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, float]:
    """YaRN "NTK-by-parts" frequencies and the attention temperature factor (mscale).

    Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models",
    arXiv 2309.00071 (same construction as transformers' `_compute_yarn_parameters`).
    A dimension whose wavelength fits many times (> beta_fast rotations) in the original context
    keeps its RoPE frequency (extrapolation); one with fewer than beta_slow rotations is divided by
    `scale` (position interpolation); dimensions in between are blended with a linear ramp.
    cos/sin are multiplied by mscale = 0.1 ln(s) + 1, which scales attention logits by mscale^2.
    Returns (inv_freq of shape (head_dim / 2,), mscale).
    """
    extrapolated = rope_inv_freq(head_dim, theta, device)
    interpolated = extrapolated / scale

    def correction_dim(num_rotations: float) -> float:
        # The dimension index whose wavelength completes `num_rotations` turns over the context.
        return (head_dim * math.log(original_max_seq_len / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = (torch.arange(head_dim // 2, device=device, dtype=torch.float32) - low) / (high - low)
    # 1 for high-frequency dims (index < low): keep; 0 for low-frequency dims (index > high): interpolate.
    extrapolation_weight = 1.0 - ramp.clamp(0.0, 1.0)
    inv_freq = interpolated * (1.0 - extrapolation_weight) + extrapolated * extrapolation_weight
    mscale = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    return inv_freq, mscale


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for `apply_rotary`: positions (B, T) -> two (B, 1, T, head_dim) tensors."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    # rotate-half layout: the first and second halves of a head share frequencies.
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D/2) -> (B, T, D)
    cos = (emb.cos() * mscale).to(dtype)[:, None]  # (B, T, D) -> (B, 1, T, D), broadcast over heads
    sin = (emb.sin() * mscale).to(dtype)[:, None]
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query or key heads (B, H, T, D) by their positions (rotate-half form, as in Llama)."""
    return x * cos + _rotate_half(x) * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes, shape (n_heads,).

    Press et al. 2021, "Train Short, Test Long: Attention with Linear Biases", arXiv 2108.12409.
    For n a power of two the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^-8.
    Otherwise (the paper's reference code): take the slopes of the largest power of two below n,
    then every other slope of the sequence for twice that power, until n slopes.
    """

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two_slopes(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """Additive attention bias -slope * (i - j) for query index i, key index j: (1, H, Tq, Tk).

    Indices are token offsets in the (cached) sequence; distances between real tokens equal
    position-id distances under left padding and within a packed segment, which is all ALiBi uses.
    """
    distance = (query_index[:, None] - key_index[None, :]).to(torch.float32)  # (Tq, Tk)
    return -(slopes[:, None, None] * distance)[None]  # (H, Tq, Tk) -> (1, H, Tq, Tk)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids that count real tokens only: left padding gets 0 (it is masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
