"""The llmlab decoder-only transformer: pre-norm blocks, the model, and the causal-LM head.

Module names mirror transformers' Llama (`model.embed_tokens`, `model.layers[i].input_layernorm`,
`.self_attn`, `.post_attention_layernorm`, `.mlp`, `model.norm`, `lm_head`), so a Llama export is a
rename. Positional variants (sinusoidal, RoPE, YaRN, ALiBi) are chosen by
`config.positional_encoding`; their tables are computed in `forward`, never stored as buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from llmlab.model.attention import Attention, build_attention_mask
from llmlab.model.config import LlmlabConfig
from llmlab.model.ffn import build_ffn
from llmlab.model.loss import chunked_nll_sum, chunked_target_logps
from llmlab.model.norms import NORMS
from llmlab.model.positions import (
    alibi_slopes,
    rope_inv_freq,
    rotary_cos_sin,
    sinusoidal_embedding,
    yarn_inv_freq,
)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlmlabConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = NORMS[config.norm_type](config.d_model, eps=config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = NORMS[config.norm_type](config.d_model, eps=config.norm_eps)
        self.mlp = build_ffn(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary, attn_mask, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rotary, attn_mask, cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 wherever the segment id changes: (B, T) -> (B, T)."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start


class LlmlabModel(nn.Module):
    """Embeddings, the stack of blocks and the final norm; returns the last hidden states."""

    def __init__(self, config: LlmlabConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = NORMS[config.norm_type](config.d_model, eps=config.norm_eps)
        # Plain-attribute cache of the (tiny) frequency / slope vectors, keyed by device.
        self._position_tables: dict[str, tuple[torch.Tensor, float]] = {}
        # set by transformers' activation_checkpointing_enable(): recompute each block in the backward
        self.gradient_checkpointing = False

    def _rotary_frequencies(self, device: torch.device) -> tuple[torch.Tensor, float]:
        key = f"{self.config.positional_encoding}:{device}"
        if key not in self._position_tables:
            c = self.config
            if c.positional_encoding == "yarn":
                table = yarn_inv_freq(c.head_dim, c.rope_theta, c.yarn_scale, c.yarn_original_context,
                                      c.yarn_beta_fast, c.yarn_beta_slow, device)
            else:
                table = (rope_inv_freq(c.head_dim, c.rope_theta, device), 1.0)
            self._position_tables[key] = table
        return self._position_tables[key]

    def _alibi_slopes(self, device: torch.device) -> torch.Tensor:
        key = f"alibi:{device}"
        if key not in self._position_tables:
            self._position_tables[key] = (alibi_slopes(self.config.n_heads).to(device), 1.0)
        return self._position_tables[key][0]

    def _positions(self, B, T, past_len, attention_mask, position_ids, segment_ids, device) -> torch.Tensor:
        """Position ids (B or 1, T): given, else restarting per segment, else from the padding mask."""
        if position_ids is not None:
            return position_ids
        if segment_ids is not None:
            return segment_positions(segment_ids)
        if attention_mask is not None:
            # Left padding: the first real token is position 0; padding gets clamped to 0.
            positions = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
            return positions[:, past_len:]  # (B, T_past + T) -> (B, T)
        return torch.arange(past_len, past_len + T, device=device)[None]  # (T,) -> (1, T)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        device = input_ids.device
        past_len = cache.get_seq_length() if cache is not None else 0
        pe = self.config.positional_encoding
        positions = self._positions(B, T, past_len, attention_mask, position_ids, segment_ids, device)

        x = self.embed_tokens(input_ids)
        if pe == "sinusoidal":
            x = x + sinusoidal_embedding(positions, self.config.d_model, x.dtype)
        x = self.dropout(x)

        rotary = None
        if pe in ("rope", "yarn"):
            inv_freq, mscale = self._rotary_frequencies(device)
            rotary = rotary_cos_sin(positions, inv_freq, mscale, x.dtype)
        slopes = self._alibi_slopes(device) if pe == "alibi" else None
        attn_mask = build_attention_mask(self.config, T, past_len, attention_mask, segment_ids, slopes, device, x.dtype)

        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = self._gradient_checkpointing_func(layer.__call__, x, rotary, attn_mask, None)
            else:
                x = layer(x, rotary, attn_mask, cache)
        return self.norm(x)


def core_model(model: nn.Module) -> nn.Module:
    """The model under DDP's and peft's wrappers (FSDP2 keeps the class)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class LlmlabCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the chunked log-probability path's outputs (see `forward`)."""

    logps: torch.FloatTensor | None = None
    entropy: torch.FloatTensor | None = None
    hidden: torch.FloatTensor | None = None


