"""The pipeline spec: pydantic models of the YAML file, strict loading, every error at once.

    from llmlab.spec import load_spec
    spec = load_spec("pipelines/tiny.yaml")      # raises SpecError listing every problem

`llmlab validate FILE` prints `SpecError.issues`; `llmlab schema` prints `Pipeline.model_json_schema()`.
Field names and defaults follow the seed (LLM-Lab's ModelConfig / TrainingConfig). Structure errors
come from pydantic; cross-field rules live next to the fields in `rules()` methods and are checked
for every block that parsed, so one run of `validate` reports everything. This module never imports
torch.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

Loc = tuple[Union[str, int], ...]


class StrictModel(BaseModel):
    """Base of every spec block: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)

    def rules(self) -> Iterator[tuple[Loc, str]]:
        """Cross-field problems of this block, as (location relative to the block, message)."""
        return iter(())


# --------------------------------------------------------------------------- data


class DataSource(StrictModel):
    """One data source; several sources interleave by relative weight (the seed's semantics)."""

    path: str = Field(description="builtin:<name>, a local file or folder, or a hub dataset name")
    subset: str | None = None  # hub dataset configuration name
    split: str = "train"  # which split to read; held-out data is carved out per document
    weight: float = Field(1.0, gt=0)  # relative share of documents drawn from this source
    column: str = "text"  # the text column for plain-text data
    format: str | None = None  # row format for SFT/preference data; None = detect

    def rules(self) -> Iterator[tuple[Loc, str]]:
        from llmlab.data.builtin import BUILTIN_SOURCES  # a plain dict; imports nothing heavy

        if self.path.startswith("builtin:"):
            name = self.path.split(":", 1)[1]
            if name not in BUILTIN_SOURCES:
                near = difflib.get_close_matches(name, list(BUILTIN_SOURCES), n=1)
                hint = f"did you mean 'builtin:{near[0]}'? " if near else ""
                yield ("path",), f"unknown built-in source '{name}': {hint}available: {', '.join('builtin:' + n for n in BUILTIN_SOURCES)}"
        elif self.path.startswith(("/", "./", "../", "~")) and not Path(self.path).expanduser().exists():
            yield ("path",), f"no such file or folder: {self.path} (paths are relative to the folder you run llmlab from)"


# --------------------------------------------------------------------------- tokenizer


class TokenizerTrain(StrictModel):
    """Train a byte-level BPE tokenizer; it becomes the pipeline's first stage, `tokenizer`."""

    vocab_size: int = Field(4096, ge=300)  # includes special tokens
    data: list[DataSource] = Field(min_length=1)
    min_frequency: int = Field(2, ge=1)  # merges seen fewer times are not learned
    max_documents: int | None = Field(50_000, ge=1)  # documents read for training; None = all


