"""The architecture rules of an llmlab decoder, without transformers or torch.

`LlmlabConfig` (a transformers config) and `SpecArchitecture` (what plans and estimates build from a
spec's `model:` block, in milliseconds) share them: the allowed choices, the validation and the
derived sizes.
"""

from __future__ import annotations

from typing import Any

POSITIONAL_ENCODINGS = ("sinusoidal", "rope", "alibi", "yarn")
ATTENTION_TYPES = ("mha", "mqa", "gqa")
NORM_TYPES = ("layernorm", "rmsnorm")
ACTIVATION_NAMES = ("relu", "gelu", "silu", "leaky_relu", "swiglu")


def kv_heads(arch: Any) -> int:
    """Effective number of key/value heads: n_heads (MHA), 1 (MQA) or n_kv_heads (GQA)."""
    return {"mha": arch.n_heads, "mqa": 1, "gqa": arch.n_kv_heads}[arch.attention_type]


def validate(arch: Any) -> None:
    """ValueError naming the first rule `arch` breaks."""
    choices = {"positional_encoding": POSITIONAL_ENCODINGS, "attention_type": ATTENTION_TYPES, "norm_type": NORM_TYPES,
               "activation": ACTIVATION_NAMES}
    for name, allowed in choices.items():
        if getattr(arch, name) not in allowed:
            raise ValueError(f"{name}={getattr(arch, name)!r}; expected one of {allowed}")
    if arch.d_model % arch.n_heads:
        raise ValueError(f"d_model={arch.d_model} is not divisible by n_heads={arch.n_heads}")
    if arch.n_heads % kv_heads(arch):
        raise ValueError(f"n_heads={arch.n_heads} is not divisible by {kv_heads(arch)} KV heads")
    if arch.positional_encoding in ("rope", "yarn") and (arch.d_model // arch.n_heads) % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {arch.d_model // arch.n_heads}")
    if arch.positional_encoding == "sinusoidal" and arch.d_model % 2:
        raise ValueError(f"sinusoidal embeddings need an even d_model, got {arch.d_model}")
    if getattr(arch, "sliding_window", None) is not None and arch.sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {arch.sliding_window}")
    if float(getattr(arch, "yarn_scale", 1.0)) < 1.0:
        raise ValueError(f"yarn_scale must be >= 1, got {arch.yarn_scale}")


class DerivedSizes:
    """The sizes an architecture's fields imply, for `LlmlabConfig` and `SpecArchitecture` alike."""

    d_model: int
    n_heads: int

    @property
    def num_kv_heads(self) -> int:
        """Effective number of key/value heads: n_heads (MHA), 1 (MQA) or n_kv_heads (GQA)."""
        return kv_heads(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class SpecArchitecture(DerivedSizes):
    """A spec's `model:` block with its vocabulary, read the way `LlmlabConfig` reads it (same
    names, same rules, same derived sizes), for estimates that need no model."""

    model_type = "llmlab"

    def __init__(self, **fields: Any):
        self.__dict__.update(fields)
        validate(self)
