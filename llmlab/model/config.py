"""The configuration of an llmlab decoder-only language model.

`LlmlabConfig` is a transformers `PretrainedConfig` (a dataclass in transformers 5), so it saves to
and loads from `config.json` and the Auto classes find it by `model_type = "llmlab"`. Field names
match the YAML pipeline spec's `model:` section one to one.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import PretrainedConfig

POSITIONAL_ENCODINGS = ("sinusoidal", "rope", "alibi", "yarn")
ATTENTION_TYPES = ("mha", "mqa", "gqa")
NORM_TYPES = ("layernorm", "rmsnorm")
ACTIVATION_NAMES = ("relu", "gelu", "silu", "leaky_relu", "swiglu")


class LlmlabConfig(PretrainedConfig):
    """Architecture hyper-parameters; see the module docstring. Validated in `__post_init__`."""

    model_type: ClassVar[str] = "llmlab"
    # Standard names used by transformers / peft utilities, routed to our field names.
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_len",
    }

    positional_encoding: str = "rope"  # rotary: the modern default, extrapolates with YaRN
    attention_type: str = "gqa"  # grouped-query: KV cache n_heads / n_kv_heads times smaller
    norm_type: str = "rmsnorm"  # cheaper than LayerNorm, same quality at this scale
    activation: str = "swiglu"  # gated FFN as in Llama
    d_model: int = 256  # residual stream width
    n_heads: int = 8  # query heads; head_dim = d_model // n_heads
    n_kv_heads: int = 2  # only used by attention_type "gqa"
    d_ff: int = 688  # FFN hidden width (~8/3 * d_model, rounded, for SwiGLU)
    n_layers: int = 4  # transformer blocks
    vocab_size: int = 4096  # set from the tokenizer by the pipeline
    max_seq_len: int = 256  # training context length
    dropout: float = 0.0  # embedding, attention and residual dropout; 0 for small-data pretraining
    sliding_window: int | None = None  # None: full causal attention
    attention_bias: bool = False  # biases on q/k/v/o projections (Llama: none)
    norm_eps: float = 1e-6  # added to the variance in the norms
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix: fewer params
    rope_theta: float = 10000.0  # RoPE base (RoFormer / Llama 1-2 default)
    yarn_scale: float = 4.0  # YaRN context extension factor s
    yarn_original_max_seq_len: int | None = None  # None: max_seq_len // yarn_scale
    yarn_beta_fast: float = 32.0  # YaRN ramp: dims rotating more than this are extrapolated
    yarn_beta_slow: float = 1.0  # YaRN ramp: dims rotating less than this are interpolated
    initializer_range: float = 0.02  # std of the normal init (GPT-2)
    bos_token_id: int | None = None  # set from the tokenizer
    eos_token_id: int | None = None  # set from the tokenizer
    pad_token_id: int | None = None  # set from the tokenizer

    def __post_init__(self, **kwargs):
        # YAML / JSON may give ints for float fields; keep the saved config canonical.
        for name in ("dropout", "norm_eps", "rope_theta", "yarn_scale", "yarn_beta_fast",
                     "yarn_beta_slow", "initializer_range"):
            setattr(self, name, float(getattr(self, name)))
        self._validate()
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        choices = {
            "positional_encoding": POSITIONAL_ENCODINGS,
            "attention_type": ATTENTION_TYPES,
            "norm_type": NORM_TYPES,
            "activation": ACTIVATION_NAMES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.num_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by {self.num_kv_heads} KV heads")
        if self.positional_encoding in ("rope", "yarn") and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.positional_encoding == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal embeddings need an even d_model, got {self.d_model}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.yarn_scale < 1.0:
            raise ValueError(f"yarn_scale must be >= 1, got {self.yarn_scale}")

    @property
    def num_kv_heads(self) -> int:
        """Effective number of key/value heads: n_heads (MHA), 1 (MQA) or n_kv_heads (GQA)."""
        return {"mha": self.n_heads, "mqa": 1, "gqa": self.n_kv_heads}[self.attention_type]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def yarn_original_context(self) -> int:
        """The context length the rotary frequencies were (notionally) trained on, for YaRN."""
        if self.yarn_original_max_seq_len is not None:
            return self.yarn_original_max_seq_len
        return max(1, int(self.max_seq_len // self.yarn_scale))