class TokenizerSpec(StrictModel):
    """Exactly one of: train a tokenizer, load one by hub name, or load one from a local path."""

    train: TokenizerTrain | None = None
    name: str | None = None  # hub name, e.g. Qwen/Qwen2.5-0.5B (the seed's default; needs network)
    path: str | None = None  # local tokenizer directory

    def rules(self) -> Iterator[tuple[Loc, str]]:
        given = [k for k in ("train", "name", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            yield (), f"give exactly one of train, name, path (got {', '.join(given) or 'none'})"


# --------------------------------------------------------------------------- model


class ModelSpec(StrictModel):
    """The decoder's architecture: the seed's fields and defaults, plus a few it lacked."""

    positional_encoding: Literal["sinusoidal", "rope", "alibi", "yarn"] = "rope"
    attention_type: Literal["mha", "mqa", "gqa"] = "gqa"
    norm_type: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    activation: Literal["relu", "gelu", "silu", "leaky_relu", "swiglu"] = "swiglu"
    d_model: int = Field(896, ge=8)  # hidden size
    n_heads: int = Field(14, ge=1)  # query heads
    n_kv_heads: int = Field(2, ge=1)  # key/value heads (gqa); mha = n_heads, mqa = 1
    d_ff: int = Field(4864, ge=1)  # feed-forward inner size
    n_layers: int = Field(24, ge=1)
    max_seq_len: int = Field(1024, ge=8)  # training context length
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    sliding_window: int | None = Field(None, ge=1)  # None = full causal attention
    attention_bias: bool = False  # bias on q/k/v/o projections
    norm_eps: float = Field(1e-6, gt=0)
    tie_word_embeddings: bool = True  # share the input embedding with the output head
    rope_theta: float = Field(10000.0, gt=0)  # RoPE/YaRN base
    yarn_scale: float = Field(4.0, ge=1.0)  # YaRN context-extension factor s
    yarn_original_max_seq_len: int | None = Field(None, ge=8)  # YaRN's L; None = max_seq_len / s

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if self.d_model % self.n_heads:
            yield ("n_heads",), f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
        elif (self.d_model // self.n_heads) % 2 and self.positional_encoding in ("rope", "yarn"):
            yield ("n_heads",), f"{self.positional_encoding} needs an even head size; d_model / n_heads = {self.d_model // self.n_heads}"
        if self.attention_type == "gqa" and self.n_heads % self.n_kv_heads:
            yield ("n_kv_heads",), f"gqa needs n_heads ({self.n_heads}) divisible by n_kv_heads ({self.n_kv_heads})"
        if self.attention_type == "mqa" and self.n_kv_heads != 1:
            yield ("n_kv_heads",), f"mqa means one KV head: set n_kv_heads: 1 (got {self.n_kv_heads})"
        if self.attention_type == "mha" and self.n_kv_heads != self.n_heads:
            yield ("n_kv_heads",), f"mha means n_kv_heads = n_heads: set n_kv_heads: {self.n_heads} (got {self.n_kv_heads})"
        if self.yarn_original_max_seq_len is not None and self.yarn_original_max_seq_len > self.max_seq_len:
            yield ("yarn_original_max_seq_len",), "must not exceed max_seq_len"

    @property
    def num_kv_heads(self) -> int:
        return {"mha": self.n_heads, "mqa": 1, "gqa": self.n_kv_heads}[self.attention_type]


# --------------------------------------------------------------------------- training


class AdamW(StrictModel):
    """torch.optim.AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101): Adam with decoupled weight decay."""

    name: Literal["adamw"] = "adamw"
    beta1: float = Field(0.9, ge=0.0, lt=1.0)  # first-moment (momentum) decay
    beta2: float = Field(0.999, ge=0.0, lt=1.0)  # second-moment decay
    eps: float = Field(1e-8, gt=0)  # added to the denominator


class Adafactor(StrictModel):
    """torch.optim.Adafactor (Shazeer & Stern 2018, arXiv 1804.04235): factored second moments, no
    first moment; the step is relative to each parameter's RMS. Defaults are torch's."""

    name: Literal["adafactor"] = "adafactor"
    beta2_decay: float = Field(-0.8, le=0.0)  # beta2_t = 1 - t^beta2_decay
    eps1: float | None = Field(None, gt=0)  # floor of the second moment; None = dtype's machine eps
    eps2: float = Field(1e-3, gt=0)  # floor of the parameter RMS that scales the step
    d: float = Field(1.0, gt=0)  # update clipping threshold (on the update's RMS)


class Lion(StrictModel):
    """Lion (Chen et al. 2023, arXiv 2302.06675): the sign of an interpolated momentum. Use a 3-10x
    smaller lr and a larger weight decay than AdamW (the paper's advice)."""

    name: Literal["lion"] = "lion"
    beta1: float = Field(0.9, ge=0.0, lt=1.0)  # interpolation of momentum and gradient for the update
    beta2: float = Field(0.99, ge=0.0, lt=1.0)  # momentum decay


class Sophia(StrictModel):
    """Sophia-G (Liu et al. 2023, arXiv 2305.14342): momentum divided by an EMA of a diagonal
    Hessian estimate (Gauss-Newton-Bartlett, refreshed every `k` steps), clipped elementwise at
    `rho`: every parameter moves at most rho * lr per step (so lr is larger than AdamW's)."""

    name: Literal["sophia"] = "sophia"
    beta1: float = Field(0.965, ge=0.0, lt=1.0)  # gradient momentum decay
    beta2: float = Field(0.99, ge=0.0, lt=1.0)  # Hessian-estimate EMA decay (per refresh)
    rho: float = Field(0.04, gt=0)  # elementwise clip of m / h: |update| <= rho * lr
    k: int = Field(10, ge=1)  # optimizer steps between Hessian estimates
    eps: float = Field(1e-12, gt=0)  # floor of the Hessian estimate in the denominator


class Muon(StrictModel):
    """Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon): Newton-Schulz-orthogonalised
    momentum for 2-D hidden weight matrices; embeddings, the output head and 1-D parameters use AdamW
    at `adamw_lr_ratio` x lr."""

    name: Literal["muon"] = "muon"
    momentum: float = Field(0.95, ge=0.0, lt=1.0)  # momentum decay
    nesterov: bool = True  # orthogonalise g + momentum * buf instead of buf
    ns_steps: int = Field(5, ge=1, le=50)  # Newton-Schulz iterations
    ns_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs, fp32 on CPUs (bf16 is 35x slower there)
    adamw_lr_ratio: float = Field(0.1, gt=0)  # lr of the AdamW-handled parameters, relative to lr
    adamw_beta1: float = Field(0.9, ge=0.0, lt=1.0)  # AdamW part: first-moment decay
    adamw_beta2: float = Field(0.999, ge=0.0, lt=1.0)  # AdamW part: second-moment decay
    adamw_eps: float = Field(1e-8, gt=0)  # AdamW part: denominator epsilon


OPTIMIZER_CLASSES: dict[str, type[StrictModel]] = {"adamw": AdamW, "adafactor": Adafactor, "lion": Lion, "sophia": Sophia, "muon": Muon}
OptimizerSpec = Annotated[Union[AdamW, Adafactor, Lion, Sophia, Muon], Field(discriminator="name")]
OPTIMIZER_NAMES = tuple(OPTIMIZER_CLASSES)


class TrainSpec(StrictModel):
    """The seed's training fields. One step is one optimizer update (after all accumulation)."""

    max_steps: int = Field(10_000, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)  # never applied to norms, biases or embeddings
    scheduler: Literal["none", "cosine", "linear", "polynomial"] = "cosine"
    warmup_steps: int = Field(1000, ge=0)  # linear warmup from 0, in optimizer steps
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # the schedule's floor, as a fraction of lr
    power: float = Field(1.0, gt=0)  # exponent of the polynomial schedule
    batch_size: int = Field(1, ge=1)  # sequences per micro-batch
    gradient_accumulation_steps: int = Field(64, ge=1)  # micro-batches per optimizer step
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; None = no clipping
    eval_every: int = Field(500, ge=1)  # optimizer steps between validations
    eval_steps: int = Field(100, ge=1)  # validation batches per evaluation
    save_every: int = Field(500, ge=1)  # optimizer steps between resumable checkpoints
    save_best_only: bool = True  # the exported model is the best validation one, not the last
    log_every: int = Field(10, ge=1)  # optimizer steps between logged metrics
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 only on hardware fast at it
    load_optimizer: bool = True  # on resume, restore optimizer state (false to switch optimizers)
    optimizer: OptimizerSpec = Field(default_factory=AdamW)

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if self.warmup_steps > self.max_steps:
            yield ("warmup_steps",), f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})"


# --------------------------------------------------------------------------- stages


class StageBase(StrictModel):
    """Fields every stage has. `from` names the stages whose outputs this one consumes."""

    from_: str | list[str] | None = Field(None, alias="from")
    gates: list[str] = Field(default_factory=list)  # e.g. "eval/ppl < 40", "exact_match >= previous"

    def gate_issues(self) -> Iterator[tuple[Loc, str]]:
        from llmlab.gates import parse_gate

        for i, gate in enumerate(self.gates):
            try:
                parse_gate(gate)
            except ValueError as exc:
                yield ("gates", i), str(exc)
        dist = getattr(self, "distributed", None)
        if dist is not None and dist.strategy == "fsdp":
            if getattr(self, "lora", None) is not None:
                yield ("distributed", "strategy"), "LoRA trains under ddp only (the adapters are tiny; sharding buys nothing): set strategy: ddp"
            train = getattr(self, "train", None)
            if train is not None and train.optimizer.name == "muon":
                yield ("distributed", "strategy"), "muon orthogonalises whole matrices, which fsdp shards: use ddp, or another optimizer"

    @property
    def inputs(self) -> list[str]:
        if self.from_ is None:
            return []
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)


