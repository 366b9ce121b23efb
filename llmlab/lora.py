"""LoRA adapters through peft: presets resolved by module role for each model family, wrapping,
saving and loading.

Presets (`lora.preset` in the spec) name *roles*; `resolve_targets` finds the modules that play them
in the loaded model, whatever its family calls them:

    minimal         the query and value projections (Hu et al. 2021's choice); a fused
                    query-key-value projection (GPT-2's c_attn, GPT-NeoX's query_key_value) whole
    attention_only  every projection of the attention block (q, k, v, o; fused qkv and its output)
    ffn_only        every projection of the feed-forward block (gate, up, down; GPT-2's c_fc and
                    c_proj; fc1, fc2; dense_h_to_4h, dense_4h_to_h)
    all             attention_only + ffn_only
    custom          the spec's `target_modules`, checked against the model's modules

A module's role comes from its block (a parent named like attn/attention or mlp/ffn/feed_forward)
and its own name. Names shared by both blocks (GPT-2's c_proj) are given with their block
(`attn.c_proj`, `mlp.c_proj`), which peft matches as a suffix of the full module name.

Only the adapters train (and, with `trainable_token_ids`, those rows of the input embedding:
special tokens a base model never saw). Adapters are saved in peft's format (`adapter_config.json`
+ `adapter_model.safetensors`) and reload with `peft.PeftModel.from_pretrained(base, adapter_dir)`.

    targets = resolve_targets(model, "minimal")
    model = apply_lora(model, r=8, alpha=16, dropout=0.0, targets=targets)
    trainable, total = trainable_share(model)
    save_adapters(model, out / "adapters" / "best", base_model="out/pretrain/model", tokenizer=tok)
    model = load_adapters("out/pretrain/model", out / "adapters" / "best")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmlab.checkpoint import atomic_dir
from llmlab.errors import UserError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

PRESETS = ("minimal", "attention_only", "ffn_only", "all", "custom")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LINEAR_TYPES = ("Linear", "Conv1D")  # torch.nn.Linear and transformers' GPT-2 style Conv1D
ATTENTION_BLOCKS = ("attn", "attention")  # substrings of an attention block's module name
FFN_BLOCKS = ("mlp", "ffn", "feed_forward", "feedforward")
# leaf name -> role, per block; a name missing here still counts for attention_only / ffn_only / all
ATTENTION_ROLES = {"q_proj": "q", "query": "q", "wq": "q", "k_proj": "k", "key": "k", "wk": "k",
                   "v_proj": "v", "value": "v", "wv": "v", "c_attn": "qkv", "query_key_value": "qkv",
                   "qkv_proj": "qkv", "Wqkv": "qkv", "qkv": "qkv", "W_pack": "qkv",
                   "o_proj": "o", "out_proj": "o", "dense": "o", "c_proj": "o", "wo": "o"}
MINIMAL_ROLES = ("q", "v")  # with a fused projection instead: "qkv"


class LoraTargetError(UserError):
    """The model has no module for what the preset asks; the message lists what it has."""


def linear_modules(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """(full name, block kind "attention" | "ffn" | "other", leaf name) of every linear layer in
    the transformer blocks (the LM head, embeddings and a score head excluded)."""
    out = []
    for name, module in model.named_modules():
        if type(module).__name__ not in LINEAR_TYPES or "." not in name:
            continue
        parent, leaf = name.rsplit(".", 1)
        block = parent.rsplit(".", 1)[-1].lower()
        kind = ("attention" if any(b in block for b in ATTENTION_BLOCKS)
                else "ffn" if any(b in block for b in FFN_BLOCKS) else "other")
        out.append((name, kind, leaf))
    return out


def _unique_names(chosen: list[tuple[str, str, str]], everything: list[tuple[str, str, str]]) -> list[str]:
    """The shortest names peft can match for the chosen modules: the leaf name when no module of
    another kind shares it, else `block.leaf`."""
    kinds_of: dict[str, set[str]] = {}
    for _, kind, leaf in everything:
        kinds_of.setdefault(leaf, set()).add(kind)
    names = []
    for full, kind, leaf in chosen:
        name = leaf if len(kinds_of[leaf]) == 1 else ".".join(full.rsplit(".", 2)[-2:])
        if name not in names:
            names.append(name)
    return names


def resolve_targets(model: torch.nn.Module, preset: str, custom: list[str] | None = None) -> list[str]:
    """Module names (for peft's target_modules) that play the preset's roles in `model`; see the
    module docstring. LoraTargetError naming the model's linear modules when nothing fits."""
    if preset not in PRESETS:
        raise ValueError(f"unknown LoRA preset {preset!r}; known: {', '.join(PRESETS)}")
    linears = linear_modules(model)
    available = sorted({".".join(full.rsplit(".", 2)[-2:]) for full, _, _ in linears})
    family = type(model).__name__
    if preset == "custom":
        if not custom:
            raise ValueError("LoRA preset 'custom' needs `target_modules`, e.g. [q_proj, v_proj]")
        unknown = [c for c in custom if not any(full == c or full.endswith("." + c) for full, _, _ in linears)]
        if unknown:
            raise LoraTargetError(f"LoRA target_modules {unknown} match no linear module of this {family}; its modules "
                                  f"(block.name): {', '.join(available)}")
        return list(custom)
    if custom:
        raise ValueError(f"LoRA `target_modules` is only used with preset 'custom', not {preset!r}; "
                         f"set preset: custom to choose modules yourself")
    attention = [m for m in linears if m[1] == "attention"]
    ffn = [m for m in linears if m[1] == "ffn"]
    if preset == "minimal":
        roles = {ATTENTION_ROLES.get(leaf) for _, _, leaf in attention}
        wanted = set(MINIMAL_ROLES) if set(MINIMAL_ROLES) <= roles else {"qkv"}
        chosen = [m for m in attention if ATTENTION_ROLES.get(m[2]) in wanted]
    else:
        chosen = {"attention_only": attention, "ffn_only": ffn, "all": attention + ffn}[preset]
    if not chosen:
        raise LoraTargetError(f"LoRA preset {preset!r} found no {'query/value' if preset == 'minimal' else preset} "
                              f"projection in this {family}; use preset: custom with target_modules from its modules "
                              f"(block.name): {', '.join(available) or 'none'}")
    return _unique_names(chosen, linears)


def is_lora_parameter(name: str) -> bool:
    return "lora_" in name


def is_adapter_parameter(name: str) -> bool:
    """LoRA matrices and peft's trainable-token deltas: everything an adapter folder holds."""
    return "lora_" in name or "trainable_tokens_" in name


def apply_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float,
               targets: list[str], trainable_token_ids: list[int] | None = None) -> PeftModel:
    """Wrap `model` with LoRA adapters (task CAUSAL_LM) on the `targets` modules (from
    `resolve_targets`); only the adapters are trainable. `trainable_token_ids` also trains those
    rows of the input embedding (tied output head included) through peft's trainable tokens — for
    chat special tokens a base model never saw, whose embeddings LoRA alone cannot fix; ids outside
    the embedding matrix are an error (resize the embeddings first)."""
    from peft import LoraConfig, get_peft_model

    extra = {}
    if trainable_token_ids:
        rows = model.get_input_embeddings().weight.shape[0]
        outside = sorted(i for i in set(trainable_token_ids) if not 0 <= i < rows)
        if outside:
            raise ValueError(f"token ids {outside[:5]} are outside the model's {rows} embedding rows: resize the "
                             f"embeddings to the tokenizer first")
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


def load_adapters(base_model: str | Path | torch.nn.Module, adapter_dir: str | Path, is_trainable: bool = False,
                  tokenizer=None) -> PeftModel:
    """The base model (a path/name, loaded in fp32 and eval mode, or a loaded model) with the
    adapters of `adapter_dir`; with `tokenizer`, the base's embeddings first grow to it (tokens added
    in training have their rows in the adapters)."""
    from peft import PeftModel

    from llmlab.models import fit_embeddings, load_causal_lm

    model = load_causal_lm(base_model).eval() if isinstance(base_model, (str, Path)) else base_model
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)


def lora_state(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter tensors only (for checkpoints of LoRA training: a fraction of the model)."""
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if is_lora_parameter(n)}