class LlmlabForCausalLM(PreTrainedModel, GenerationMixin):
    """The llmlab transformer with a language-modelling head; see the module docstring.

    GenerationMixin is there for peft (its causal-LM wrapper expects the generation hooks) and for
    `generate()`; llmlab samples with its own KV-cached loop (`llmlab.generate`), which drives this
    model and stock transformers models through the same cache protocol."""

    config_class = LlmlabConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlmlabConfig):
        super().__init__(config)
        self.model = LlmlabModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, initializer_range), zero biases, unit norms; residual output
        projections (o_proj, down_proj) get std / sqrt(2 n_layers) so the residual stream's
        variance does not grow with depth. `init.*` skip tensors already loaded from a checkpoint."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, tuple(NORMS.values())):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        loss_chunk_tokens: int = 0,
        logps_targets: torch.Tensor | None = None,
        logps_temperature: float = 1.0,
        logps_entropy: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab) and, with `labels` (aligned with input_ids, -100 = ignore), the
        mean next-token cross-entropy; the shift happens here. `cache` (a transformers Cache, as
        stock models take it) is extended in place; `use_cache` without one starts a DynamicCache.
        `logits_to_keep=k` computes the logits of the last k positions only (sampling needs one).
        `loss_chunk_tokens=n` with `labels`: the *summed* loss through the head n scored positions
        at a time (`llmlab.model.loss`), and no logits — the training objective's memory-light path.
        `logps_targets` (B, T): instead of logits, `.logps` (B, T) — the log-probability of the token
        each position predicts (-100: none; 0 there) under logits / `logps_temperature` — and with
        `logps_entropy` `.entropy` (B, T), through the head `loss_chunk_tokens` (default 4096)
        positions at a time; `.hidden` keeps the final hidden states (a value head reads them)."""
        if cache is None:
            cache = kwargs.get("past_key_values")  # the older transformers keyword
        if cache is None and use_cache:
            cache = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, segment_ids, cache)
        if logps_targets is not None:
            logps, entropy = chunked_target_logps(hidden, self.lm_head, logps_targets.to(hidden.device),
                                                  loss_chunk_tokens or 4096, logps_temperature, logps_entropy)
            return LlmlabCausalLMOutput(logits=None, logps=logps, entropy=entropy, hidden=hidden)
        if loss_chunk_tokens and labels is not None:
            loss = chunked_nll_sum(hidden, self.lm_head, labels.to(hidden.device), loss_chunk_tokens)
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # (B, T, d) -> (B, k, d)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Shift the labels, not the logits: slicing the logits would copy a (B, T, V) tensor.
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100).to(logits.device)  # (B, T-1) -> (B, T)
            loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]),  # (B, T, V) -> (B*T, V)
                shifted.reshape(-1),  # (B, T) -> (B*T,)
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None) -> torch.Tensor:
    """(B,) column of each row's last real token: the last set attention-mask position (left or
    right padding), else the last non-pad token, else the last column."""
    B, T = input_ids.shape
    if attention_mask is not None:
        real = attention_mask.bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    cols = torch.arange(T, device=input_ids.device).expand(B, T)
    return torch.where(real, cols, torch.zeros_like(cols)).max(dim=1).values


class LlmlabForSequenceClassification(PreTrainedModel):
    """The llmlab transformer with a linear `score` head read at each row's last real token: a
    reward model when `num_labels == 1` (the reward stage trains it with the Bradley-Terry loss).
    Built from a causal LM folder with `from_pretrained(path, num_labels=1)`: the backbone loads,
    the head starts fresh; the LM head is not used."""

    config_class = LlmlabConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _init_weights = LlmlabForCausalLM._init_weights

    def __init__(self, config: LlmlabConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlmlabModel(config)
        self.score = nn.Linear(config.d_model, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        """Logits (B, num_labels) at each row's last real token."""
        hidden = self.model(input_ids, attention_mask, position_ids)  # (B, T, d_model)
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, d_model)
        return SequenceClassifierOutput(logits=self.score(pooled))


def build_model(config: LlmlabConfig, seed: int | None = None) -> LlmlabForCausalLM:
    """A freshly initialised fp32 model; with `seed`, the same weights every time (the global
    RNG state is left untouched)."""
    if seed is None:
        return LlmlabForCausalLM(config).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlmlabForCausalLM(config).float()


def _register() -> None:
    """Saved llmlab models load through transformers' Auto classes."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.register(LlmlabConfig, LlmlabForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(LlmlabConfig, LlmlabForSequenceClassification, exist_ok=True)


_register()
