"""How much memory and compute a pipeline stage needs to train: rules of thumb, used by `llmlab
inspect`, `llmlab plan` and the `llmlab init` wizard.

    from llmlab.runners.registry import estimate_stage      # asks the stage kind's record
    est = estimate_stage(spec, "dpo")        # None for stages that train nothing (merge, export, eval)
    print(fmt_bytes(est.total), est.parts)   # peak bytes, and bytes by component

This module holds what every training stage shares (`estimate_training`); what differs by kind —
one forward pass, the loss's logits, a reference, a value head, a rollout — is the `Forward` its
record in `llmlab.runners` gives, built with the helpers here. The estimate is a rule of thumb, not
a measurement: the bytes of what a stage holds at its peak, in fp32 (as llmlab trains on CPU today),
per process, from the model's shape alone (no weights are read). What lives throughout the stage is
added up; the phases that come one after another (forward and backward: activations and logits; the
optimizer step's temporaries; RL sampling: KV cache and prompt logits) count by the largest. It
ignores allocator overhead, scratch memory inside kernels and the framework's own memory. Gradients
count as alive with the activations (true with gradient accumulation; otherwise they are built as
the activations are freed, so the total is a little high). tests/test_estimate.py runs every
training stage kind on a small model and checks the measured peak of live tensor bytes lies within
[0.8, 1.2] x this estimate. `Work` counts a stage's FLOPs for `llmlab plan`'s time estimate.

The model of a stage is the spec's `model:` block (vocabulary from the tokenizer) for a stage that
builds from scratch or starts `from` stages that did; a stage whose `model:` names a folder uses that
folder's config.json (any transformers architecture); a hub name uses the locally cached config, and
is "size unknown offline" when there is none (nothing is downloaded). `import llmlab.estimate` does
not import torch; estimating does (through llmlab.model, whose configs it reads).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmlab.tokenizer import SPECIAL_TOKENS, tokenizer_file_vocab

if TYPE_CHECKING:
    from llmlab.model.memory import ModelShape, Weight
    from llmlab.spec import Pipeline

ASSUMED_VOCAB = 32000  # vocabulary assumed when the tokenizer's is unknown before it is trained or loaded
SPEC_MODEL = "the spec's model"  # ModelSource.label of the `model:` block

# Parts of phases that come one after another (never alive together): the total counts the largest
# phase on top of what lives throughout (weights, gradients, optimizer state, references, buffers).
PHASES = {"forward and backward": ("activations", "logits"), "optimizer step": ("optimizer step",),
          "sampling": ("KV cache", "sampling logits"),
          # gradient checkpointing: a block's activations are rebuilt in the backward pass, after the loss's
          # logits are freed, while the blocks' kept inputs ("activations") are still alive
          "block recompute": ("activations", "recomputed block")}
# Temporaries of one optimizer step, in tensors the size of the largest trainable one: llmlab.optim's
# optimizers (and torch's AdamW and Adafactor, which do not default to foreach on CPU) update one
# parameter at a time, with at most two temporaries alive (AdamW: the second moment's sqrt and its
# quotient; Lion: the previous and the next update). Measured with PeakMemory: every optimizer's
# step-bound pretraining within 1.00-1.01 x the estimate.
STEP_SCRATCH_TENSORS = 2
DROPOUT_MASK_BYTES = 1  # torch's dropout keeps a bool mask per element


# The sizes of hub models llmlab's shipped pipelines start from, as their published config.json
# gives them, so `inspect` can estimate them offline; a cached or downloaded config wins.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    name: {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
           "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
           "max_position_embeddings": 32768}
    for name in ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B")
} | {
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
        "max_position_embeddings": 8192},
}


@dataclass(frozen=True)
class ModelSource:
    """Where a stage's model comes from, and its shape (None when it cannot be known here)."""

    shape: ModelShape | None
    label: str  # SPEC_MODEL, "model folder <path>" or "hub model <name>"
    problem: str | None = None  # why there is no shape, e.g. "size unknown offline"


