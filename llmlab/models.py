"""Loading any causal LM — llmlab's own or a stock transformers model (Llama, Qwen2, Mistral, GPT-2,
SmolLM, ...) — from a folder or the hub, and fitting it to a tokenizer.

    model = load_causal_lm("runs/tiny/sft/model")                 # fp32 (the default)
    model = load_causal_lm("Qwen/Qwen2.5-0.5B-Instruct", torch.bfloat16)
    added = ensure_chat_template(tokenizer)                       # llmlab.tokenizer: ChatML when none
    grown = fit_embeddings(model, tokenizer)                      # rows for tokens the model lacks
    weights_dtype("auto", device, lora=True)                      # bf16 under LoRA on a capable GPU
    resolve_model_dir("pipelines/tiny.yaml:dpo")                  # a model folder, a stage's folder or SPEC:STAGE

A folder or name that is not a causal LM (no config, no weights, a sequence-classification-only
architecture) fails with `ModelLoadError`, one sentence naming it and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import llmlab.model.model  # noqa: F401  (registers the llmlab architecture with transformers' Auto classes)
from llmlab.device import bf16_is_fast
from llmlab.errors import UserError

DEFAULT_CONTEXT = 2048  # a config that names no context length: assumed, as transformers' own default
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ModelLoadError(UserError):
    """A model cannot serve as asked; the message names it and the fix."""


def model_problem(path: str | Path) -> str | None:
    """Why a local folder is not a loadable model (no config.json, no weights), or None."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not (folder / "config.json").is_file():
        return f"{folder} has no config.json (save the model with save_pretrained)"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return f"{folder} has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])})"
    return None


def _load(auto: Any, name: str, dtype: torch.dtype, what: str, **kwargs: Any) -> Any:
    local = Path(name).expanduser()
    if local.exists() and (problem := model_problem(local)):
        raise ModelLoadError(f"cannot load {what} {name}: {problem}")
    try:
        return auto.from_pretrained(str(local) if local.exists() else name, dtype=dtype, **kwargs)
    except ValueError as e:  # transformers: "Unrecognized configuration class ... for this kind of AutoModel"
        if "Unrecognized configuration class" in str(e) or "does not recognize" in str(e):
            raise ModelLoadError(f"{name} is not a {what}: its architecture has no {auto.__name__} class "
                                 f"({str(e).splitlines()[0][:160]})") from None
        raise
    except OSError as e:
        raise ModelLoadError(f"cannot load {what} {name}: not a local folder, and the Hugging Face hub failed "
                             f"(offline? HF_HUB_OFFLINE may be set): {str(e).splitlines()[0][:200]}") from None


def load_causal_lm(name: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A causal LM (ours or any transformers architecture with a causal-LM head) in `dtype`."""
    return _load(AutoModelForCausalLM, str(name), dtype, "causal language model")


def load_sequence_classifier(name: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """A sequence-classification model (a reward model: num_labels=1), or one built on a causal LM's
    backbone with a fresh head when `num_labels` is given."""
    return _load(AutoModelForSequenceClassification, str(name), dtype, "sequence-classification model", **kwargs)


def load_reward_backbone(path: str | Path, tokenizer: Any, dtype: torch.dtype = torch.float32) -> Any:
    """A one-output sequence-classification model from a causal LM folder (head initialised fresh)
    or from a reward model folder, its embeddings fitted to the tokenizer."""
    model = load_sequence_classifier(path, dtype, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    fit_embeddings(model, tokenizer)
    return model


def model_context(model_or_config: Any) -> int:
    """The longest sequence a model was built for (max_seq_len, max_position_embeddings, n_positions)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for key in ("max_seq_len", "max_position_embeddings", "n_positions"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return DEFAULT_CONTEXT


def fit_embeddings(model: Any, tokenizer: Any) -> int:
    """Grow the model's embeddings (and a tied or untied output head) to the tokenizer's length when
    the tokenizer has tokens the model has no row for; new rows start at the mean of the others
    (transformers' mean resizing). Returns how many rows were added (0: it already fits)."""
    rows = model.get_input_embeddings().weight.shape[0]
    needed = len(tokenizer)
    if needed <= rows:
        return 0
    model.resize_token_embeddings(needed, mean_resizing=True)
    return needed - rows


def weights_dtype(setting: str, device: torch.device, lora: bool) -> torch.dtype:
    """The dtype the model's weights are loaded in: `auto` keeps fp32 master weights for full
    fine-tuning and on CPUs, and bf16 frozen weights under LoRA on a GPU fast at bf16 (the adapters
    train in fp32 either way)."""
    if setting == "auto":
        return torch.bfloat16 if lora and bf16_is_fast(device) else torch.float32
    return DTYPES[setting]


def read_config(name: str | Path) -> dict | None:
    """A model folder's config.json as a dict (None when it has none)."""
    path = Path(name).expanduser() / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class ModelNotFound(UserError):
    """The argument names no model: the message says what was looked for."""


def resolve_model_dir(target: str) -> Path:
    """A model folder from: a model dir, a stage output dir (its model/), or `SPEC.yaml:STAGE`."""
    if ":" in target and target.split(":", 1)[0].endswith((".yaml", ".yml")):
        from llmlab.spec import load_spec

        spec_file, stage = target.split(":", 1)
        spec = load_spec(spec_file)
        if stage not in spec.stage_names():
            raise ModelNotFound(f"{spec_file} has no stage '{stage}' (stages: {', '.join(spec.stage_names())})")
        target = str(spec.stage_dir(stage))
    path = Path(target).expanduser()
    for candidate in (path / "model", path):  # a stage folder's own config.json is the stage config
        config = candidate / "config.json"
        if config.is_file() and "model_type" in json.loads(config.read_text()):
            return candidate
    record = path / "stage.json"
    if record.is_file():
        outputs = json.loads(record.read_text()).get("outputs") or {}
        if "model" in outputs:
            return Path(outputs["model"])
        raise ModelNotFound(f"stage output {path} has no model/ (adapters only? merge it first: llmlab merge {path} OUT)")
    raise ModelNotFound(f"no model at {path}: give a model folder (with config.json), a stage output folder, "
                        f"or SPEC.yaml:STAGE after running the pipeline")


def load_for_generation(model_dir: str | Path) -> tuple[Any, Any]:
    """A model in eval mode on the best device, and its tokenizer."""
    from llmlab.device import pick_device
    from llmlab.tokenizer import load_tokenizer

    return load_causal_lm(model_dir).to(pick_device()).eval(), load_tokenizer(str(model_dir))
