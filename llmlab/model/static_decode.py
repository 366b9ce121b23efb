"""Decoding with a static KV cache, one fixed-shape step that CUDA graphs can capture.

    decoder = StaticDecoder.for_model(model)          # None: this model takes the dynamic path
    logits = decoder.prefill(input_ids, attention_mask, max_new_tokens)   # (B, V) of the last position
    logits = decoder.step(next_tokens)                                     # (B, V), one token per row

The dynamic path (`llmlab.generate` with a `DynamicCache`) grows every layer's keys by one column per
token and rebuilds the mask each step: shapes change, Python runs between kernels, and on a GPU the
step is bound by launches, not by reading the weights. Here the keys and values live in buffers
sized for prompt + new tokens, allocated once; a step writes its column at a device-side index and
attends over the whole buffer with a mask that hides the columns not yet written (and left padding).
Every step has the same shapes and no host synchronisation, so on CUDA it is compiled once with
torch.compile's "reduce-overhead" mode, which replays it as a CUDA graph; on CPU it runs eagerly
(and `llmlab.generate` keeps the dynamic path there unless asked). The prompt is run once through
the ordinary forward pass (a `DynamicCache`), then copied into the buffers.

Covers llmlab's own model (with or without peft adapters) with rotary, YaRN or sinusoidal positions
and no sliding window; ALiBi's biases and windows depend on absolute key positions and take the
dynamic path, as do stock transformers models. Greedy outputs equal the dynamic path's (tested).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from llmlab.model.model import LlmlabForCausalLM, core_model
from llmlab.model.positions import positions_from_mask, rotary_cos_sin, sinusoidal_embedding


class _StaticKV:
    """The cache protocol's `update` over preallocated (B, Hkv, L, D) buffers: writes the new
    column(s) at `index` (a device tensor) and returns the whole buffers."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor):
        self.keys, self.values, self.index = keys, values, index

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.index, k.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, self.index, v.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]


class StaticDecoder:
    """A static-cache decoder for one model; see the module docstring."""

    def __init__(self, model: torch.nn.Module, compile: bool):
        self.model = model  # the model as given (peft-wrapped or not): its layers carry the adapters
        self.lm = core_model(model)
        self.compile = compile
        self._compiled = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        lm = core_model(model)
        if not isinstance(lm, LlmlabForCausalLM):
            return False
        cfg = lm.config
        return cfg.positional_encoding in ("rope", "yarn", "sinusoidal") and cfg.sliding_window is None

    @classmethod
    def for_model(cls, model: torch.nn.Module, compile: bool | None = None) -> "StaticDecoder | None":
        """A decoder when the model supports the static path (None otherwise); `compile` defaults
        to whether the model is on CUDA."""
        if not cls.supports(model):
            return None
        device = next(model.parameters()).device
        return cls(model, device.type == "cuda" if compile is None else compile)

    # -- one step: fixed shapes, device-side index, no host syncs
    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
              index: torch.Tensor) -> torch.Tensor:
        inner = self.lm.model
        cfg = self.lm.config
        x = inner.embed_tokens(input_ids)  # (B, 1, d)
        rotary = None
        if cfg.positional_encoding == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.d_model, x.dtype)
        else:
            inv_freq, mscale = inner._rotary_frequencies(x.device)
            rotary = rotary_cos_sin(positions, inv_freq, mscale, x.dtype)
        cache = _StaticKV(self.keys, self.values, index)
        for layer in inner.layers:
            x = layer(x, rotary, key_mask, cache)
        return self.lm.lm_head(inner.norm(x))[:, -1, :]  # (B, 1, d) -> (B, V)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run the (left-padded) prompts, allocate buffers for `max_new_tokens` more, and return
        the last position's logits (B, V)."""
        B, P = input_ids.shape
        L = P + max_new_tokens
        dynamic = DynamicCache()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=positions_from_mask(attention_mask), cache=dynamic, use_cache=True, logits_to_keep=1)
        self.keys, self.values = [], []
        for layer_idx in range(len(self.lm.model.layers)):
            k, v = _layer_kv(dynamic, layer_idx)
            kb = k.new_zeros(B, k.size(1), L, k.size(3))
            vb = v.new_zeros(B, v.size(1), L, v.size(3))
            kb[:, :, :P], vb[:, :, :P] = k, v
            if self.compile:
                torch._dynamo.mark_static_address(kb)
                torch._dynamo.mark_static_address(vb)
            self.keys.append(kb)
            self.values.append(vb)
        self.valid = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        self.valid[:, :P] = attention_mask.bool()
        self.next_position = positions_from_mask(attention_mask)[:, -1:] + 1  # (B, 1)
        self.index = torch.full((1,), P, dtype=torch.long, device=input_ids.device)
        return out.logits[:, -1, :]

    def step(self, tokens: torch.Tensor, running: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token per row (B,) — a finished row's (`running` False) is written but masked,
        as the dynamic path does — and return the next logits (B, V)."""
        B = tokens.size(0)
        self.valid[:, self.index] = running[:, None] if running is not None else True
        key_mask = self.valid.clone()
        key_mask.scatter_(1, self.index.expand(B, 1), True)  # every query sees itself (as the dynamic mask does)
        fn = self._step
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(self._step, mode="reduce-overhead", dynamic=False)
            fn = self._compiled
        logits = fn(tokens[:, None], self.next_position, key_mask[:, None, None, :], self.index)
        self.next_position = self.next_position + 1
        self.index = self.index + 1
        return logits.clone() if self.compile else logits  # a CUDA graph reuses its output buffer


def _layer_kv(cache: DynamicCache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A DynamicCache's keys and values of one layer, across transformers versions."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer_idx].keys, layers[layer_idx].values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]