class DistributedSpec(StrictModel):
    """Run the stage under torchrun: `nproc_per_node` processes on each of `nnodes` machines.
    Rank 0 alone writes checkpoints and logs; every rank trains on its own share of each batch, so
    one step's global batch is batch_size x gradient_accumulation_steps x world size."""

    nproc_per_node: int = Field(1, ge=1)  # processes per machine (GPUs per machine, or CPU workers)
    nnodes: int = Field(1, ge=1)  # machines; more than 1 needs rdzv_endpoint (or $LLMLAB_RDZV_ENDPOINT)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # ddp: replicated weights; fsdp: FSDP2 shards weights, grads, optimizer state
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto = nccl on GPUs, gloo on CPU
    rdzv_endpoint: str | None = None  # host:port of the rendezvous (multi-node); None = $LLMLAB_RDZV_ENDPOINT or local

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


class PretrainStage(StageBase):
    """Train a causal LM on packed text; from scratch, or continued from `from`."""

    kind: Literal["pretrain"]
    data: list[DataSource] = Field(min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    val_fraction: float = Field(0.01, gt=0, lt=1)  # share of documents held out, chosen by hash
    max_tokens: int | None = Field(None, ge=1)  # training tokens to prepare; None = all the data
    distributed: DistributedSpec | None = None  # run under torchrun (DDP or FSDP)

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if len(self.inputs) > 1:
            yield ("from",), "pretrain continues from at most one stage"


class LoraSpec(StrictModel):
    """LoRA adapters through peft (Hu et al. 2021, arXiv 2106.09685); presence turns LoRA on."""

    preset: Literal["minimal", "attention_only", "ffn_only", "all", "custom"] = "minimal"  # which projections
    r: int = Field(8, ge=1)  # adapter rank
    alpha: float = Field(16.0, gt=0)  # scaling: the update is (alpha / r) * B @ A
    dropout: float = Field(0.05, ge=0.0, lt=1.0)  # dropout on the adapter's input
    target_modules: list[str] | None = None  # module names, only with preset: custom
    train_special_tokens: bool = True  # also train special-token embeddings (chat markers a base model never saw)

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if self.preset == "custom" and not self.target_modules:
            yield ("target_modules",), "preset: custom needs target_modules (e.g. [q_proj, v_proj])"
        if self.preset != "custom" and self.target_modules:
            yield ("target_modules",), f"target_modules is only read with preset: custom (preset is {self.preset})"


class SftTrain(TrainSpec):
    """TrainSpec with the seed's SFT defaults."""

    max_steps: int = Field(5000, ge=1)
    lr: float = Field(5e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(16, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_steps: int = Field(50, ge=1)
    save_every: int = Field(50, ge=1)


class SftStage(StageBase):
    """Supervised fine-tuning on conversations; loss on assistant tokens (and end of turn) only."""

    kind: Literal["sft"]
    model: str | None = None  # start from this transformers model dir or hub name instead of `from`
    data: list[DataSource] = Field(min_length=1)
    train: SftTrain = Field(default_factory=SftTrain)
    lora: LoraSpec | None = None  # adapters instead of full fine-tuning
    packing: bool = False  # several short examples per row, no attention across them
    val_fraction: float = Field(0.05, gt=0, lt=1)  # held out by hash when a source has no validation split
    max_examples: int | None = Field(None, ge=1)  # training examples read; None = all
    distributed: DistributedSpec | None = None  # run under torchrun (DDP or FSDP)

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if (self.model is None) == (not self.inputs):
            yield ("from",), "give exactly one of `from` (an earlier stage) or `model` (a model dir or hub name)"
        if len(self.inputs) > 1:
            yield ("from",), "sft starts from one model"


class MergeStage(StageBase):
    """Fold LoRA adapters into a plain model: from an sft stage with `lora`, or an adapter folder."""

    kind: Literal["merge"]
    adapters: str | None = None  # an adapter folder, when not `from` a stage
    base_model: str | None = None  # its base model (default: the adapter config's base_model_name_or_path)

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if (self.adapters is None) == (not self.inputs):
            yield ("from",), "give exactly one of `from` (an sft stage with lora) or `adapters` (a folder)"
        if len(self.inputs) > 1:
            yield ("from",), "merge takes one stage"


class DpoTrain(TrainSpec):
    """TrainSpec with the seed's RLHF defaults. `batch_size` counts preference pairs per optimizer
    step and `mini_batch_size` pairs per forward; accumulation is their ratio."""

    max_steps: int = Field(1000, ge=1)
    lr: float = Field(1.4e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)  # the seed's max_grad_norm
    batch_size: int = Field(128, ge=1)  # pairs per optimizer step
    mini_batch_size: int = Field(32, ge=1)  # pairs per forward pass
    gradient_accumulation_steps: int = Field(1, ge=1)  # derived: batch_size / mini_batch_size; leave at 1
    eval_every: int = Field(50, ge=1)
    eval_steps: int = Field(10, ge=1)  # validation mini-batches
    save_every: int = Field(50, ge=1)

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if self.batch_size % self.mini_batch_size:
            yield ("mini_batch_size",), f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})"
        if self.gradient_accumulation_steps != 1:
            yield ("gradient_accumulation_steps",), "DPO accumulates batch_size / mini_batch_size mini-batches per step: set those instead"


class DpoStage(StageBase):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) on preference pairs."""

    kind: Literal["dpo"]
    model: str | None = None  # start from this model dir or hub name instead of `from`
    data: list[DataSource] = Field(min_length=1)
    train: DpoTrain = Field(default_factory=DpoTrain)
    beta: float = Field(0.2, gt=0)  # strength of the implicit KL constraint (the seed's clip_range, renamed)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # conservative DPO: assumed share of flipped labels
    sft_weight: float = Field(0.0, ge=0)  # NLL on the chosen response, added to the loss (RPO)
    lora: LoraSpec | None = None  # with LoRA the reference is the same model with adapters disabled
    reference_stage: str | None = None  # an earlier stage whose model is the reference (default: the start model)
    reference_model: str | None = None  # a model dir or hub name as the reference
    precompute_reference: bool = False  # score the reference once before training, then drop it
    val_fraction: float = Field(0.05, gt=0, lt=1)  # held out by hash when a source has no validation split
    max_examples: int | None = Field(None, ge=1)  # training pairs read; None = all
    distributed: DistributedSpec | None = None  # run under torchrun (DDP or FSDP)

    @property
    def start(self) -> str | None:
        """The stage whose model DPO starts from (None: `model`)."""
        own = super().inputs
        return own[0] if own else None

    @property
    def inputs(self) -> list[str]:
        return list(dict.fromkeys(super().inputs + ([self.reference_stage] if self.reference_stage else [])))

    def rules(self) -> Iterator[tuple[Loc, str]]:
        own = super().inputs
        if (self.model is None) == (not own):
            yield ("from",), "give exactly one of `from` (an earlier stage) or `model` (a model dir or hub name)"
        if len(own) > 1:
            yield ("from",), "dpo starts from one model"
        if self.reference_stage and self.reference_model:
            yield ("reference_model",), "give reference_stage or reference_model, not both"


class RewardTrain(DpoTrain):
    """DpoTrain's fields and pair semantics (batch_size pairs per step, mini_batch_size per forward)."""

    lr: float = Field(1e-5, gt=0)


