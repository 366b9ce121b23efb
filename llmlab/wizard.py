"""`llmlab init`: an interactive configurator that writes a pipeline spec which validates.

    from llmlab.wizard import run_wizard, write_spec
    spec = run_wizard(ask, say, defaults=False)   # a plain dict, the YAML's content
    write_spec(spec, "pipelines/mine.yaml")       # header comment + YAML; checked with parse_spec

`ask(key, question, default) -> str` asks one question (an empty answer means the default); `say`
prints. Every answer is validated as soon as it is given and the question is asked again, with the
error, until it is valid. The questions: pipeline name; a size preset (tiny ~1M / small ~10M /
base ~100M parameters); each architecture choice with ModelSpec's default as the recommendation and a
one-line reason; the sizes (preset values as defaults); which stages; and per training stage the
optimizer, only that optimizer's fields, then lr, max_steps and the batch (batch_sequences;
batch_pairs for dpo and reward; batch_prompts for grpo and ppo). Before returning it shows the
parameter count and a training-memory estimate per training stage. With `defaults=True` nothing is
asked: the result is the demo's recipe (pipelines/tiny.yaml's stages and settings) under the name my-model.

Keys passed to `ask` (for scripting): name, size, positional_encoding, attention_type, norm_type,
activation, d_model, n_layers, n_heads, n_kv_heads (gqa only), d_ff, max_seq_len, vocab_size,
stages, then `<stage>.optimizer`, `<stage>.optimizer.<field>`, `<stage>.lr`, `<stage>.max_steps`,
`<stage>.batch_sequences` (pretrain, sft), `<stage>.batch_pairs` (dpo, reward) or `<stage>.batch_prompts`
(grpo, ppo), for each training stage that was chosen.
"""

from __future__ import annotations

import copy
import math
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmlab.estimate import StageEstimate, describe, spec_model
from llmlab.runners.registry import estimate_stage
from llmlab.spec import (
    OPTIMIZER_CLASSES,
    DpoTrain,
    ModelSpec,
    Pipeline,
    RewardTrain,
    RlTrain,
    SftTrain,
    TrainSpec,
    parse_spec,
)

Ask = Callable[[str, str, str], str]
Say = Callable[[str], None]

STAGE_ORDER = ("pretrain", "sft", "merge", "preferences", "dpo", "reward", "grpo", "ppo", "eval")
TRAINING_STAGES = {"pretrain": TrainSpec, "sft": SftTrain, "dpo": DpoTrain, "reward": RewardTrain, "grpo": RlTrain,
                   "ppo": RlTrain}
DEFAULT_STAGES = "pretrain,sft,merge,dpo,grpo,eval"  # the demo's (pipelines/tiny.yaml)
BATCH_FIELDS = {"dpo": ("batch_pairs", "preference pairs per forward pass"),
                "reward": ("batch_pairs", "preference pairs per forward pass"),
                "grpo": ("batch_prompts", "prompts per forward pass (x group_size completions)"),
                "ppo": ("batch_prompts", "prompts per forward pass")}

# name -> (description, d_model, n_layers, n_heads, n_kv_heads, max_seq_len, vocab_size); d_ff follows
# the activation (swiglu: ~8/3 d_model, else 4 d_model). `tiny` is pipelines/tiny.yaml's model.
PRESETS: dict[str, tuple[str, int, int, int, int, int, int]] = {
    "tiny": ("~1M parameters, minutes on a laptop CPU", 128, 4, 4, 2, 128, 2048),
    "small": ("~10M parameters, an hour or so on CPU, minutes on a GPU", 320, 8, 8, 2, 256, 4096),
    "base": ("~100M parameters, wants a GPU", 768, 14, 12, 4, 512, 16384),
}

# The recommended architecture (ModelSpec's defaults), with why.
ARCHITECTURE = {
    "positional_encoding": ("rope", "rotary: relative positions, the modern default (Llama, Qwen); yarn stretches it to longer contexts"),
    "attention_type": ("gqa", "grouped-query: query heads share n_kv_heads key/value heads, a smaller KV cache at near-MHA quality"),
    "norm_type": ("rmsnorm", "cheaper than LayerNorm (no mean, no bias) and as good at this scale"),
    "activation": ("swiglu", "gated feed-forward as in Llama; d_ff ~8/3 d_model keeps a 4x-FFN's parameter count"),
}

