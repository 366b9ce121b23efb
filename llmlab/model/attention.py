"""Causal self-attention (MHA / MQA / GQA), its mask, and the KV cache.

- MHA: every query head has its own key/value head (Vaswani et al. 2017, arXiv 1706.03762).
- MQA: one key/value head shared by all query heads (Shazeer 2019, arXiv 1911.02150).
- GQA: groups of query heads share a key/value head (Ainslie et al. 2023, arXiv 2305.13245).
- Sliding window: a query at i sees keys i - window < j <= i (Mistral, arXiv 2310.06825;
  Longformer, arXiv 2004.05150). The cache keeps every key; the mask enforces the window.

One mask is built per forward pass (`build_attention_mask`) and shared by all layers: it combines
causality, the sliding window, left padding, packed-sequence segments and the ALiBi bias.

Incremental decoding uses transformers' cache protocol (a `transformers.Cache`, e.g. `DynamicCache`:
`cache.update(k, v, layer_idx)` appends and returns every key/value so far), so one sampler serves
this model and any stock transformers causal LM alike. Keys are cached after the rotary embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache

from llmlab.model.config import LlmlabConfig
from llmlab.model.positions import alibi_bias, apply_rotary


def build_attention_mask(
    config: LlmlabConfig,
    q_len: int,
    past_len: int,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The mask for `scaled_dot_product_attention`, or None when plain causal attention suffices.

    Returns a bool mask (B or 1, 1, Tq, Tk) with True = may attend, or, with ALiBi, an additive
    float mask (B or 1, H, Tq, Tk). attention_mask: (B, past_len + q_len) of 1/0;
    segment_ids: (B, q_len), only without a cache.
    """
    k_len = past_len + q_len
    if attention_mask is not None and attention_mask.shape[-1] != k_len:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {k_len} (past + new)")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # nothing padded: keep the fast path open
    if segment_ids is not None and past_len > 0:
        raise NotImplementedError("segment_ids with a non-empty KV cache are not supported")
    if (attention_mask is None and segment_ids is None and alibi_slopes is None
            and config.sliding_window is None and past_len == 0):
        return None  # the caller uses is_causal=True

    q_index = torch.arange(past_len, k_len, device=device)
    k_index = torch.arange(k_len, device=device)
    allowed = k_index[None, :] <= q_index[:, None]  # (Tq, Tk)
    if config.sliding_window is not None:
        allowed &= k_index[None, :] > q_index[:, None] - config.sliding_window
    allowed = allowed[None, None]  # (Tq, Tk) -> (1, 1, Tq, Tk)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, Tk) -> (B, 1, 1, Tk)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, Tq, Tk)
        allowed = allowed & same[:, None]  # (B, Tq, Tk) -> (B, 1, Tq, Tk)
    # A padding query would see no key at all and softmax would give NaN; let every query see
    # itself. Real queries never see a padding key, so their outputs are unaffected.
    allowed = allowed | (k_index[None, :] == q_index[:, None])[None, None]
    if alibi_slopes is None:
        return allowed
    bias = alibi_bias(alibi_slopes.to(device), q_index, k_index).to(dtype)  # (1, H, Tq, Tk)
    return bias.masked_fill(~allowed, float("-inf"))


class Attention(nn.Module):
    """Multi-head causal self-attention with n_heads query and config.num_kv_heads key/value heads.

    Covers MHA, MQA (arXiv 1911.02150) and GQA (arXiv 2305.13245) by the number of KV heads.
    """

    def __init__(self, config: LlmlabConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.n_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=bias)
        self.o_proj.is_residual_projection = True  # read by _init_weights (GPT-2 scaled init)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, T, H*D) -> (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # -> (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # -> (B, Hkv, T, D)
        if rotary is not None:
            cos, sin = rotary
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, T_past + T, D)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, H, T, D) -> (B, T, H*D)
        return self.o_proj(y)
