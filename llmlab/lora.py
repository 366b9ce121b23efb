"""LoRA adapters through peft: presets of target modules, wrapping, saving and loading.

Presets (`lora.preset` in the spec) name the linear layers that get adapters; module names follow
Llama and our model alike:

    minimal         q_proj, v_proj                      (Hu et al. 2021's choice)
    attention_only  q_proj, k_proj, v_proj, o_proj
    ffn_only        gate_proj, up_proj, down_proj       (SwiGLU)   /   up_proj, down_proj (others)
    all             attention_only + ffn_only
    custom          the spec's `target_modules` list

Only the `lora_*` tensors train; everything else is frozen by peft. Adapters are saved in peft's
format (`adapter_config.json` + `adapter_model.safetensors`) and reload with
`peft.PeftModel.from_pretrained(base_model, adapter_dir)`.

    targets = target_modules("minimal", activation=config.activation)
    model = apply_lora(model, r=8, alpha=16, dropout=0.0, targets=targets)
    trainable, total = trainable_share(model)
    save_adapters(model, out / "adapters" / "best", base_model="out/pretrain/model", tokenizer=tok)
    model = load_adapters("out/pretrain/model", out / "adapters" / "best")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmlab.checkpoint import atomic_dir

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_FFN_MODULES = ("gate_proj", "up_proj", "down_proj")
PLAIN_FFN_MODULES = ("up_proj", "down_proj")
GATED_ACTIVATIONS = frozenset({"swiglu", "geglu", "silu_gated"})
PRESETS = ("minimal", "attention_only", "ffn_only", "all", "custom")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def ffn_modules(activation: str) -> list[str]:
    """The feed-forward projections of a model using `activation` (gated ones have gate_proj)."""
    return list(GATED_FFN_MODULES if activation in GATED_ACTIVATIONS else PLAIN_FFN_MODULES)


def target_modules(preset: str, activation: str = "swiglu", custom: list[str] | None = None) -> list[str]:
    """Module names a preset puts adapters on; `custom` is required for (and only for) "custom"."""
    if preset not in PRESETS:
        raise ValueError(f"unknown LoRA preset {preset!r}; known: {', '.join(PRESETS)}")
    if preset == "custom":
        if not custom:
            raise ValueError("LoRA preset 'custom' needs `target_modules`, e.g. [q_proj, v_proj]")
        return list(custom)
    if custom:
        raise ValueError(f"LoRA `target_modules` is only used with preset 'custom', not {preset!r}; "
                         f"set preset: custom to choose modules yourself")
    if preset == "minimal":
        return ["q_proj", "v_proj"]
    if preset == "attention_only":
        return list(ATTENTION_MODULES)
    if preset == "ffn_only":
        return ffn_modules(activation)
    return [*ATTENTION_MODULES, *ffn_modules(activation)]


def is_lora_parameter(name: str) -> bool:
    return "lora_" in name


def is_adapter_parameter(name: str) -> bool:
    """LoRA matrices and peft's trainable-token deltas: everything an adapter folder holds."""
    return "lora_" in name or "trainable_tokens_" in name


def apply_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float,
               targets: list[str], trainable_token_ids: list[int] | None = None) -> PeftModel:
    """Wrap `model` with LoRA adapters (task CAUSAL_LM) on the `targets` modules; only the
    adapters are trainable. `trainable_token_ids` also trains those rows of the input embedding
    (tied output head included) through peft's trainable tokens — for chat special tokens a base
    model never saw, whose random embeddings LoRA alone cannot fix. ValueError if no module of the
    model matches a target."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"LoRA target modules {missing} are not in the model; its leaf module "
                         f"names include {sorted(n for n in names if n.endswith('_proj'))}")
    extra = {}
    if trainable_token_ids:
        extra = {"trainable_token_indices": sorted(set(trainable_token_ids)),
                 "ensure_weight_tying": bool(getattr(model.config, "tie_word_embeddings", False))}
    config = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout),
                        target_modules=list(targets), task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        p.requires_grad_(is_adapter_parameter(name))
    return peft_model


def trainable_share(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), counting tied tensors once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def save_adapters(peft_model: PeftModel, out_dir: str | Path, base_model: str | Path | None = None,
                  tokenizer=None) -> Path:
    """Save the adapters in peft's format to `out_dir` atomically (and the tokenizer, when given, so
    the folder is self-contained). `base_model` is recorded as `base_model_name_or_path` in
    adapter_config.json (absolute when it is a local folder); the merge stage reads it from there."""
    out_dir = Path(out_dir)
    if base_model is not None:
        base = Path(base_model).expanduser()
        value = str(base.resolve()) if base.exists() else str(base_model)
        for cfg in peft_model.peft_config.values():
            cfg.base_model_name_or_path = value
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def load_base_model(name_or_path: str | Path) -> torch.nn.Module:
    """A saved causal LM (llmlab or any transformers architecture) in fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    import llmlab.model  # noqa: F401  registers the llmlab architecture with the Auto classes

    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=torch.float32)
    return model.eval()


def load_adapters(base_model: str | Path | torch.nn.Module, adapter_dir: str | Path,
                  is_trainable: bool = False) -> PeftModel:
    """The base model (a path/name, or a loaded model) with the adapters of `adapter_dir`."""
    from peft import PeftModel

    model = load_base_model(base_model) if isinstance(base_model, (str, Path)) else base_model
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)


def lora_state(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter tensors only (for checkpoints of LoRA training: a fraction of the model)."""
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if is_lora_parameter(n)}
