"""Model-level memory primitives, from a config alone: the model's shape, its weight tensors,
parameter counts, activation bytes per token and KV-cache bytes.

    shape = model_shape(config)             # an LlmlabConfig or any transformers config (Llama, Qwen2, GPT-2, ...)
    count_parameters(shape)                 # unique parameters (tied embeddings once)
    activation_bytes_per_token(shape, 512)  # what a training forward pass keeps for backward, per token
    kv_cache_bytes(shape, sequences=64, length=512)

`llmlab.estimate` puts these together per pipeline stage (what each stage kind holds at its peak);
`estimate_training_memory` is the older one-line estimate for a bare config (pretraining shape).
Every number here is a rule of thumb, not a measurement: fp32 (4 bytes per value, as llmlab trains on
CPU today), no allocator overhead, no scratch memory inside kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FP32_BYTES = 4  # llmlab trains in fp32 on CPU (bf16 autocast only on hardware fast at it)

# Activations a training forward pass keeps for the backward pass, in fp32 values per token, counted
# from what autograd saves in llmlab's pre-norm block (llmlab/model/model.py, attention.py, ffn.py)
# and checked with tests/helpers.py's PeakMemory (d_model 64 and 128, 2 and 4 layers, swiglu and gelu):
# - per layer: 5 x d_model (the two norm outputs, the mid-block residual, the block output, one more
#   temporary), 3 x the query width (rotated queries, the attention output and its (B, T, H*D) copy),
#   2 x the key/value width (rotated keys, values), one log-sum-exp per head (SDPA's flash kernel keeps
#   no score matrix), 2 per-token norm statistics, and the FFN: 4 x d_ff gated (gate, up, silu(gate),
#   their product) or 2 x d_ff plain (up, activation);
# - outside the layers: 3 x d_model (embeddings, final norm input and output).
# Korthikanti et al. 2022 (arXiv 2205.05198) count the same tensors for a GPT block: 34 bytes per token
# per hidden unit in 16-bit, i.e. 17 values, which is 8 d_model + 2 x 4 d_model here.
BLOCK_MODEL_WIDTHS = 5
BLOCK_QUERY_WIDTHS = 3
BLOCK_KV_WIDTHS = 2
NORM_STATISTICS = 2
GATED_FFN_WIDTHS = 4
PLAIN_FFN_WIDTHS = 2
OUTSIDE_MODEL_WIDTHS = 3
# With padding (an attention mask), SDPA's CPU kernel keeps a float mask row of `seq_len` values per
# token per layer (measured with PeakMemory: +4 x seq_len bytes per token per layer).
MASK_VALUES_PER_KEY = 1

# transformers families with a plain (non-gated) MLP, LayerNorm and biases (GPT-2 style); every other
# family is read as Llama-like: gated MLP, RMSNorm, no biases unless the config says so.
PLAIN_MLP_FAMILIES = frozenset({"gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi",
                                "codegen", "mpt", "starcoder2"})
QKV_BIAS_FAMILIES = frozenset({"qwen2", "qwen2_moe"})  # Qwen2 puts biases on q/k/v (not o) without a config field
DEFAULT_CONTEXT = 2048  # a config that names no context length (llmlab.runners.sft.model_context's fallback)


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a decoder-only transformer, from any config (see `model_shape`)."""

    d_model: int  # hidden size
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA/MQA: fewer than n_heads)
    head_dim: int  # usually d_model // n_heads
    d_ff: int  # feed-forward inner size
    vocab_size: int
    tie_embeddings: bool  # the output head shares the input embedding
    gated_ffn: bool  # SwiGLU-style gate/up/down (3 matrices) instead of up/down (2)
    max_context: int  # the model's context length (max_seq_len / max_position_embeddings)
    qkv_bias: bool = False  # biases on q/k/v projections
    o_bias: bool = False  # bias on the attention output projection
    ffn_bias: bool = False  # biases on the FFN projections
    norm_bias: bool = False  # LayerNorm (weight + bias) instead of RMSNorm (weight)
    learned_positions: int = 0  # rows of a learned position table (GPT-2); 0 for RoPE/ALiBi/sinusoidal

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_shape(config: Any) -> ModelShape:
    """The shape of an LlmlabConfig, any transformers PretrainedConfig, or any object with the same
    attribute names (e.g. a config.json read as a namespace). transformers' standard names come first
    (LlmlabConfig maps them to its own through `attribute_map`), then GPT-2's."""
    d = int(_first(config, "hidden_size", "d_model", "n_embd"))
    heads = int(_first(config, "num_attention_heads", "n_heads", "n_head"))
    family = str(getattr(config, "model_type", "") or "")
    if family == "llmlab":
        kv = int(config.num_kv_heads)
        gated, norm_bias = config.activation == "swiglu", config.norm_type == "layernorm"
        qkv_bias = o_bias = bool(config.attention_bias)
        ffn_bias = False
    else:
        kv = int(_first(config, "num_key_value_heads", "n_kv_heads") or heads)
        plain = family in PLAIN_MLP_FAMILIES
        gated, norm_bias = not plain, plain
        qkv_bias = plain or family in QKV_BIAS_FAMILIES or bool(getattr(config, "attention_bias", False))
        o_bias = plain or bool(getattr(config, "attention_bias", False))
        ffn_bias = plain or bool(getattr(config, "mlp_bias", False))
    head_dim = int(getattr(config, "head_dim", None) or d // heads)
    d_ff = int(_first(config, "intermediate_size", "d_ff", "n_inner", "ffn_dim") or 4 * d)
    context = _first(config, "max_position_embeddings", "max_seq_len", "n_positions", "seq_length")
    learned = int(context) if family in ("gpt2", "gpt_bigcode", "opt", "gpt_neo") and context else 0
    return ModelShape(d_model=d, n_layers=int(_first(config, "num_hidden_layers", "n_layers", "n_layer")), n_heads=heads,
                      n_kv_heads=kv, head_dim=head_dim, d_ff=d_ff, vocab_size=int(config.vocab_size),
                      tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)), gated_ffn=gated,
                      max_context=int(context or DEFAULT_CONTEXT), qkv_bias=qkv_bias, o_bias=o_bias, ffn_bias=ffn_bias,
                      norm_bias=norm_bias, learned_positions=learned)