# Per training stage, its schedule in the offline recipes: pipelines/tiny.yaml's (pretrain, the LoRA sft,
# dpo, grpo: tests/test_wizard.py holds the defaults to that file) and pipelines/tiny-ppo.yaml's (reward,
# ppo). SftTrain's and DpoTrain's own defaults are for fine-tuning pretrained hub models.
TRAIN_TEMPLATES: dict[str, dict[str, Any]] = {
    "pretrain": {"max_steps": 300, "lr": 2.0e-3, "weight_decay": 0.1, "scheduler": "cosine", "warmup_steps": 30,
                 "min_lr_ratio": 0.1, "batch_sequences": 16, "gradient_accumulation_steps": 1, "grad_clip": 1.0,
                 "eval_every": 100, "eval_steps": 20, "save_every": 100, "log_every": 10},
    "sft": {"max_steps": 400, "lr": 3.0e-3, "weight_decay": 0.0, "warmup_steps": 30, "min_lr_ratio": 0.1,
            "batch_sequences": 16, "gradient_accumulation_steps": 1, "eval_every": 50, "eval_steps": 5, "save_every": 100,
            "log_every": 25},
    "dpo": {"max_steps": 200, "lr": 2.0e-4, "warmup_steps": 10, "batch_pairs": 32, "gradient_accumulation_steps": 1,
            "eval_every": 50, "eval_steps": 4, "save_every": 50, "log_every": 10},
    "grpo": {"max_steps": 300, "lr": 1.0e-4, "warmup_steps": 5, "rollout_prompts": 32, "batch_prompts": 16, "ppo_epochs": 1,
             "eval_every": 25, "min_improvement": 0.01, "save_every": 50, "log_every": 10},
    "reward": {"max_steps": 300, "lr": 1.0e-3, "warmup_steps": 10, "batch_pairs": 32, "gradient_accumulation_steps": 1,
               "eval_every": 50, "eval_steps": 8, "save_every": 50, "log_every": 10},
    "ppo": {"max_steps": 200, "lr": 3.0e-5, "warmup_steps": 5, "rollout_prompts": 64, "batch_prompts": 32, "ppo_epochs": 2,
            "eval_every": 50, "save_every": 50, "log_every": 10},
}
# sft without merge trains every weight: a lower lr, unpacked batches of task examples, and a stop at a
# held-out loss (the step count at which this model leaves its loss plateau varies with the random seed)
FULL_SFT_TRAIN = {"max_steps": 500, "stop_at": 0.35, "lr": 2.0e-3, "weight_decay": 0.0, "warmup_steps": 30, "min_lr_ratio": 0.1,
                  "batch_sequences": 64, "gradient_accumulation_steps": 1, "eval_every": 20, "eval_steps": 5,
                  "save_every": 100, "log_every": 25}
# The LoRA sft's data and adapters (pipelines/tiny.yaml says why each)
LORA_SFT = {"data": [{"path": "builtin:tasks"}, {"path": "builtin:stdlib", "weight": 0.1}], "val_fraction": 0.02,
            "packing": True, "lora": {"preset": "all", "r": 32, "alpha": 64, "dropout": 0.0, "train_embeddings": True}}
LR_FACTOR = {"lion": 1 / 3}  # Lion's paper: a 3-10x smaller lr than AdamW

OPTIMIZER_BLURBS = {
    "adamw": "Adam with decoupled weight decay, the safe default",
    "adafactor": "factored second moments, the least optimizer memory",
    "lion": "sign of momentum, half AdamW's state, wants a smaller lr",
    "sophia": "momentum over a clipped diagonal-Hessian estimate",
    "muon": "orthogonalised momentum for weight matrices, AdamW for the rest",
    "sgd": "momentum SGD, steps in proportion to the gradient (RL on small models)",
}


class Invalid(ValueError):
    """An answer that does not parse or validate; its message is shown before asking again."""


# --------------------------------------------------------------------------- answers


