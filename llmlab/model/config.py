"""The configuration of an llmlab decoder-only language model.

`LlmlabConfig` is a transformers `PretrainedConfig` (a dataclass in transformers 5), so it saves to
and loads from `config.json` and the Auto classes find it by `model_type = "llmlab"`. Field names
match the YAML pipeline spec's `model:` section one to one.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import PretrainedConfig

from llmlab.model.architecture import (  # noqa: F401  (the choices, re-exported)
    ACTIVATION_NAMES,
    ATTENTION_TYPES,
    NORM_TYPES,
    POSITIONAL_ENCODINGS,
    DerivedSizes,
    validate,
)


class LlmlabConfig(DerivedSizes, PretrainedConfig):
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
        validate(self)  # llmlab.model.architecture: the rules a spec's model block is held to as well

    @property
    def yarn_original_context(self) -> int:
        """The context length the rotary frequencies were (notionally) trained on, for YaRN."""
        if self.yarn_original_max_seq_len is not None:
            return self.yarn_original_max_seq_len
        return max(1, int(self.max_seq_len // self.yarn_scale))


def _register() -> None:
    """Saved llmlab configs load through `AutoConfig` (the model classes register in `llmlab.model.model`)."""
    from transformers import AutoConfig

    AutoConfig.register("llmlab", LlmlabConfig, exist_ok=True)


_register()