class RewardStage(StageBase):
    """A reward model on preference pairs (Bradley-Terry: -log sigmoid(r_chosen - r_rejected)): the
    starting model's backbone with a scalar head on the last token. Later ppo/grpo stages use it by
    name (`reward_stage`)."""

    kind: Literal["reward"]
    model: str | None = None  # start from this model dir or hub name instead of `from`
    data: list[DataSource] = Field(min_length=1)  # preference pairs (the dpo stage's formats)
    train: RewardTrain = Field(default_factory=RewardTrain)
    val_fraction: float = Field(0.05, gt=0, lt=1)  # held out by hash when a source has no validation split
    max_examples: int | None = Field(None, ge=1)  # training pairs read; None = all
    distributed: DistributedSpec | None = None  # run under torchrun (DDP or FSDP)

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if (self.model is None) == (not self.inputs):
            yield ("from",), "give exactly one of `from` (an earlier stage) or `model` (a model dir or hub name)"
        if len(self.inputs) > 1:
            yield ("from",), "reward starts from one model"


class RlTrain(TrainSpec):
    """TrainSpec with the seed's RLHF defaults. One step is one optimizer update on a mini-batch:
    each rollout batch of `batch_size` completions gives ppo_epochs x batch_size / mini_batch_size
    steps. `gradient_accumulation_steps` splits a mini-batch into that many forward passes."""

    max_steps: int = Field(1000, ge=1)
    lr: float = Field(1.41e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(128, ge=1)  # completions per rollout batch
    mini_batch_size: int = Field(32, ge=1)  # completions per optimizer step
    gradient_accumulation_steps: int = Field(1, ge=1)  # forward passes per mini-batch
    ppo_epochs: int = Field(4, ge=1)  # passes over each rollout batch
    eval_every: int = Field(50, ge=1)
    save_every: int = Field(50, ge=1)

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if self.batch_size % self.mini_batch_size:
            yield ("mini_batch_size",), f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})"
        if self.mini_batch_size % self.gradient_accumulation_steps:
            yield ("gradient_accumulation_steps",), (f"mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                                                     f"gradient_accumulation_steps ({self.gradient_accumulation_steps})")


class RlStageBase(StageBase):
    """What PPO and GRPO share: prompts, a reward, sampling, a KL to the starting model, LoRA."""

    model: str | None = None  # start from this model dir or hub name instead of `from`
    data: list[DataSource] = Field(min_length=1)  # prompts: a prompt column, chat messages or hh-rlhf transcripts
    train: RlTrain = Field(default_factory=RlTrain)
    reward: str | None = None  # a builtin (exact_match, format, length_penalty), module:function, or a reward model dir / hub name
    reward_stage: str | None = None  # or: an earlier reward stage, by name
    lora: LoraSpec | None = None  # with LoRA the KL reference is the same model with adapters disabled
    max_new_tokens: int = Field(128, ge=1)  # completion length limit
    max_prompt_length: int | None = Field(None, ge=1)  # prompts are cut from the left; None = context - max_new_tokens
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)  # 1 = off
    clip_range: float = Field(0.2, gt=0)  # the policy ratio's clip epsilon
    val_fraction: float = Field(0.05, gt=0, lt=1)  # prompts held out by hash when a source has no validation split
    max_prompts: int | None = Field(None, ge=1)  # training prompts read; None = all
    eval_prompts: int = Field(64, ge=1)  # held-out prompts scored (greedy) at each evaluation
    distributed: DistributedSpec | None = None  # run under torchrun (DDP; rollouts per rank)

    @property
    def start(self) -> str | None:
        own = super().inputs
        return own[0] if own else None

    @property
    def inputs(self) -> list[str]:
        return list(dict.fromkeys(super().inputs + ([self.reward_stage] if self.reward_stage else [])))

    def rules(self) -> Iterator[tuple[Loc, str]]:
        own = super().inputs
        if (self.model is None) == (not own):
            yield ("from",), "give exactly one of `from` (an earlier stage) or `model` (a model dir or hub name)"
        if len(own) > 1:
            yield ("from",), f"{self.kind} starts from one model"
        if self.distributed is not None and self.distributed.strategy == "fsdp":
            yield ("distributed", "strategy"), f"{self.kind} runs under ddp only (rollouts need the whole policy on each rank): set strategy: ddp"
        if (self.reward is None) == (self.reward_stage is None):
            yield ("reward",), ("give exactly one of `reward` (a builtin such as exact_match, module:function, or a reward "
                                "model dir / hub name) or `reward_stage` (an earlier reward stage)")


