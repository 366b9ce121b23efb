"""Spec problems as users read them: a dotted YAML path, a line, and what to write instead.

    raise SpecError(file, [SpecIssue(path="stages.sft.train.lr", line=12, message="...")])
    structural_issues(validation_error)      # pydantic's errors, translated: nearest key, renamed keys

`llmlab validate` prints `SpecError.issues`; `llmlab.spec.load` collects them. Never imports torch.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from llmlab.spec.base import Loc
from llmlab.spec.blocks import OPTIMIZER_CLASSES, OPTIMIZER_NAMES
from llmlab.spec.pipeline import Pipeline
from llmlab.spec.stages import STAGE_KINDS


class SpecIssue(BaseModel):
    """One problem: where (dotted YAML path, line) and what to do."""

    path: str
    line: int | None
    message: str

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line else file
        return f"{where}: {self.path or '<top>'}: {self.message}"


class SpecError(Exception):
    """Raised by load_spec with every issue found; str() is the full report."""

    def __init__(self, file: str, issues: list[SpecIssue]):
        self.file, self.issues = file, issues
        super().__init__("\n".join(i.render(file) for i in issues))


def dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types inside Optional / Union / Annotated / list / dict annotations."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [t for a in typing.get_args(tp) for t in _unwrap(a)]
    return [tp]


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The spec class owning the key at a raw pydantic `loc` (union tags still in it)."""
    current: Any = Pipeline
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        kinds = _unwrap(field.annotation)
        container = next((t for t in kinds if typing.get_origin(t) in (list, dict)), None)
        if container is not None:
            if parts:
                parts.pop(0)  # the list index or dict key
            kinds = _unwrap(typing.get_args(container)[-1])
        models = [t for t in kinds if isinstance(t, type) and issubclass(t, BaseModel)]
        if field.discriminator is not None or len(models) > 1:  # pydantic puts the tag next
            tag = parts.pop(0) if parts else None
            models = [m for m in models if tag in (_kind(m, "kind"), _kind(m, "name"))]
        if not models:
            return None
        current = models[0]
    return current


def _kind(cls: Any, field: str = "kind") -> str | None:
    f = getattr(cls, "model_fields", {}).get(field)
    args = typing.get_args(f.annotation) if f is not None else ()
    return args[0] if args else None


def _clean_loc(loc: Loc) -> Loc:
    """Drop the discriminator tags pydantic inserts into union locations."""
    out: list[Union[str, int]] = []
    for part in loc:
        prev2 = out[-2] if len(out) >= 2 else None
        if prev2 == "stages" and part in STAGE_KINDS:
            continue
        if out and out[-1] == "optimizer" and part in OPTIMIZER_NAMES:
            continue
        out.append(part)
    return tuple(out)


# names other tools (transformers' TrainingArguments and configs, TRL, Axolotl, LitGPT, torchtune) give
# to what llmlab calls otherwise: the llmlab keys they may mean, in order, or (for what llmlab does
# not have) the sentence that says what to write instead
COMMON_NAMES: dict[str, tuple[str, ...] | str] = {
    **dict.fromkeys(("learning_rate", "lr_rate", "base_lr"), ("lr",)),
    **dict.fromkeys(("batch_size", "per_device_train_batch_size", "train_batch_size", "micro_batch_size",
                     "global_batch_size"), ("batch_sequences", "batch_pairs", "batch_prompts")),
    **dict.fromkeys(("epochs", "num_epochs", "num_train_epochs", "max_epochs"),
                    "llmlab trains for a number of optimizer steps: set train.max_steps"),
    **dict.fromkeys(("model_name_or_path", "model_name", "base_model", "pretrained_model_name_or_path",
                     "model_path", "checkpoint"), ("model",)),
    **dict.fromkeys(("max_length", "max_seq_length", "seq_len", "sequence_len", "block_size", "cutoff_len", "max_len",
                     "context_length"), ("max_seq_len",)),
    **dict.fromkeys(("gradient_accumulation", "grad_accum", "accumulate_grad_batches", "gradient_accumulation_step"),
                    ("gradient_accumulation_steps",)),
    **dict.fromkeys(("max_grad_norm", "clip_grad_norm", "gradient_clipping"), ("grad_clip",)),
    **dict.fromkeys(("num_warmup_steps", "warmup"), ("warmup_steps",)),
    "warmup_ratio": "llmlab counts warmup in optimizer steps: set warmup_steps",
    **dict.fromkeys(("lr_scheduler_type", "lr_scheduler"), ("scheduler",)),
    **dict.fromkeys(("optim",), ("optimizer",)),
    **dict.fromkeys(("save_steps",), ("save_every",)),
    **dict.fromkeys(("logging_steps",), ("log_every",)),
    **dict.fromkeys(("eval_interval", "evaluation_steps", "eval_strategy"), ("eval_every",)),
    **dict.fromkeys(("bf16", "fp16", "mixed_precision", "dtype", "torch_dtype"), ("precision", "model_dtype")),
    **dict.fromkeys(("dataset", "datasets", "train_file", "dataset_name", "data_path"), ("data",)),
    "lora_r": ("r",), "lora_alpha": ("alpha",), "lora_dropout": ("dropout",), "lora_target_modules": ("target_modules",),
    **dict.fromkeys(("num_layers", "n_layer", "num_hidden_layers"), ("n_layers",)),
    **dict.fromkeys(("hidden_size", "n_embd", "dim"), ("d_model",)),
    **dict.fromkeys(("num_attention_heads", "n_head"), ("n_heads",)),
    **dict.fromkeys(("num_key_value_heads", "n_kv_head"), ("n_kv_heads",)),
    **dict.fromkeys(("intermediate_size", "ffn_dim"), ("d_ff",)),
    **dict.fromkeys(("kl_coef", "init_kl_coef"), ("kl_coef", "beta")),
}