@dataclass
class StageEstimate:
    """A stage's peak training memory, a rule of thumb (see the module docstring)."""

    stage: str
    kind: str
    model: str  # the ModelSource label
    params: int | None = None  # parameters of the trained model (a reward model: backbone + score head)
    trainable: int | None = None  # parameters that train (LoRA: adapters and special-token rows)
    sequences: int = 0  # sequences per forward pass
    seq_len: int = 0  # tokens per sequence (the longest a batch can be)
    parts: dict[str, int] = field(default_factory=dict)  # bytes by component, in display order
    total: int | None = None  # peak bytes; None when the model's size is unknown
    problem: str | None = None  # why there is no number
    notes: list[str] = field(default_factory=list)  # what the total assumes, in words


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


# --------------------------------------------------------------------------- which model


def spec_vocab(spec: Pipeline) -> tuple[int, bool]:
    """(vocabulary size of the spec's tokenizer, whether it is known rather than assumed)."""
    if spec.trains_tokenizer:
        return spec.tokenizer.train.vocab_size, True
    found = tokenizer_file_vocab(Path(spec.tokenizer.path).expanduser()) if spec.tokenizer and spec.tokenizer.path else None
    return (found, True) if found else (ASSUMED_VOCAB, False)


def spec_model(spec: Pipeline) -> ModelSource:
    """The spec's `model:` block as llmlab builds it (held to LlmlabConfig's rules, without transformers)."""
    from llmlab.model.architecture import SpecArchitecture
    from llmlab.model.memory import model_shape

    vocab, _ = spec_vocab(spec)
    try:
        return ModelSource(model_shape(SpecArchitecture(**spec.model.model_dump(), vocab_size=vocab)), SPEC_MODEL)
    except ValueError as exc:  # a combination the spec's rules let through but the model refuses
        return ModelSource(None, SPEC_MODEL, f"the spec's model cannot be built: {exc}")


def named_model(name: str) -> ModelSource:
    """A model folder's or a cached hub model's shape, from its config alone (never downloads)."""
    from llmlab.model.memory import model_shape

    path = Path(name).expanduser()
    local = path.exists() or name.startswith(("/", "./", "../", "~"))
    label = f"model folder {name}" if local else f"hub model {name}"
    if local and not (path / "config.json").is_file():
        return ModelSource(None, label, f"{name} has no config.json")
    try:
        from transformers import AutoConfig

        import llmlab.model.config  # noqa: F401  (registers the llmlab config with AutoConfig)

        config: Any = AutoConfig.from_pretrained(str(path) if local else name, local_files_only=True)
    except Exception as exc:  # an architecture transformers does not know, or a hub name not cached
        if not local and name in PUBLISHED_CONFIGS:
            from types import SimpleNamespace

            return ModelSource(model_shape(SimpleNamespace(**PUBLISHED_CONFIGS[name])), f"{label} (its published config)")
        if not local:
            return ModelSource(None, label, f"{name}: size unknown offline (its config is not in the local cache)")
        try:
            from types import SimpleNamespace

            config = SimpleNamespace(**json.loads((path / "config.json").read_text()))
        except (OSError, ValueError, TypeError) as err:  # TypeError: JSON that is not an object
            return ModelSource(None, label, f"{name}: unreadable config.json ({err}; {exc})")
    try:
        return ModelSource(model_shape(config), label)
    except (TypeError, ValueError, AttributeError) as exc:
        return ModelSource(None, label, f"{name}: config.json lacks the sizes ({exc})")


def stage_model(spec: Pipeline, stage: str) -> ModelSource:
    """The model a stage trains or uses: followed through `from` to a stage that starts from a
    `model:` folder / hub name, or from scratch (the spec's `model:` block)."""
    st = spec.stages[stage]
    if isinstance(getattr(st, "model", None), str):
        return named_model(st.model)
    if getattr(st, "adapters", None) is not None:
        base = st.base_model or _adapter_base(st.adapters)
        return named_model(base) if base else ModelSource(None, f"adapters {st.adapters}", "base model unknown")
    start = st.start if hasattr(st, "start") else (st.inputs[0] if st.inputs else None)  # not a reference or reward stage
    start = spec.dependencies(stage).get(start, start) if start else None  # its concrete branch or round
    return stage_model(spec, start) if start in spec.stages else spec_model(spec)