def _parse_scalar(text: str) -> Any:
    """An answer as int, float, bool, None or str (YAML 1.1 would read `1e-8` as a string)."""
    t = text.strip()
    low = t.lower()
    if low in ("none", "null", "~"):
        return None
    if low in ("true", "yes", "y", "on"):
        return True
    if low in ("false", "no", "n", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_field(cls: type[BaseModel], field: str, value: Any, context: dict[str, Any] | None = None) -> Any:
    """Validate one field of a spec class (others at their defaults or `context`); the value as stored."""
    try:
        obj = cls.model_validate({**(context or {}), field: value})
    except ValidationError as err:
        mine = [e for e in err.errors() if e["loc"][:1] == (field,)] or err.errors()
        raise Invalid("; ".join(e["msg"] for e in mine)) from None
    return getattr(obj, field)


class _Asker:
    """Asks until an answer validates; with `defaults`, asks nothing and takes every default."""

    def __init__(self, ask: Ask, say: Say, defaults: bool):
        self.ask, self.say, self.defaults = ask, say, defaults

    def __call__(self, key: str, question: str, default: Any, check: Callable[[str], Any]) -> Any:
        shown = _show(default)
        if self.defaults:
            return check(shown)
        while True:
            answer = self.ask(key, question, shown)
            answer = shown if answer is None or not str(answer).strip() else str(answer).strip()
            try:
                return check(answer)
            except Invalid as err:
                self.say(f"  {key}: {err} — try again")

    def choice(self, key: str, question: str, default: str, options: list[str] | tuple[str, ...]) -> str:
        def check(answer: str) -> str:
            a = answer.lower()
            if a in options:
                return a
            import difflib

            near = difflib.get_close_matches(a, list(options), n=1)
            raise Invalid(f"unknown choice '{answer}'{f' (did you mean {near[0]}?)' if near else ''}; choose one of {', '.join(options)}")

        return self(key, f"{question} [{'/'.join(options)}]", default, check)


# --------------------------------------------------------------------------- the wizard


def _round8(x: float) -> int:
    return max(8, math.ceil(x / 8) * 8)


def _default_d_ff(d_model: int, activation: str) -> int:
    return _round8(8 * d_model / 3) if activation == "swiglu" else 4 * d_model


def _ask_model(q: _Asker) -> tuple[dict[str, Any], int]:
    preset_help = "; ".join(f"{n}: {p[0]}" for n, p in PRESETS.items())
    size = q.choice("size", f"Model size ({preset_help})", "tiny", tuple(PRESETS))
    _, d_model0, n_layers0, n_heads0, n_kv0, seq0, vocab0 = PRESETS[size]
    model: dict[str, Any] = {}
    for field, (default, why) in ARCHITECTURE.items():
        options = typing.get_args(ModelSpec.model_fields[field].annotation)  # the Literal's values
        model[field] = q.choice(field, f"{field.replace('_', ' ').capitalize()} — recommended {default}: {why}", default, options)

    def number(cls: type[BaseModel], field: str, context: dict[str, Any] | None = None, extra: Callable[[Any], str | None] | None = None):
        def check(answer: str) -> Any:
            value = _parse_scalar(answer)
            if isinstance(value, (bool, str)) or value is None:
                raise Invalid(f"'{answer}' is not a number")
            value = _check_field(cls, field, value, context)
            problem = extra(value) if extra else None
            if problem:
                raise Invalid(problem)
            return value

        return check

    model["d_model"] = q("d_model", "Hidden size d_model — the residual stream width", d_model0, number(ModelSpec, "d_model"))
    model["n_layers"] = q("n_layers", "Transformer blocks n_layers — depth", n_layers0, number(ModelSpec, "n_layers"))
    head_dim0 = d_model0 // n_heads0
    heads_default = model["d_model"] // head_dim0 if model["d_model"] % head_dim0 == 0 else n_heads0

    def heads_ok(n: int) -> str | None:
        if model["d_model"] % n:
            return f"d_model ({model['d_model']}) must be divisible by n_heads ({n})"
        if model["positional_encoding"] in ("rope", "yarn") and (model["d_model"] // n) % 2:
            return f"{model['positional_encoding']} needs an even head size; d_model / n_heads = {model['d_model'] // n}"
        if model["positional_encoding"] == "sinusoidal" and model["d_model"] % 2:
            return "sinusoidal embeddings need an even d_model"
        return None

    model["n_heads"] = q("n_heads", "Query heads n_heads — head size is d_model / n_heads (32-128 is usual)",
                         heads_default, number(ModelSpec, "n_heads", extra=heads_ok))
    if model["attention_type"] == "gqa":
        kv_default = n_kv0 if model["n_heads"] % n_kv0 == 0 else 1
        model["n_kv_heads"] = q("n_kv_heads", "Key/value heads n_kv_heads (gqa) — fewer: smaller KV cache, a little less quality",
                                kv_default, number(ModelSpec, "n_kv_heads", extra=lambda n: None if model["n_heads"] % n == 0
                                                   else f"gqa needs n_heads ({model['n_heads']}) divisible by n_kv_heads ({n})"))
    else:
        model["n_kv_heads"] = model["n_heads"] if model["attention_type"] == "mha" else 1
    model["d_ff"] = q("d_ff", "Feed-forward inner size d_ff — ~8/3 d_model with swiglu, 4 d_model otherwise",
                      _default_d_ff(model["d_model"], model["activation"]), number(ModelSpec, "d_ff"))
    model["max_seq_len"] = q("max_seq_len", "Context length max_seq_len — training sequence length in tokens",
                             seq0, number(ModelSpec, "max_seq_len"))
    from llmlab.spec import TokenizerTrain

    vocab = q("vocab_size", "Tokenizer vocabulary vocab_size — a byte-level BPE trained on builtin:stdlib (>= 300)",
              vocab0, number(TokenizerTrain, "vocab_size", context={"data": [{"path": "builtin:stdlib"}]}))
    model["dropout"] = 0.0
    return model, vocab


def _ask_stages(q: _Asker) -> list[str]:
    def check(answer: str) -> list[str]:
        chosen = [s.strip().lower() for s in re.split(r"[,\s]+", answer) if s.strip()]
        unknown = [s for s in chosen if s not in STAGE_ORDER]
        if unknown:
            raise Invalid(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGE_ORDER)}")
        if not chosen:
            raise Invalid("choose at least one stage")
        if "pretrain" not in chosen:
            raise Invalid("the wizard trains a model from scratch: include pretrain "
                          "(to fine-tune an existing model, write `model:` on an sft/dpo stage by hand)")
        implied = {"sft": "merge" in chosen, "reward": "ppo" in chosen, "dpo": "preferences" in chosen}
        return [s for s in STAGE_ORDER if s in chosen or implied.get(s, False)]

    return q("stages", f"Stages, comma-separated from {', '.join(STAGE_ORDER)} — merge implies sft with LoRA; "
                       f"preferences (pairs sampled from the model) implies dpo; ppo implies reward (its scorer); "
                       f"eval scores every model", DEFAULT_STAGES, check)


def _ask_train(q: _Asker, stage: str, lora: bool) -> dict[str, Any]:
    cls = TRAINING_STAGES[stage]
    train = copy.deepcopy(FULL_SFT_TRAIN if stage == "sft" and not lora else TRAIN_TEMPLATES[stage])
    docs = "; ".join(f"{n}: {OPTIMIZER_BLURBS.get(n, '')}" for n in OPTIMIZER_CLASSES)
    name = q.choice(f"{stage}.optimizer", f"{stage}: optimizer ({docs})", "adamw", tuple(OPTIMIZER_CLASSES))
    opt_cls = OPTIMIZER_CLASSES[name]
    optimizer: dict[str, Any] = {"name": name}
    for field, info in opt_cls.model_fields.items():
        if field == "name":
            continue

        def check(answer: str, field: str = field) -> Any:
            value = _parse_scalar(answer)
            return _check_field(opt_cls, field, value)

        optimizer[field] = q(f"{stage}.optimizer.{field}", f"{stage}: {name} {field} — {info.description}",
                             info.default, check)

    def number(field: str, integer: bool):
        def check(answer: str) -> Any:
            value = _parse_scalar(answer)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
                raise Invalid(f"'{answer}' is not {'a whole number' if integer else 'a number'}")
            return _check_field(cls, field, value)

        return check

    lr_default = float(f"{train['lr'] * LR_FACTOR.get(name, 1.0):.3g}")
    lr_note = " (Lion: 3-10x smaller than AdamW's)" if name == "lion" else " (Sophia moves each weight at most rho x lr per step)" if name == "sophia" else ""
    train["lr"] = float(q(f"{stage}.lr", f"{stage}: peak learning rate lr{lr_note}", lr_default, number("lr", False)))
    template_steps = train["max_steps"]
    train["max_steps"] = q(f"{stage}.max_steps", f"{stage}: max_steps — optimizer updates", template_steps, number("max_steps", True))
    batch_field, batch_help = BATCH_FIELDS.get(stage, ("batch_sequences", "sequences per forward pass"))
    train[batch_field] = q(f"{stage}.{batch_field}", f"{stage}: {batch_field} — {batch_help}", train[batch_field],
                           number(batch_field, True))
    # keep the schedule consistent with the chosen length
    if train["max_steps"] != template_steps:
        steps = train["max_steps"]
        train["warmup_steps"] = min(train["warmup_steps"], steps // 10)
        for key in ("eval_every", "save_every"):
            train[key] = max(1, min(train[key], steps))
        if "rollout_prompts" in train:
            train["rollout_prompts"] = max(train["rollout_prompts"], train["batch_prompts"])
        train["log_every"] = max(1, min(train["log_every"], steps))
    train["optimizer"] = optimizer
    return train


def _build_stages(chosen: list[str], trains: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The chosen stages wired in order, with the offline recipes' data and settings."""
    stages: dict[str, Any] = {}
    text = [{"path": "builtin:stdlib"}]
    lora = "merge" in chosen
    if "pretrain" in chosen:
        stages["pretrain"] = {"kind": "pretrain", "data": copy.deepcopy(text), "val_fraction": 0.02,
                              "document_masks": False, "train": trains["pretrain"]}
    if "sft" in chosen:
        stages["sft"] = {"kind": "sft", "from": "pretrain", **copy.deepcopy(LORA_SFT if lora else {"data": [{"path": "builtin:tasks"}]}),
                         "train": trains["sft"]}
    if "merge" in chosen:
        stages["merge"] = {"kind": "merge", "from": "sft"}
    tuned = "merge" if "merge" in chosen else "sft" if "sft" in chosen else "pretrain"
    if "preferences" in chosen:
        stages["preferences"] = {"kind": "preferences", "from": tuned, "data": [{"path": "builtin:tasks-prompts"}],
                                 "reward": "exact_match", "samples_per_prompt": 4, "max_new_tokens": 12,
                                 "max_prompts": 500, "answer_as_chosen": True}
    if "dpo" in chosen:
        stages["dpo"] = {"kind": "dpo", "from": "preferences" if "preferences" in chosen else tuned,
                         "data": [{"path": "builtin:tasks-preference"}, {"path": "builtin:tasks-preference-plus"}],
                         "beta": 0.05, "sft_weight": 0.2, "precompute_reference": True, "max_examples": 5000,
                         "train": trains["dpo"]}
    if "reward" in chosen:
        stages["reward"] = {"kind": "reward", "from": tuned, "data": [{"path": "builtin:tasks-preference"}],
                            "max_examples": 8000, "train": trains["reward"]}
    policy = "dpo" if "dpo" in chosen else tuned
    if "grpo" in chosen:
        stages["grpo"] = {"kind": "grpo", "from": policy, "data": [{"path": "builtin:tasks-prompts"}],
                          "reward": "exact_match", "group_size": 4, "temperature": 0.7, "dynamic_sampling": True,
                          "kl_coef": 0.04, "max_new_tokens": 12, "eval_prompts": 400, "train": trains["grpo"]}
    if "ppo" in chosen:
        stages["ppo"] = {"kind": "ppo", "from": policy, "data": [{"path": "builtin:tasks-prompts"}], "reward_stage": "reward",
                         "temperature": 0.7, "kl_coef": 0.05, "max_new_tokens": 12, "eval_prompts": 200,
                         "train": trains["ppo"]}
    if "eval" in chosen:
        models = [s for s in ("pretrain", "sft", "dpo", "grpo", "ppo") if s in stages]  # sft: the adapters, as merged
        ev: dict[str, Any] = {"kind": "eval", "from": models if len(models) > 1 else models[0], "data": copy.deepcopy(text),
                              "val_fraction": 0.02, "batches": 20, "batch_sequences": 16}
        if "sft" in chosen:
            ev["tasks"] = [{"path": "builtin:tasks-prompts", "split": "test"}]
            ev["tasks_limit"] = 500
        if "dpo" in chosen:
            ev["preferences"] = [{"path": "builtin:tasks-preference", "split": "test"}]
            ev["preferences_limit"] = 500
        if "sft" in chosen:
            ev["reward"] = "exact_match"
            ev["benchmarks"] = [{"task": "llmlab_tasks_gen", "limit": 200}, {"task": "llmlab_tasks_mc", "limit": 200},
                                {"task": "llmlab_stdlib_mc"}]
        stages["eval"] = ev
    return stages


def _stage_estimates(spec: dict[str, Any]) -> tuple[int, dict[str, StageEstimate]]:
    from llmlab.model.memory import count_parameters

    pipeline = Pipeline.model_validate(spec)

    found = {name: estimate_stage(pipeline, name) for name in pipeline.stages}
    return count_parameters(spec_model(pipeline).shape), {name: e for name, e in found.items() if e is not None}


def estimates(spec: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """(parameter count, {training stage: estimated peak training bytes}) of a spec dict: the numbers
    `llmlab inspect` prints for the written spec (both come from `llmlab.runners.registry.estimate_stage`)."""
    params, found = _stage_estimates(spec)
    return params, {name: e.total for name, e in found.items() if e.total is not None}


def run_wizard(ask: Ask, say: Say, defaults: bool = False) -> dict[str, Any]:
    """Ask the questions (or take every default) and return the spec as a plain dict."""
    q = _Asker(ask, say, defaults)

    def name_check(answer: str) -> str:
        return _check_field(Pipeline, "name", answer, {"tokenizer": {"name": "x"}, "stages": {"e": {"kind": "merge", "adapters": "x"}}})

    name = q("name", "Pipeline name — names the MLflow experiment and the output folder runs/<name>", "my-model", name_check)
    model, vocab = _ask_model(q)
    chosen = _ask_stages(q)
    trains = {s: _ask_train(q, s, lora="merge" in chosen) for s in chosen if s in TRAINING_STAGES}
    spec: dict[str, Any] = {
        "name": name,
        "seed": 1234,
        "workdir": f"runs/{name}",
        "tokenizer": {"train": {"vocab_size": vocab, "data": [{"path": "builtin:stdlib"}]}},
        "model": model,
        "stages": _build_stages(chosen, trains),
    }
    params, found = _stage_estimates(spec)
    say(f"model: {model['n_layers']} layers x d_model {model['d_model']}, {model['attention_type']} "
        f"{model['n_heads']}/{model['n_kv_heads']} heads, {model['positional_encoding']}, {model['norm_type']}, "
        f"{model['activation']}; vocab {vocab}")
    say(f"parameters: {params:,}")
    for stage, est in found.items():
        train = spec["stages"][stage]["train"]
        note = f" (LoRA: {est.trainable:,} parameters train)" if spec["stages"][stage].get("lora") else ""
        say(f"  {stage:<9} {train['optimizer']['name']:<9} batch {est.sequences} x {est.seq_len} tokens: "
            f"training {describe(est)}{note}")
    say("memory: rule of thumb (fp32 weights, gradients, optimizer state, activations, logits), not a measurement; "
        "`llmlab inspect --detail` shows the parts")
    return spec


def render_spec(spec: dict[str, Any], path: str | Path | None = None) -> str:
    """The YAML text: a header saying how to run it, then the spec."""
    where = str(path) if path is not None else "<this file>"
    stages = " -> ".join(["tokenizer", *spec["stages"]])
    header = (f"# Written by `llmlab init`: {stages}, offline (built-in data only).\n"
              f"# Check it:  llmlab validate {where}\n"
              f"# Inspect:   llmlab inspect {where}     (parameters, memory per stage)\n"
              f"# Run it:    llmlab run {where}\n")
    return header + yaml.safe_dump(spec, sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_spec(spec: dict[str, Any], path: str | Path, overwrite: bool = False) -> Pipeline:
    """Validate the spec with parse_spec, then write it; raises SpecError (nothing written) or FileExistsError."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (overwrite it explicitly)")
    text = render_spec(spec, path)
    pipeline = parse_spec(text, str(path))  # raises SpecError listing every issue
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return pipeline
