"""Merge LoRA adapters into their base model: a plain model folder with no LoRA weights.

    merge_adapters("out/sft/adapters/best", "out/pretrain/model", "out/merged")
    merge_adapters("out/sft/adapters/best", None, "out/merged")  # base from adapter_config.json
    merge_stage_output("out/sft", "out/merged")                  # finds the stage's adapters

The result is written atomically in transformers' format (config.json + model.safetensors), fp32,
with the tokenizer (and its chat template) of the adapter folder, else of the base model. Its
logits equal the unmerged model's (W + B·A·alpha/r folded into W). Problems raise `MergeError`,
whose message names the path and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmlab.checkpoint import atomic_dir
from llmlab.errors import UserError
from llmlab.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_lora_parameter, load_adapters
from llmlab.models import ModelLoadError
from llmlab.tokenizer import load_tokenizer

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
# Where a stage output keeps adapters, in order of preference.
STAGE_ADAPTER_DIRS = ("adapters/best", "adapters/final", "adapters", ".")


class MergeError(UserError):
    """The adapters cannot be merged; the message says which path and how to fix it."""


def _adapter_weights_file(adapter_dir: Path) -> Path | None:
    for name in ADAPTER_WEIGHTS:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    return None


def _adapter_keys(weights: Path) -> list[str]:
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return list(f.keys())
    import torch

    return list(torch.load(weights, map_location="cpu", weights_only=True))


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of an adapter folder, checked; MergeError with the fix otherwise."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise MergeError(
            f"Adapter folder not found: {adapter_dir} — pass the folder that holds "
            f"adapter_config.json and adapter_model.safetensors (a LoRA stage writes them to "
            f"<stage output>/adapters/best and /final), or a stage output folder with --stage")
    path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict) or "peft_type" not in config:
            raise ValueError("no 'peft_type' in it")
        if str(config["peft_type"]).upper() != "LORA":
            raise ValueError(f"peft_type is {config['peft_type']!r}, not LORA")
    except (OSError, ValueError) as e:
        raise MergeError(
            f"Could not load LoRA config: {path} — {type(e).__name__}: {e}. The folder must be "
            f"saved by peft (`save_pretrained` of a LoRA model, as llmlab's LoRA stages do); re-run "
            f"the LoRA training stage, or point to the right adapter folder") from e
    weights = _adapter_weights_file(adapter_dir)
    keys = _adapter_keys(weights) if weights is not None else []
    if not any(is_lora_parameter(k) for k in keys):
        where = weights if weights is not None else adapter_dir
        raise MergeError(
            f"Checkpoint doesn't have LoRA parameters: {where} — "
            + ("no adapter_model.safetensors in the folder" if weights is None
               else "its tensors have no lora_A/lora_B weights (a full model or an empty adapter?)")
            + ". Merge only folders written by a stage with `lora:` set; a stage trained without "
              "LoRA already wrote a full model, which needs no merge")
    return config


def _resolve_base(config: dict, adapter_dir: Path, base_model: str | Path | None) -> str:
    if base_model is not None:
        return str(base_model)
    base = config.get("base_model_name_or_path")
    if not base:
        raise MergeError(
            f"Could not load LoRA config: {adapter_dir / ADAPTER_CONFIG} — it names no "
            f"base_model_name_or_path; pass the base model explicitly (--base <model folder>)")
    path = Path(base).expanduser()
    if not path.is_absolute() and not path.exists() and (adapter_dir / path).exists():
        return str(adapter_dir / path)
    return str(base)


def _tokenizer_source(adapter_dir: Path, base: str) -> str | None:
    for candidate in (adapter_dir, Path(base)):
        if any((candidate / m).is_file() for m in TOKENIZER_MARKERS):
            return str(candidate)
    if not Path(base).exists():
        return base  # a hub model: its tokenizer lives there too
    return None


def merged_model(adapter_dir: str | Path, base_model: str | Path | None = None) -> tuple[Any, Any]:
    """(plain model, tokenizer or None): the adapters of `adapter_dir` folded into `base_model` (a folder
    or hub name; None: the one in adapter_config.json), in memory. The base's embeddings first grow to
    the adapters' tokenizer when training added tokens (their rows are in the adapters)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    base = _resolve_base(config, adapter_dir, base_model)
    tok_source = _tokenizer_source(adapter_dir, base)
    tokenizer = load_tokenizer(tok_source) if tok_source is not None else None
    try:
        peft_model = load_adapters(base, adapter_dir, tokenizer=tokenizer)
    except ModelLoadError as e:
        raise MergeError(f"could not load the base model {base!r} of {adapter_dir}: {e} — pass the "
                         f"model folder the adapters were trained on (--base)") from e
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    leftover = [n for n, _ in merged.named_parameters() if is_lora_parameter(n)]
    if leftover:
        raise MergeError(f"merging {adapter_dir} left LoRA tensors in the model: {leftover[:3]}")
    return merged, tokenizer


def merge_adapters(adapter_dir: str | Path, base_model: str | Path | None, out_dir: str | Path) -> Path:
    """`merged_model`, saved to `out_dir` with the tokenizer: a plain model of the base's family (a stock
    Qwen2 stays a Qwen2)."""
    merged, tokenizer = merged_model(adapter_dir, base_model)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def find_stage_adapters(stage_dir: str | Path) -> Path:
    """The adapter folder of a stage output: adapters/best, else adapters/final, else adapters/ or
    the folder itself when it holds adapter_config.json."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise MergeError(f"Adapter folder not found: {stage_dir} — the stage output does not exist; "
                         f"run the LoRA stage first, or pass the path of its output folder")
    for rel in STAGE_ADAPTER_DIRS:
        candidate = stage_dir / rel
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise MergeError(
        f"Adapter folder not found: {stage_dir / 'adapters'} — the stage output {stage_dir} holds no "
        f"adapters ({', '.join(STAGE_ADAPTER_DIRS[:-1])}); was it trained with `lora:` set? A stage "
        f"without LoRA already wrote a full model, which needs no merge")


def merge_stage_output(stage_dir: str | Path, out_dir: str | Path,
                       base_model: str | Path | None = None) -> Path:
    """Merge the adapters a stage wrote (see `find_stage_adapters`) into their base model."""
    return merge_adapters(find_stage_adapters(stage_dir), base_model, out_dir)
