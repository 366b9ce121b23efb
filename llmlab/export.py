"""Export a trained model: transformers format with our code, or a plain Llama checkpoint.

    export_model("out/sft/model", "out/export-hf", "hf")        # config.json model_type "llmlab"
    export_model("out/sft/model", "out/export-llama", "llama")  # config.json model_type "llama"
    llama_blockers(config)  # [] when the architecture maps onto Llama exactly, else the reasons

`hf` writes the model in transformers' format (config.json + model.safetensors, fp32); it loads
with `AutoModelForCausalLM.from_pretrained` once `import llmlab.model.model` has registered the "llmlab"
architecture. `llama` writes a stock `LlamaForCausalLM` checkpoint that transformers loads with no
code of ours; it is offered only when the architecture is Llama's: rotary positions (RoPE, or YaRN,
which maps exactly onto transformers' "yarn" rope_parameters), RMSNorm, SwiGLU, no sliding window;
MHA / GQA / MQA, q/k/v/o biases and tied or untied embeddings all map. Our module names mirror
Llama's, so the weights are copied under the same names; the exported logits equal ours (fp32).
Dropout is a training-time setting and is not carried over (Llama has only attention dropout).

Both formats are written atomically, with the tokenizer and its chat template (from `tokenizer`,
else the model folder). Problems raise `ExportError`, whose message names the model folder, what
blocks the export and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmlab.checkpoint import atomic_dir
from llmlab.errors import UserError

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

    from llmlab.model import LlmlabConfig

FORMATS = ("hf", "llama")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


class ExportError(UserError):
    """The model cannot be exported as asked; the message says which folder, why, and the fix."""


def llama_blockers(config: LlmlabConfig) -> list[str]:
    """Why `config` cannot be written as a stock Llama checkpoint with identical logits; [] if it can."""
    blockers = []
    pe = config.positional_encoding
    if pe not in ("rope", "yarn"):
        blockers.append(f"positional_encoding is {pe} (Llama uses rope)")
    if pe == "yarn":
        # transformers reads beta_fast/beta_slow with `or 32` / `or 1`: a zero would silently change.
        for name in ("yarn_beta_fast", "yarn_beta_slow"):
            if not getattr(config, name):
                blockers.append(f"{name} is 0 (transformers' yarn rope_parameters treat 0 as unset)")
    if config.norm_type != "rmsnorm":
        blockers.append(f"norm_type is {config.norm_type} (Llama uses rmsnorm)")
    if config.activation != "swiglu":
        blockers.append(f"activation is {config.activation} (Llama uses swiglu)")
    if config.sliding_window is not None:
        blockers.append(f"sliding_window is {config.sliding_window} (stock Llama has none)")
    return blockers


def _rope_parameters(config: LlmlabConfig) -> dict:
    if config.positional_encoding == "yarn":
        from llmlab.model.positions import yarn_inv_freq

        _, mscale = yarn_inv_freq(config.head_dim, config.rope_theta, config.yarn_scale,
                                  config.yarn_original_context, config.yarn_beta_fast, config.yarn_beta_slow)
        return {
            "rope_type": "yarn",
            "rope_theta": config.rope_theta,
            "factor": config.yarn_scale,
            "original_max_position_embeddings": config.yarn_original_context,
            "beta_fast": config.yarn_beta_fast,
            "beta_slow": config.yarn_beta_slow,
            "attention_factor": float(mscale),  # explicit: cos/sin are scaled exactly as ours
            "truncate": True,  # our correction range is floored/ceiled, as transformers' default
        }
    return {"rope_type": "default", "rope_theta": config.rope_theta}


def llama_config(config: LlmlabConfig) -> LlamaConfig:
    """The LlamaConfig equivalent to `config` (call `llama_blockers` first)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.norm_eps,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=_rope_parameters(config),
        attention_bias=config.attention_bias,
        attention_dropout=0.0,
        mlp_bias=False,
        dtype="float32",
    )


def _load_config(model_dir: Path):
    from transformers import AutoConfig

    import llmlab.model.config  # noqa: F401  registers the llmlab config with AutoConfig

    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise ExportError(f"Model folder not found: {model_dir} — pass a folder saved by llmlab "
                          f"(config.json + model.safetensors, e.g. <stage output>/model)")
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ExportError(f"could not read the model config in {model_dir}: {e}") from e


def _tokenizer_source(model_dir: Path, tokenizer: str | Path | None) -> str:
    if tokenizer is not None:
        return str(tokenizer)
    if any((model_dir / m).is_file() for m in TOKENIZER_MARKERS):
        return str(model_dir)
    raise ExportError(f"No tokenizer in {model_dir} ({' / '.join(TOKENIZER_MARKERS)} missing): the export "
                      f"must carry one — pass the tokenizer folder the model was trained with (--tokenizer)")


def _to_llama(model: PreTrainedModel, config: LlmlabConfig) -> PreTrainedModel:
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(llama_config(config)).float()
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = llama.load_state_dict(state, strict=False)
    # With tied embeddings lm_head.weight is the embedding matrix and need not be given.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"the weights do not map onto Llama: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]} — use --format hf")
    if config.tie_word_embeddings and llama.lm_head.weight is not llama.model.embed_tokens.weight:
        raise ExportError("the Llama model did not tie lm_head to the embeddings — use --format hf")
    return llama.eval()


def export_model(model_dir: str | Path, out_dir: str | Path, fmt: str = "hf",
                 tokenizer: str | Path | None = None) -> Path:
    """Export the model of `model_dir` to `out_dir` as `fmt` ("hf" or "llama"), with the tokenizer
    (from `tokenizer`, else `model_dir`) and its chat template. Returns `out_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} for {model_dir}; expected one of {FORMATS}")
    config = _load_config(model_dir)
    if fmt == "llama":
        if getattr(config, "model_type", None) != "llmlab":
            raise ExportError(f"Cannot export {model_dir} as Llama: it is a {config.model_type!r} model, "
                              f"not an llmlab one — use --format hf")
        blockers = llama_blockers(config)
        if blockers:
            raise ExportError(
                f"Cannot export {model_dir} as a stock Llama checkpoint; its architecture differs from "
                f"Llama's in: " + "; ".join(blockers) + ". Use --format hf (transformers format with "
                "llmlab's model code, loadable after `import llmlab.model`), or train a model with "
                "positional_encoding rope/yarn, norm_type rmsnorm, activation swiglu and no sliding_window")
    tok_source = _tokenizer_source(model_dir, tokenizer)

    from llmlab.models import load_causal_lm
    from llmlab.tokenizer import load_tokenizer

    try:
        model = load_causal_lm(model_dir).eval()
        tok = load_tokenizer(tok_source)
    except (OSError, ValueError) as e:
        raise ExportError(f"could not load {model_dir} (tokenizer {tok_source}): {e}") from e
    if fmt == "llama":
        model = _to_llama(model, config)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return out_dir