def _common(key: str, valid: list[str]) -> str | None:
    """The hint for a name another tool uses (or a near typo of one), when llmlab's key is here."""
    known = COMMON_NAMES.get(key)
    if known is None:
        near = difflib.get_close_matches(key, list(COMMON_NAMES), n=1, cutoff=0.85)
        known = COMMON_NAMES[near[0]] if near else None
    if isinstance(known, str):
        return known
    for candidate in known or ():
        if candidate in valid and candidate != key:
            return f"did you mean '{candidate}'?"
    return None


def _nearest(key: str, valid: list[str]) -> list[str]:
    """The valid key a typo most likely meant: a whole word of it (lr_rate -> lr), else difflib."""
    words = [v for v in valid if v in key.split("_")]
    if words:
        return [max(words, key=len)]
    return difflib.get_close_matches(key, valid, n=1, cutoff=0.5)


def unknown_key_hint(key: str, valid: list[str]) -> str:
    """What an unknown key most likely meant: another tool's name for an llmlab key, a typo of a
    valid key, or (neither) the valid keys."""
    common = _common(key, valid)
    if common:
        return common
    near = _nearest(key, valid)
    return f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(valid)}"


def structural_issues(err: ValidationError) -> list[tuple[Loc, str]]:
    out = []
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            owner = _model_at(tuple(e["loc"]))
            if owner is not None and loc[-1] in owner.renamed:
                out.append((loc, f"'{loc[-1]}' is not a key here any more: {owner.renamed[loc[-1]]}"))
                continue
            valid = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
            hint = unknown_key_hint(str(loc[-1]), valid)
            owners = [n for n, c in OPTIMIZER_CLASSES.items() if c is not owner and loc[-1] in c.model_fields]
            if owner in OPTIMIZER_CLASSES.values() and owners:  # a field of another optimizer
                out.append((loc, f"unknown key '{loc[-1]}' for optimizer '{_kind(owner, 'name')}' — "
                                 f"'{loc[-1]}' is a field of {', '.join(owners)}"))
                continue
            out.append((loc, f"unknown key '{loc[-1]}' — {hint}"))
        elif e["type"] == "union_tag_invalid":
            tag = str(e["input"].get("kind", e["input"].get("name", ""))) if isinstance(e["input"], dict) else ""
            expected = e["ctx"]["expected_tags"]
            near = difflib.get_close_matches(tag, [t.strip(" '") for t in expected.split(",")], n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            out.append((loc, f"unknown value '{tag}': {hint}choose one of {expected}"))
        elif e["type"] == "union_tag_not_found":
            out.append((loc, f"missing '{e['ctx']['discriminator'].strip(chr(39))}': say which kind of block this is"))
        elif e["type"] == "missing":
            out.append((loc, "required field is missing"))
        else:
            out.append((loc, f"{e['msg']} (got {e['input']!r})" if not isinstance(e["input"], (dict, list)) else e["msg"]))
    return out
