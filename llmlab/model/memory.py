"""Parameter counts and a rule-of-thumb training-memory estimate, both from the config alone.

`estimate_training_memory` is a rule of thumb, not a measurement: it ignores allocator overhead,
framework workspace, temporary buffers and anything the attention kernel does not materialise.
"""

from __future__ import annotations

from torch import nn

from llmlab.model.config import LlmlabConfig

# Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
# (arXiv 2205.05198): a layer stores about s*b*h*(34 + 5*a*s/h) bytes of activations in 16-bit.
# The 34 bytes per token per hidden unit double in fp32; the 5*a*s^2*b term is the attention
# scores/softmax/dropout, which we count separately at 4 bytes per score.
ACTIVATION_BYTES_PER_TOKEN_PER_DIM = 34 * 2
ATTENTION_SCORE_BYTES = 4
FP32_BYTES = 4


def _norm_params(config: LlmlabConfig) -> int:
    return config.d_model * (2 if config.norm_type == "layernorm" else 1)  # LayerNorm adds a bias


def count_parameters(model_or_config: nn.Module | LlmlabConfig) -> int:
    """Unique parameters (tied embeddings counted once), from a model or analytically from a config."""
    if isinstance(model_or_config, nn.Module):
        return sum(p.numel() for p in model_or_config.parameters())  # parameters() de-duplicates
    c = model_or_config
    d, hd = c.d_model, c.head_dim
    q_out, kv_out = c.n_heads * hd, c.num_kv_heads * hd
    attention = d * q_out + 2 * d * kv_out + q_out * d
    if c.attention_bias:
        attention += q_out + 2 * kv_out + d
    ffn = (3 if c.activation == "swiglu" else 2) * d * c.d_ff
    per_layer = attention + ffn + 2 * _norm_params(c)
    embeddings = c.vocab_size * d
    lm_head = 0 if c.tie_word_embeddings else c.vocab_size * d
    return embeddings + c.n_layers * per_layer + _norm_params(c) + lm_head


def estimate_training_memory(
    config: LlmlabConfig, batch_size: int, seq_len: int, optimizer_state_bytes_per_param: int = 8
) -> dict[str, int]:
    """Rule-of-thumb bytes for fp32 training with AdamW (not a measurement).

    weights 4 B + grads 4 B + optimizer state (AdamW: two fp32 moments, 8 B) per parameter;
    activations ~ b*s*d_model*n_layers*68 B (Korthikanti et al. 2022, 34 B in 16-bit, doubled for
    fp32) + attention scores b*n_heads*s^2*n_layers*4 B + logits and their gradient b*s*vocab*4*2 B.
    """
    params = count_parameters(config)
    b, s = batch_size, seq_len
    activations = (
        b * s * config.d_model * config.n_layers * ACTIVATION_BYTES_PER_TOKEN_PER_DIM
        + b * config.n_heads * s * s * config.n_layers * ATTENTION_SCORE_BYTES
        + b * s * config.vocab_size * FP32_BYTES * 2
    )
    weights = params * FP32_BYTES
    grads = params * FP32_BYTES
    optimizer = params * optimizer_state_bytes_per_param
    return {
        "params": params,
        "weights_bytes": weights,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "activations_bytes": activations,
        "total_bytes": weights + grads + optimizer + activations,
    }