class PpoStage(RlStageBase):
    """PPO (Schulman et al. 2017, arXiv 1707.06347) with the InstructGPT recipe: a value head, GAE,
    clipped policy and value losses, a per-token KL penalty to the starting model."""

    kind: Literal["ppo"]
    temperature: float = Field(1.0, gt=0)  # sampling temperature; log-probs use the same one
    vf_coef: float = Field(0.1, ge=0)  # weight of the value loss
    clip_range_value: float = Field(0.2, gt=0)  # the value prediction's clip
    gamma: float = Field(1.0, ge=0, le=1)  # discount
    gae_lambda: float = Field(0.95, ge=0, le=1)  # GAE's bias/variance trade-off
    kl_coef: float = Field(0.05, ge=0)  # per-token KL penalty (initial value when adaptive)
    target_kl: float | None = Field(None, gt=0)  # nats per completion; set = adapt kl_coef toward it (Ziegler et al. 2019)
    kl_horizon: int = Field(10000, ge=1)  # episodes over which the adaptive coefficient moves

    @property
    def sampling_temperature(self) -> float:
        return self.temperature


class GrpoStage(RlStageBase):
    """GRPO (Shao et al. 2024, arXiv 2402.03300): group_size completions per prompt, advantages
    normalised within the group, the clipped objective, a k3 KL to the starting model, no value."""

    kind: Literal["grpo"]
    group_size: int = Field(4, ge=2)  # completions per prompt
    grpo_temperature: float = Field(1.0, gt=0)  # sampling temperature; log-probs use the same one
    kl_coef: float = Field(0.04, ge=0)  # weight of the k3 KL term (0 = no reference model)

    @property
    def sampling_temperature(self) -> float:
        return self.grpo_temperature

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if self.train.batch_size % self.group_size:
            yield ("train", "batch_size"), f"batch_size ({self.train.batch_size}) counts completions: make it a multiple of group_size ({self.group_size})"