@dataclass(frozen=True)
class Weight:
    """One kind of weight tensor: `copies` tensors of `shape` (n_layers copies for per-block weights)."""

    name: str  # module name as in llmlab and Llama: q_proj, ..., embed_tokens, lm_head; or norm / bias
    shape: tuple[int, ...]  # (out, in) for a matrix, (n,) for a vector
    copies: int
    role: str  # "hidden" (2-D inside the blocks), "embedding", "head", or "vector" (norms, biases)

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.copies


def weights(shape: ModelShape) -> list[Weight]:
    """Every weight tensor of the causal LM, by kind (tied embeddings once, as `parameters()` does)."""
    s, layers = shape, shape.n_layers
    out = [Weight("embed_tokens", (s.vocab_size, s.d_model), 1, "embedding")]
    if s.learned_positions:
        out.append(Weight("embed_positions", (s.learned_positions, s.d_model), 1, "embedding"))
    out += [Weight("q_proj", (s.q_dim, s.d_model), layers, "hidden"), Weight("k_proj", (s.kv_dim, s.d_model), layers, "hidden"),
            Weight("v_proj", (s.kv_dim, s.d_model), layers, "hidden"), Weight("o_proj", (s.d_model, s.q_dim), layers, "hidden")]
    if s.qkv_bias:
        out.append(Weight("qkv_bias", (s.q_dim + 2 * s.kv_dim,), layers, "vector"))
    if s.o_bias:
        out.append(Weight("o_bias", (s.d_model,), layers, "vector"))
    if s.gated_ffn:
        out.append(Weight("gate_proj", (s.d_ff, s.d_model), layers, "hidden"))
    out += [Weight("up_proj", (s.d_ff, s.d_model), layers, "hidden"), Weight("down_proj", (s.d_model, s.d_ff), layers, "hidden")]
    if s.ffn_bias:
        out.append(Weight("ffn_bias", ((2 if s.gated_ffn else 1) * s.d_ff + s.d_model,), layers, "vector"))
    norm = (2 if s.norm_bias else 1) * s.d_model
    out += [Weight("layer_norms", (2 * norm,), layers, "vector"), Weight("norm", (norm,), 1, "vector")]
    if not s.tie_embeddings:
        out.append(Weight("lm_head", (s.vocab_size, s.d_model), 1, "head"))
    return out