def _adapter_base(adapters: str | None) -> str | None:
    try:
        return json.loads((Path(adapters or "") / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- what trains


def _optimizer_bytes(optimizer: Any, trainable: list[Weight]) -> int:
    """Optimizer state in fp32 (llmlab.optim): AdamW two moments, Sophia momentum + Hessian EMA, Lion one
    momentum, Muon one momentum for 2-D hidden matrices and AdamW's two for the rest, Adafactor
    (torch's) a row and a column statistic per matrix and a full second moment per vector, SGD one
    momentum buffer (none without momentum)."""
    from llmlab.model.memory import FP32_BYTES

    name = optimizer.name
    total = 0
    for w in trainable:
        if name == "sgd":
            total += w.numel * FP32_BYTES if optimizer.momentum > 0 else 0
        elif name == "adafactor":
            total += (sum(w.shape) * w.copies if len(w.shape) == 2 else w.numel) * FP32_BYTES
        elif name == "lion" or (name == "muon" and w.role == "hidden" and len(w.shape) == 2):
            total += w.numel * FP32_BYTES
        else:  # adamw, sophia, muon's AdamW part
            total += 2 * w.numel * FP32_BYTES
    return total


def _preset_projections(preset: str, gated_ffn: bool, custom: list[str] | None) -> list[str]:
    """The projections a LoRA preset adapts, in the names of `llmlab.model.memory.weights` (the real
    modules of a loaded model are found by role in `llmlab.lora.resolve_targets`; the sizes match)."""
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    ffn = ["gate_proj", "up_proj", "down_proj"] if gated_ffn else ["up_proj", "down_proj"]
    return {"minimal": ["q_proj", "v_proj"], "attention_only": attention, "ffn_only": ffn,
            "all": attention + ffn}.get(preset, list(custom or []))


def _lora_weights(shape: ModelShape, all_weights: list[Weight], lora: Any, notes: list[str]) -> list[Weight]:
    """The adapters (r x in and out x r per targeted projection) and special-token rows that train."""
    from llmlab.model.memory import Weight

    targets = _preset_projections(lora.preset, shape.gated_ffn, lora.target_modules)
    by_name = {w.name: w for w in all_weights if w.role == "hidden"}
    missing = [t for t in targets if t not in by_name]
    if missing:
        notes.append(f"LoRA targets {', '.join(missing)} are not projections this estimate knows: not counted")
    out = []
    for t in targets:
        if t in by_name:
            rows, cols = by_name[t].shape
            out += [Weight(f"lora_A.{t}", (lora.r, cols), by_name[t].copies, "hidden"),
                    Weight(f"lora_B.{t}", (rows, lora.r), by_name[t].copies, "hidden")]
    rows = shape.vocab_size if lora.train_embeddings else len(SPECIAL_TOKENS) if lora.train_special_tokens else 0
    if rows:  # peft trainable tokens: a delta per trained row (special tokens: llmlab's)
        out.append(Weight("trainable_tokens", (rows, shape.d_model), 1 if shape.tie_embeddings else 2, "hidden"))
    return out


def _lora_activation_bytes(adapters: list[Weight], dropout: float) -> int:
    """Per token: each adapter's r-wide middle, and with dropout the dropped input copy and its mask."""
    from llmlab.model.memory import FP32_BYTES

    total = 0
    for w in adapters:
        if w.name.startswith("lora_A."):
            r, fan_in = w.shape
            total += w.copies * (r * FP32_BYTES + (fan_in * (FP32_BYTES + DROPOUT_MASK_BYTES) if dropout > 0 else 0))
    return total


def _reward_backbone(all_weights: list[Weight], shape: ModelShape) -> list[Weight]:
    """A sequence-classification model: the backbone without the LM head, plus a one-output score head."""
    from llmlab.model.memory import Weight

    return [w for w in all_weights if w.role != "head"] + [Weight("score", (1, shape.d_model), 1, "head")]


# --------------------------------------------------------------------------- the estimate


@dataclass
class Forward:
    """What differs between stage kinds in the estimate, as a kind's record gives it: one forward pass
    of its training step, the logit-sized tensors of its loss, and what the kind holds besides the
    model it trains (a reference, a value head, a reward model, a rollout)."""

    sequences: int  # sequences per forward pass
    seq_len: int  # tokens per sequence (the longest a batch can be)
    logits: int = 0  # bytes of logit-sized tensors alive at the peak of the loss
    padded: bool = True  # rows padded to the batch's longest carry an attention mask
    scalar_head: bool = False  # a sequence classifier: the backbone and a one-output head, no LM head
    parts: dict[str, int] = field(default_factory=dict)  # the kind's own parts (reference model, KV cache, ...)
    notes: list[str] = field(default_factory=list)


# The kind's part of the estimate: (spec, stage block, the model source, which has a shape) -> Forward
ForwardFn = Callable[["Pipeline", Any, ModelSource], Forward]


def estimate_training(spec: Pipeline, stage: str, forward: ForwardFn) -> StageEstimate:
    """The peak training memory of `stage` (see the module docstring): what every training stage holds
    (weights, gradients, optimizer state, activations, the optimizer step's temporaries), plus what
    its kind's `forward` says. When the model's size cannot be known offline the estimate has
    `total` None and says why in `problem`."""
    from llmlab.model import memory as mm

    st = spec.stages[stage]
    source = stage_model(spec, stage)
    est = StageEstimate(stage, st.kind, source.label)
    if source.shape is None:
        est.problem = source.problem
        return est
    shape, train, parts, notes, b = source.shape, st.train, est.parts, est.notes, mm.FP32_BYTES
    all_weights = mm.weights(shape)
    lora = getattr(st, "lora", None)
    trainable = _lora_weights(shape, all_weights, lora, notes) if lora is not None else all_weights
    fwd = forward(spec, st, source)
    if fwd.scalar_head:
        all_weights = _reward_backbone(all_weights, shape)
        trainable = all_weights if lora is None else trainable
    est.params = sum(w.numel for w in all_weights)
    est.trainable = sum(w.numel for w in trainable)
    est.sequences, est.seq_len = fwd.sequences, fwd.seq_len
    parts["weights"] = est.params * b + (est.trainable * b if lora is not None else 0)
    parts["gradients"] = est.trainable * b
    parts["optimizer state"] = _optimizer_bytes(train.optimizer, trainable)
    if st.distributed is not None and st.distributed.strategy == "fsdp":
        for key in ("weights", "gradients", "optimizer state"):
            parts[key] //= st.distributed.world_size
        notes.append(f"fsdp: weights, gradients and optimizer state split over {st.distributed.world_size} processes")
    parts.update(fwd.parts)
    notes += fwd.notes
    tokens = est.sequences * est.seq_len
    if train.gradient_checkpointing:
        notes.append("gradient checkpointing: each block keeps only its input; one block is recomputed at a time")
        parts["recomputed block"] = tokens * mm.recomputed_block_bytes_per_token(shape, est.seq_len, fwd.padded)
    parts["activations"] = tokens * (mm.activation_bytes_per_token(shape, est.seq_len, fwd.padded, train.gradient_checkpointing)
                                     + (_lora_activation_bytes(trainable, lora.dropout) if lora is not None else 0))
    if fwd.logits:
        parts["logits"] = fwd.logits
    largest = max(math.prod(w.shape) for w in trainable) * b
    parts["optimizer step"] = largest * STEP_SCRATCH_TENSORS
    phases = {name: sum(parts.get(p, 0) for p in members) for name, members in PHASES.items()}
    peak = max(phases, key=phases.__getitem__)
    est.total = sum(n for p, n in parts.items() if not any(p in m for m in PHASES.values())) + phases[peak]
    notes.append(f"{', '.join(n for n, v in phases.items() if v)} come one after another: the total counts the "
                 f"largest ({peak})")
    if train.precision == "bf16":
        notes.append("estimated in fp32: bf16 autocast keeps fp32 weights but stores most activations in 16 bits")
    return est


def sequence_batch(st: Any, shape: ModelShape, sequences: int, *, padded: bool = True) -> Forward:
    """A forward pass of `sequences` rows cut to the stage's `max_seq_len` (the model's context when it
    has none or is a pretrain stage), with the notes every sequence-counting kind gives."""
    limit = getattr(st, "max_seq_len", None)
    seq_len = min(limit or shape.max_context, shape.max_context)
    return Forward(sequences, seq_len, padded=padded,
                   notes=[f"{sequences} sequence{'s' if sequences != 1 else ''} of {seq_len} tokens per forward pass "
                          f"(the longest a batch can be)"])


def lm_forward(st: Any, shape: ModelShape, sequences: int, *, padded: bool = True, copies: float = 0) -> Forward:
    """`sequence_batch` with the logit-sized tensors of a language-modelling loss over every token
    (`copies` of them; a causal-LM step's by default)."""
    from llmlab.model import memory as mm

    fwd = sequence_batch(st, shape, sequences, padded=padded)
    fwd.logits = mm.logits_bytes(shape, fwd.sequences * fwd.seq_len, copies or mm.LM_LOSS_LOGIT_COPIES)
    return fwd


def reference_bytes(spec: Pipeline, st: Any, source: ModelSource, notes: list[str], other: ModelSource | None = None) -> int:
    """A reference model's weights (no gradients): `other` when the stage names one, else a frozen copy of
    the starting model, or nothing with LoRA (the same model, adapters disabled)."""
    from llmlab.model.memory import FP32_BYTES, count_parameters

    if other is None and getattr(st, "lora", None) is not None:
        notes.append("reference: the same model with adapters disabled (no copy)")
        return 0
    if other is not None and other.shape is None:
        notes.append(f"reference {other.problem}: counted at the policy's size")
    shape = other.shape if other is not None and other.shape is not None else source.shape
    return count_parameters(shape) * FP32_BYTES


def reward_model(spec: Pipeline, st: Any) -> ModelSource | None:
    """The reward model a stage holds in memory: a reward stage's, or a model folder / hub name
    (built-in rewards and module:function ones hold none)."""
    if st.reward_stage:
        return stage_model(spec, st.reward_stage)
    ref = st.reward or ""
    local = Path(ref).expanduser()
    if local.is_dir() or ("/" in ref and ":" not in ref):
        return named_model(ref)
    return None


def reward_model_bytes(spec: Pipeline, st: Any, notes: list[str]) -> dict[str, int]:
    """{"reward model": bytes} when the stage holds one (its backbone and score head), else {}."""
    from llmlab.model import memory as mm

    rm = reward_model(spec, st)
    if rm is None:
        return {}
    if rm.shape is None:
        notes.append(f"reward model {rm.problem}: not counted")
        return {}
    return {"reward model": sum(w.numel for w in _reward_backbone(mm.weights(rm.shape), rm.shape)) * mm.FP32_BYTES}


# --------------------------------------------------------------------------- time


@dataclass(frozen=True)
class Work:
    """A stage's compute over its whole run, for time estimates: FLOPs of training (forward and
    backward, references scored alongside) and of sampling (decoding, 2 x parameters per token)."""

    train_flops: float
    decode_flops: float = 0.0
    rollouts: int = 0  # rollouts an RL stage samples
    fixed_seconds: float = 0.0  # time that is not FLOPs (an eval stage's per-document harness work)


MEASURED_FIXED = "benchmarks/seconds"  # the metric a stage reports its fixed seconds under, as measured


def training_work(st: Any, est: StageEstimate, flops_per_token: float = 0.0) -> Work:
    """6 x parameters (or `flops_per_token`) per token of every forward pass of every step."""
    train = st.train
    tokens = est.sequences * est.seq_len * train.max_steps * train.gradient_accumulation_steps
    return Work((flops_per_token or 6 * (est.params or 0)) * tokens)


def describe(est: StageEstimate) -> str:
    """'memory ~12.3 MiB', or why there is no number."""
    return f"memory ~{fmt_bytes(est.total)}" if est.total is not None else f"memory unknown ({est.problem})"


def breakdown(est: StageEstimate) -> str:
    """The components, e.g. 'weights 3.5 MiB + gradients 3.5 MiB + ...; <notes>'."""
    if est.total is None:
        return est.problem or ""
    parts = " + ".join(f"{name} {fmt_bytes(n)}" for name, n in est.parts.items() if n)
    return "; ".join([parts, *est.notes])