class ExportStage(StageBase):
    """Export a stage's model: `hf` (transformers format, llmlab's code registered) or `llama`
    (a stock LlamaForCausalLM, for Llama-compatible architectures; logits equal ours)."""

    kind: Literal["export"]
    format: Literal["hf", "llama"] = "hf"

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if len(self.inputs) != 1:
            yield ("from",), "export takes exactly one stage in `from`"


DEFAULT_PROMPTS = ["The", "def ", "Return the", "This module"]


class EvalStage(StageBase):
    """Held-out loss/perplexity of each input model, plus sample generations from fixed prompts."""

    kind: Literal["eval"]
    data: list[DataSource] = Field(min_length=1)  # text; only held-out documents are scored
    val_fraction: float = Field(0.01, gt=0, lt=1)  # must match the pretrain stage's to stay held out
    batch_size: int = Field(8, ge=1)
    batches: int = Field(20, ge=1)  # evaluation batches per model
    seq_len: int | None = Field(None, ge=8)  # None = the model's max_seq_len
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = Field(32, ge=1)
    tasks: list[DataSource] = Field(default_factory=list)  # held-out checkable prompts, e.g. builtin:tasks split test
    tasks_limit: int = Field(200, ge=1)  # prompts scored per model for exact match
    preferences: list[DataSource] = Field(default_factory=list)  # held-out pairs, e.g. builtin:tasks-preference split test
    preferences_limit: int = Field(200, ge=1)  # pairs scored per model for preference accuracy
    reward: str | None = None  # mean reward of the task completions: a builtin (exact_match), module:function or model dir
    temperature: float = Field(0.0, ge=0)  # 0 = greedy, so samples are reproducible

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if not self.inputs:
            yield ("from",), "eval needs `from`: the stage(s) whose models to evaluate"