def count_parameters(model_or_config: Any) -> int:
    """Unique parameters (tied embeddings counted once): from a model (its `parameters()`), or
    analytically from a ModelShape, an LlmlabConfig or any transformers config."""
    if callable(getattr(model_or_config, "parameters", None)):  # a model (torch is not imported for configs)
        return sum(p.numel() for p in model_or_config.parameters())  # parameters() de-duplicates
    shape = model_or_config if isinstance(model_or_config, ModelShape) else model_shape(model_or_config)
    return sum(w.numel for w in weights(shape))


def activation_bytes_per_token(shape: ModelShape, seq_len: int, padded: bool = False, checkpointed: bool = False) -> int:
    """Bytes a training forward pass keeps for backward per token of the batch (all layers, fp32),
    without the logits (see `logits_bytes`). `padded`: the batch carries an attention mask (padded
    rows), which SDPA keeps per layer. `checkpointed` (gradient checkpointing): each block keeps only
    its input (the recomputed block: `recomputed_block_bytes_per_token`)."""
    s = shape
    ffn = (GATED_FFN_WIDTHS if s.gated_ffn else PLAIN_FFN_WIDTHS) * s.d_ff
    per_layer = (BLOCK_MODEL_WIDTHS * s.d_model + BLOCK_QUERY_WIDTHS * s.q_dim + BLOCK_KV_WIDTHS * s.kv_dim + s.n_heads
                 + NORM_STATISTICS + ffn + (MASK_VALUES_PER_KEY * seq_len if padded else 0))
    if checkpointed:  # each block's input; one block's own activations are `recomputed_block_bytes_per_token`
        return FP32_BYTES * (s.n_layers * s.d_model + OUTSIDE_MODEL_WIDTHS * s.d_model)
    return FP32_BYTES * (s.n_layers * per_layer + OUTSIDE_MODEL_WIDTHS * s.d_model)


def recomputed_block_bytes_per_token(shape: ModelShape, seq_len: int, padded: bool = False) -> int:
    """With gradient checkpointing: the activations of the one block being recomputed in the
    backward pass (after the loss's logits are gone)."""
    return (activation_bytes_per_token(shape, seq_len, padded) - FP32_BYTES * OUTSIDE_MODEL_WIDTHS * shape.d_model) // shape.n_layers


def logits_bytes(shape: ModelShape, tokens: int, copies: float = 1.0) -> int:
    """`copies` fp32 (tokens x vocab) tensors: logits, their loss copies and gradients."""
    return int(copies * tokens * shape.vocab_size * FP32_BYTES)


def kv_cache_bytes(shape: ModelShape, sequences: int, length: int) -> int:
    """A KV cache for `sequences` rows of `length` positions: keys and values of every layer, fp32
    (a transformers DynamicCache keeps (B, n_kv_heads, T, head_dim) keys and values per layer)."""
    return 2 * shape.n_layers * shape.kv_dim * length * sequences * FP32_BYTES


# Logit-sized fp32 tensors alive at a causal-LM training step's peak (token_nll_sum: the logits, the
# shifted (B, T-1, V) copy the loss reads, its log-softmax; the backward pass holds as many). Counted
# with PeakMemory on the pretrain and sft stages.
LM_LOSS_LOGIT_COPIES = 3


def estimate_training_memory(
    config: Any, batch_size: int, seq_len: int, optimizer_state_bytes_per_param: int = 8
) -> dict[str, int]:
    """Rule-of-thumb bytes of one fp32 pretraining step of `batch_size` x `seq_len` tokens (not a
    measurement): weights 4 B + grads 4 B + optimizer state (AdamW's two moments: 8 B) per parameter,
    and activations (`activation_bytes_per_token`) plus LM_LOSS_LOGIT_COPIES logit-sized tensors.
    For a pipeline stage (LoRA, DPO's reference, RL rollouts, ...) use `llmlab.estimate.estimate_stage`."""
    shape = config if isinstance(config, ModelShape) else model_shape(config)
    params = count_parameters(shape)
    tokens = batch_size * seq_len
    activations = tokens * activation_bytes_per_token(shape, seq_len) + logits_bytes(shape, tokens, LM_LOSS_LOGIT_COPIES)
    weights_bytes = params * FP32_BYTES
    grads = params * FP32_BYTES
    optimizer = params * optimizer_state_bytes_per_param
    return {
        "params": params,
        "weights_bytes": weights_bytes,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "activations_bytes": activations,
        "total_bytes": weights_bytes + grads + optimizer + activations,
    }