Stage = Annotated[Union[PretrainStage, SftStage, MergeStage, DpoStage, RewardStage, PpoStage, GrpoStage, EvalStage, ExportStage],
                  Field(discriminator="kind")]
STAGE_KINDS = ("pretrain", "sft", "merge", "dpo", "reward", "ppo", "grpo", "eval", "export")


class TrackingSpec(StrictModel):
    """Where MLflow records runs. None = $MLFLOW_TRACKING_URI, else SQLite under the state dir."""

    uri: str | None = None
    experiment: str | None = None  # None = the pipeline name


class Pipeline(StrictModel):
    """A whole pipeline: tokenizer, architecture, and named stages in declaration order."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # MLflow experiment, Prefect run
    seed: int = 1234
    workdir: str | None = None  # stage outputs go to <workdir>/<stage>/; None = runs/<name>
    tokenizer: TokenizerSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    stages: dict[str, Stage] = Field(min_length=1)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @property
    def output_root(self) -> str:
        return self.workdir or f"runs/{self.name}"

    def stage_names(self) -> list[str]:
        """All stages in execution order, the implicit `tokenizer` stage first when it trains."""
        first = ["tokenizer"] if self.tokenizer.train is not None else []
        return first + list(self.stages)


# --------------------------------------------------------------------------- loading


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


def _dotted(loc: Loc) -> str:
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


def _nearest(key: str, valid: list[str]) -> list[str]:
    """The valid key a typo most likely meant: a whole word of it (lr_rate -> lr), else difflib."""
    words = [v for v in valid if v in key.split("_")]
    if words:
        return [max(words, key=len)]
    return difflib.get_close_matches(key, valid, n=1, cutoff=0.5)


def _drop(raw: Any, locs: list[Loc]) -> Any:
    """A deep copy of `raw` without the keys at `locs` (so defaults stand in for bad values)."""
    import copy

    raw = copy.deepcopy(raw)
    for loc in locs:
        node = raw
        for part in loc[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return raw


def _structural_issues(err: ValidationError) -> list[tuple[Loc, str]]:
    out = []
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            owner = _model_at(tuple(e["loc"]))
            valid = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
            near = _nearest(str(loc[-1]), valid)
            hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(valid)}"
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


def _rule_issues(obj: Any, loc: Loc) -> Iterator[tuple[Loc, str]]:
    """Walk a parsed block, yielding every `rules()` problem with its absolute location."""
    if isinstance(obj, StrictModel):
        for rel, msg in obj.rules():
            yield loc + rel, msg
        if isinstance(obj, StageBase):
            for rel, msg in obj.gate_issues():
                yield loc + rel, msg
        for name, field in type(obj).model_fields.items():
            yield from _rule_issues(getattr(obj, name), loc + (field.alias or name,))
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _rule_issues(item, loc + (i,))
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _rule_issues(item, loc + (key,))


def _graph_issues(raw: dict) -> Iterator[tuple[Loc, str]]:
    """`from` must name an earlier stage (or the tokenizer); no stage may depend on itself."""
    stages = raw.get("stages")
    if not isinstance(stages, dict):
        return
    seen = ["tokenizer"] if isinstance(raw.get("tokenizer"), dict) and "train" in raw["tokenizer"] else []
    names = list(stages)
    if "tokenizer" in names:
        yield ("stages", "tokenizer"), "the name 'tokenizer' is reserved for the tokenizer stage: rename this stage"
    for name, body in stages.items():
        src = body.get("from") if isinstance(body, dict) else None
        deps = [("from", d) for d in ([src] if isinstance(src, str) else (src or []))]
        for key in ("reference_stage", "reward_stage"):
            if isinstance(body, dict) and isinstance(body.get(key), str):
                deps.append((key, body[key]))
        for key, dep in deps:
            if not isinstance(dep, str):
                continue
            if dep == name:
                yield (("stages", name, key), f"stage '{name}' cannot take its own output (a cycle)")
            elif dep in names and dep not in seen:
                yield (("stages", name, key), f"'{dep}' is declared after '{name}': a stage may only use earlier stages (declare '{dep}' first; cycles are not allowed)")
            elif dep not in names:
                near = difflib.get_close_matches(dep, [n for n in names if n != name], n=1)
                hint = f" — did you mean '{near[0]}'?" if near else f" (stages: {', '.join(names)})"
                yield (("stages", name, key), f"unknown stage '{dep}'{hint}")
            elif isinstance(stages.get(dep), dict):
                dep_kind = stages[dep].get("kind")
                if key == "reward_stage" and dep_kind != "reward":
                    yield (("stages", name, key), f"reward_stage '{dep}' is a {dep_kind} stage; name a stage of kind reward "
                                                  f"(or use `reward:` for a builtin, module:function or reward model)")
                elif key != "reward_stage" and dep_kind == "reward":
                    yield (("stages", name, key), f"'{dep}' is a reward model (a scalar head), not a language model: "
                                                  f"use it as `reward_stage` of a ppo or grpo stage")
        if isinstance(body, dict) and body.get("kind") == "merge" and isinstance(src, str) and isinstance(stages.get(src), dict):
            up = stages[src]
            if up.get("kind") != "sft" or not up.get("lora"):
                yield (("stages", name, "from"), f"merge needs adapters, but stage '{src}' has none "
                        f"(it is {up.get('kind')}{' without lora' if up.get('kind') == 'sft' else ''}): merge an sft stage with a lora block")
        seen.append(name)


def _line_map(text: str) -> dict[Loc, int]:
    """YAML path -> 1-based line, for pointing messages at the right place."""
    lines: dict[Loc, int] = {}

    def walk(node: yaml.Node, loc: Loc) -> None:
        lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[loc + (key.value,)] = key.start_mark.line + 1
                walk(value, loc + (key.value,))
                lines[loc + (key.value,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, loc + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _line_for(lines: dict[Loc, int], loc: Loc) -> int | None:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def parse_spec(text: str, file: str = "<spec>") -> Pipeline:
    """Parse and validate YAML text; raise SpecError with every issue."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise SpecError(file, [SpecIssue(path="", line=line, message=f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if not isinstance(raw, dict):
        raise SpecError(file, [SpecIssue(path="", line=1, message="the spec must be a mapping with name, tokenizer, model and stages")])
    found: list[tuple[Loc, str]] = []
    spec = None
    try:
        spec = Pipeline.model_validate(raw)
    except ValidationError as err:
        found += _structural_issues(err)
    # cross-field rules of every block that parses on its own, even when others do not
    # (keys with structural errors are dropped first, so their defaults stand in)
    bad = [loc for loc, _ in found]
    blocks: list[tuple[Loc, Any]] = [((k,), a) for k, a in (("model", ModelSpec), ("tokenizer", TokenizerSpec), ("tracking", TrackingSpec))]
    if isinstance(raw.get("stages"), dict):
        blocks += [(("stages", name), Stage) for name in raw["stages"]]
    cleaned = _drop(raw, bad)
    for loc, annotation in blocks:
        body = cleaned
        for part in loc:
            body = body.get(part) if isinstance(body, dict) else None
        if isinstance(body, dict):
            try:
                found += list(_rule_issues(TypeAdapter(annotation).validate_python(body), loc))
            except ValidationError:
                pass
    found += list(_graph_issues(raw))
    if found:
        lines = _line_map(text)
        unique = sorted(dict.fromkeys(found), key=lambda f: _line_for(lines, f[0]) or 0)
        raise SpecError(file, [SpecIssue(path=_dotted(loc), line=_line_for(lines, loc), message=msg) for loc, msg in unique])
    assert spec is not None
    return spec


def load_spec(path: str | Path) -> Pipeline:
    """Read and validate a spec file; raise SpecError (every issue) or FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [SpecIssue(path="", line=None, message="file not found: check the path")])
    return parse_spec(path.read_text(), str(path))


def config_hash(obj: Any) -> str:
    """A stable short hash of any JSON-able config (pydantic models are dumped by alias)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", by_alias=True)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def json_schema() -> dict:
    """The JSON Schema of the spec, for editors (`llmlab schema > llmlab.schema.json`)."""
    return Pipeline.model_json_schema(by_alias=True)

