"""The spec's stage blocks, one class per stage kind, and the `Stage` union `Pipeline.stages` holds.
Cross-field rules live next to the fields (`rules()`); the graph (`from`, `reference_stage`,
`reward_stage`) is checked in `llmlab.spec`. Never imports torch.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Iterator, Literal, Union

from pydantic import Field

from llmlab.data.sources import DataSource
from llmlab.spec_base import Loc, StrictModel
from llmlab.spec_blocks import DistributedSpec, LoraSpec, TrainBase, TrainSpec


class SelectSpec(StrictModel):
    """Which branch of a swept upstream stage a stage takes: the one whose branch of `stage` (a stage
    that fans out over the same sweep, e.g. an eval) reported the best `metric`."""

    stage: str
    metric: str  # a metric that stage reports, e.g. dpo/exact_match
    mode: Literal["max", "min"] = "max"


class StageBase(StrictModel):
    """Fields every stage has. `from` names the stages whose outputs this one consumes. `sweep`,
    `sweep_mode` and `select` shape the graph (`llmlab.spec_graph`) and are not part of any
    concrete stage's config."""

    from_: str | list[str] | None = Field(None, alias="from")
    gates: list[str] = Field(default_factory=list)  # e.g. "eval/ppl < 40", "exact_match >= previous"
    sweep: dict[str, list[Any]] | None = Field(None, exclude=True)  # field path -> values: one branch per variant
    sweep_mode: Literal["grid", "zip"] = Field("grid", exclude=True)  # every combination, or the lists paired
    select: SelectSpec | None = Field(None, exclude=True)  # take one branch of a swept upstream stage

    def shared_issues(self) -> Iterator[tuple[Loc, str]]:
        """Rules every stage kind obeys: gates parse; optimizer and distributed choices fit the stage."""
        from llmlab.gates import parse_gate

        for i, gate in enumerate(self.gates):
            try:
                if parse_gate(gate).bound.startswith("champion."):
                    yield ("gates", i), "a champion.<metric> bound compares model versions: put this gate in `promote.gates`"
            except ValueError as exc:
                yield ("gates", i), str(exc)
        train = getattr(self, "train", None)
        if train is not None and train.optimizer.name == "sophia" and getattr(self, "kind", "") in ("reward", "ppo"):
            yield ("train", "optimizer", "name"), (f"sophia estimates curvature from the model's own next-token samples; a "
                                                   f"{self.kind} stage trains a scalar head it cannot sample from: use adamw, "
                                                   f"adafactor, lion or muon")
        if train is not None and getattr(train, "stop_at", None) is not None and self._surely_no_held_out_data():
            yield ("train", "stop_at"), (f"stop_at ({train.stop_at:g}) is checked on held-out data, and with val_fraction 0 "
                                         f"none of this stage's sources gives any: set val_fraction above 0, give a source "
                                         f"with a validation split, or drop stop_at")
        dist = getattr(self, "distributed", None)
        if dist is not None and dist.strategy == "fsdp":
            if getattr(self, "lora", None) is not None:
                yield ("distributed", "strategy"), "LoRA trains under ddp only (the adapters are tiny; sharding buys nothing): set strategy: ddp"
            train = getattr(self, "train", None)
            if train is not None and train.optimizer.name == "muon":
                yield ("distributed", "strategy"), "muon orthogonalises whole matrices, which fsdp shards: use ddp, or another optimizer"

    def _surely_no_held_out_data(self) -> bool:
        """Whether the stage will have no held-out data, known without reading it: nothing is held out
        (val_fraction 0) and no source has a validation split of its own (local files, a built-in that is
        not a task generator, a source read from its validation split). A hub dataset may have one, so
        a stage with one is left to the run, which refuses `stop_at` before its first step."""
        from llmlab.data.sources import BUILTIN_PREFIX, TASK_SOURCES

        data = getattr(self, "data", None)
        if getattr(self, "val_fraction", None) != 0 or not data:
            return False

        def no_own_validation(source: DataSource) -> bool:
            if source.split == "validation" or source.is_local:
                return True
            return source.path.startswith(BUILTIN_PREFIX) and source.path[len(BUILTIN_PREFIX):] not in TASK_SOURCES
        return all(no_own_validation(source) for source in data)

    @property
    def inputs(self) -> list[str]:
        if self.from_ is None:
            return []
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)


class ModelStage(StageBase):
    """A stage that trains one starting model: an earlier stage's (`from`) or a model dir / hub name."""

    model: str | None = None  # start from this transformers model dir or hub name instead of `from`
    tokenizer: str | None = None  # a tokenizer dir or hub name instead of the starting model's own

    @property
    def start(self) -> str | None:
        """The stage whose model this one starts from (None: `model`)."""
        own = StageBase.inputs.fget(self)
        return own[0] if own else None

    def rules(self) -> Iterator[tuple[Loc, str]]:
        own = StageBase.inputs.fget(self)
        if (self.model is None) == (not own):
            yield ("from",), "give exactly one of `from` (an earlier stage) or `model` (a model dir or hub name)"
        if len(own) > 1:
            yield ("from",), f"{self.kind} starts from one model"


class PretrainStage(StageBase):
    """Train a causal LM on packed text; from scratch, or continued from `from`."""

    kind: Literal["pretrain"]
    data: list[DataSource] = Field(min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    val_fraction: float = Field(0.01, ge=0, lt=1)  # share of documents held out, chosen by hash (0: none)
    max_tokens: int | None = Field(None, ge=1)  # training tokens to prepare; None = all the data
    # packed blocks keep documents apart: attention within each document, positions restarting at
    # its first token, no loss on a document's first token (llmlab's model; validation stays plain)
    document_masks: bool = True
    distributed: DistributedSpec | None = None  # run under torchrun (DDP or FSDP)

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if len(self.inputs) > 1:
            yield ("from",), "pretrain continues from at most one stage"


class SftTrain(TrainSpec):
    """SFT training fields. The defaults suit full fine-tuning of a pretrained hub model (a small lr, a
    step of 4 x 16 = 64 sequences); a model trained from scratch here wants a larger lr (the demo: 3e-3
    with LoRA)."""

    max_steps: int = Field(5000, ge=1)
    lr: float = Field(5e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    batch_sequences: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(16, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_steps: int = Field(50, ge=1)
    save_every: int = Field(50, ge=1)


class SftStage(ModelStage):
    """Supervised fine-tuning on conversations; loss on assistant tokens (and end of turn) only."""

    kind: Literal["sft"]
    data: list[DataSource] = Field(min_length=1)
    train: SftTrain = Field(default_factory=SftTrain)
    lora: LoraSpec | None = None  # adapters instead of full fine-tuning
    packing: bool = False  # several short examples per row, no attention across them
    max_seq_len: int | None = Field(None, ge=8)  # longer examples are cut to this many tokens; None = the model's context
    val_fraction: float = Field(0.05, ge=0, lt=1)  # held out by hash when a source has no validation split (0: none)
    max_examples: int | None = Field(None, ge=1)  # training examples read; None = all
    distributed: DistributedSpec | None = None  # run under torchrun (DDP or FSDP)


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


class DpoTrain(TrainBase):
    """Training fields of dpo and reward stages, which count preference pairs: a forward pass scores
    `batch_pairs` pairs (2 x batch_pairs sequences), a step is batch_pairs x gradient_accumulation_steps
    pairs."""

    renamed: ClassVar[dict[str, str]] = {
        "batch_size": "preference stages count pairs: batch_pairs is pairs per forward pass, and a step is "
                      "batch_pairs x gradient_accumulation_steps pairs (the old batch_size)",
        "mini_batch_size": "renamed to batch_pairs (pairs per forward pass); the old batch_size / mini_batch_size "
                           "is now gradient_accumulation_steps",
        "batch_sequences": "preference stages count pairs: use batch_pairs (pairs per forward pass)"}

    max_steps: int = Field(1000, ge=1)
    lr: float = Field(1.4e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)  # max global gradient norm
    batch_pairs: int = Field(32, ge=1)  # pairs per forward pass (per process)
    gradient_accumulation_steps: int = Field(4, ge=1)  # forward passes per step: 4 x 32 = 128 pairs per step
    eval_every: int = Field(50, ge=1)
    eval_steps: int = Field(10, ge=1)  # validation mini-batches
    save_every: int = Field(50, ge=1)



class DpoStage(ModelStage):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) on preference pairs."""

    kind: Literal["dpo"]
    data: list[DataSource] = Field(default_factory=list)  # preference pairs; may be empty when `from` is a preferences stage
    train: DpoTrain = Field(default_factory=DpoTrain)
    beta: float = Field(0.2, gt=0)  # strength of the implicit KL constraint (the paper's beta; 0.1-0.5 is usual)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # conservative DPO: assumed share of flipped labels
    sft_weight: float = Field(0.0, ge=0)  # NLL on the chosen response, added to the loss (RPO)
    lora: LoraSpec | None = None  # with LoRA the reference is the same model with adapters disabled
    reference_stage: str | None = None  # an earlier stage whose model is the reference (default: the start model)
    reference_model: str | None = None  # a model dir or hub name as the reference
    precompute_reference: bool = False  # score the reference once before training, then drop it
    max_seq_len: int | None = Field(None, ge=8)  # longer examples are cut to this many tokens; None = the model's context
    val_fraction: float = Field(0.05, ge=0, lt=1)  # held out by hash when a source has no validation split (0: none)
    max_examples: int | None = Field(None, ge=1)  # training pairs read; None = all
    distributed: DistributedSpec | None = None  # run under torchrun (DDP or FSDP)

    @property
    def inputs(self) -> list[str]:
        return list(dict.fromkeys(super().inputs + ([self.reference_stage] if self.reference_stage else [])))

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if self.reference_stage and self.reference_model:
            yield ("reference_model",), "give reference_stage or reference_model, not both"


class RewardTrain(DpoTrain):
    """DpoTrain's fields and pair semantics (batch_pairs pairs per forward pass)."""

    lr: float = Field(1e-5, gt=0)


class RewardStage(ModelStage):
    """A reward model on preference pairs (Bradley-Terry: -log sigmoid(r_chosen - r_rejected)): the
    starting model's backbone with a scalar head on the last token. Later ppo/grpo stages use it by
    name (`reward_stage`)."""

    kind: Literal["reward"]
    data: list[DataSource] = Field(min_length=1)  # preference pairs (the dpo stage's formats)
    train: RewardTrain = Field(default_factory=RewardTrain)
    max_seq_len: int | None = Field(None, ge=8)  # longer examples are cut to this many tokens; None = the model's context
    val_fraction: float = Field(0.05, ge=0, lt=1)  # held out by hash when a source has no validation split (0: none)
    max_examples: int | None = Field(None, ge=1)  # training pairs read; None = all
    distributed: DistributedSpec | None = None  # run under torchrun (DDP or FSDP)


class RlTrain(TrainBase):
    """Training fields of ppo and grpo, which count prompts: each rollout samples completions for
    `rollout_prompts` prompts (x group_size in GRPO); a forward pass trains on the completions of
    `batch_prompts` prompts and a step on batch_prompts x gradient_accumulation_steps, so a rollout
    gives ppo_epochs x rollout_prompts / (batch_prompts x gradient_accumulation_steps) steps."""

    renamed: ClassVar[dict[str, str]] = {
        "batch_size": "RL stages count prompts: rollout_prompts is prompts per rollout (the old batch_size of "
                      "completions / group_size)",
        "mini_batch_size": "RL stages count prompts: batch_prompts per forward pass x gradient_accumulation_steps "
                           "is the old mini_batch_size of completions / group_size",
        "batch_sequences": "RL stages count prompts: use batch_prompts (prompts per forward pass)"}

    max_steps: int = Field(1000, ge=1)
    lr: float = Field(1.41e-5, gt=0)  # TRL's PPO default, for fine-tuning pretrained models
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    rollout_prompts: int = Field(32, ge=1)  # prompts sampled per rollout (all processes together)
    batch_prompts: int = Field(8, ge=1)  # prompts whose completions one forward pass trains on (per process)
    gradient_accumulation_steps: int = Field(1, ge=1)  # forward passes per optimizer step
    ppo_epochs: int = Field(4, ge=1)  # passes over each rollout
    eval_every: int = Field(50, ge=1)
    eval_at_start: bool = True  # RL can lower held-out scores (noisy gradients): the starting model is a candidate too
    save_every: int = Field(50, ge=1)

    @property
    def step_prompts(self) -> int:
        """Prompts whose completions one optimizer step trains on (per process)."""
        return self.batch_prompts * self.gradient_accumulation_steps

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if self.rollout_prompts % self.step_prompts:
            yield ("rollout_prompts",), (f"rollout_prompts ({self.rollout_prompts}) must be a multiple of batch_prompts x "
                                         f"gradient_accumulation_steps ({self.batch_prompts} x "
                                         f"{self.gradient_accumulation_steps}), so every rollout splits into whole steps")


class RlStageBase(ModelStage):
    """What PPO and GRPO share: prompts, a reward, sampling, a KL to the starting model, LoRA."""

    data: list[DataSource] = Field(min_length=1)  # prompts: a prompt column, chat messages or hh-rlhf transcripts
    train: RlTrain = Field(default_factory=RlTrain)
    reward: str | None = None  # a builtin (exact_match, partial_match, numeric_match, format, length_penalty), module:function, or a reward model dir / hub name
    reward_stage: str | None = None  # or: an earlier reward stage, by name
    lora: LoraSpec | None = None  # with LoRA the KL reference is the same model with adapters disabled
    max_new_tokens: int = Field(128, ge=1)  # completion length limit
    max_prompt_length: int | None = Field(None, ge=1)  # prompts are cut from the left; None = context - max_new_tokens
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)  # 1 = off
    clip_range: float = Field(0.2, gt=0)  # the policy ratio's clip epsilon
    val_fraction: float = Field(0.05, ge=0, lt=1)  # prompts held out by hash when a source has no validation split (0: none)
    max_prompts: int | None = Field(None, ge=1)  # training prompts read; None = all
    eval_prompts: int = Field(64, ge=1)  # held-out prompts scored (greedy) at each evaluation
    distributed: DistributedSpec | None = None  # run under torchrun (DDP; rollouts per rank)

    @property
    def inputs(self) -> list[str]:
        return list(dict.fromkeys(super().inputs + ([self.reward_stage] if self.reward_stage else [])))

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
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

    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and sample more prompts (DAPO)
    max_resample_rounds: int = Field(4, ge=1)  # with dynamic_sampling: extra sampling rounds per rollout at most

    @property
    def sampling_temperature(self) -> float:
        return self.grpo_temperature

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if self.dynamic_sampling and self.distributed is not None and self.distributed.world_size > 1:
            yield ("dynamic_sampling",), ("dynamic_sampling draws a varying number of prompts per rollout, which "
                                          "one process does; set it off under distributed")


class PreferencesStage(ModelStage):
    """On-policy preference pairs: sample `samples_per_prompt` answers per prompt from the starting
    model, score them with a reward, and keep the best and the worst of each prompt as a chosen /
    rejected pair (pairs from the model's own mistakes, as online and iterative DPO use). A dpo stage
    that starts `from` this stage trains on these pairs (and its own `data:`), from the same model."""

    kind: Literal["preferences"]
    data: list[DataSource] = Field(min_length=1)  # prompts: the ppo/grpo formats (prompt, messages, hh-rlhf, question)
    reward: str | None = None  # a builtin (exact_match, numeric_match, ...), module:function, or a reward model dir / hub name
    reward_stage: str | None = None  # or: an earlier reward stage, by name
    samples_per_prompt: int = Field(8, ge=2)  # answers sampled per prompt
    temperature: float = Field(1.0, gt=0)  # sampling temperature
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)  # 1 = off
    max_new_tokens: int = Field(64, ge=1)  # answer length limit
    max_prompt_length: int | None = Field(None, ge=1)  # prompts cut from the left; None = context - max_new_tokens
    max_prompts: int | None = Field(2000, ge=1)  # prompts sampled (the training split's first ones)
    batch_prompts: int = Field(32, ge=1)  # prompts sampled at once (x samples_per_prompt sequences)
    min_margin: float = Field(0.0, ge=0)  # a pair needs chosen score - rejected score > this (ties teach nothing)
    answer_as_chosen: bool = False  # when no sample beats another, the row's `answer` column is the chosen response

    @property
    def inputs(self) -> list[str]:
        return list(dict.fromkeys(super().inputs + ([self.reward_stage] if self.reward_stage else [])))

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if (self.reward is None) == (self.reward_stage is None):
            yield ("reward",), ("give exactly one of `reward` (a builtin such as exact_match, module:function, or a reward "
                                "model dir / hub name) or `reward_stage` (an earlier reward stage)")


class ExportStage(StageBase):
    """Export a stage's model: `hf` (transformers format, llmlab's code registered) or `llama`
    (a stock LlamaForCausalLM, for Llama-compatible architectures; logits equal ours)."""

    kind: Literal["export"]
    format: Literal["hf", "llama"] = "hf"

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if len(self.inputs) != 1:
            yield ("from",), "export takes exactly one stage in `from`"


DEFAULT_PROMPTS = ["The", "def ", "Return the", "This module"]


class EvalModel(StrictModel):
    """A model an eval stage scores beside the pipeline's own: a folder or a hub name."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # its name in the report and metric names
    path: str  # a model folder (transformers format) or a hub name (needs network, or the local cache)


class EvalStage(StageBase):
    """Held-out loss/perplexity of each model — the `from` stages' and any `models:` folders or hub
    names, all on the same held-out documents, tasks and pairs — plus sample generations."""

    renamed: ClassVar[dict[str, str]] = {"batch_size": "renamed to batch_sequences (sequences per evaluation batch)"}

    kind: Literal["eval"]
    data: list[DataSource] = Field(min_length=1)  # text; only held-out documents are scored
    val_fraction: float = Field(0.01, gt=0, lt=1)  # must match the pretrain stage's to stay held out
    batch_sequences: int = Field(8, ge=1)  # sequences per evaluation batch
    batches: int = Field(20, ge=1)  # evaluation batches per model
    seq_len: int | None = Field(None, ge=8)  # None = the model's max_seq_len
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = Field(32, ge=1)
    tasks: list[DataSource] = Field(default_factory=list)  # held-out checkable prompts, e.g. builtin:tasks split test
    tasks_limit: int = Field(200, ge=1)  # prompts scored per model for exact match
    task_max_new_tokens: int = Field(16, ge=1)  # longest answer generated for a task prompt
    preferences: list[DataSource] = Field(default_factory=list)  # held-out pairs, e.g. builtin:tasks-preference split test
    preferences_limit: int = Field(200, ge=1)  # pairs scored per model for preference accuracy
    reward: str | None = None  # mean reward of the task completions: a builtin (exact_match), module:function or model dir
    reward_stage: str | None = None  # or: an earlier reward stage's model scores them
    temperature: float = Field(0.0, ge=0)  # 0 = greedy, so samples are reproducible
    models: list[EvalModel] = Field(default_factory=list)  # model folders / hub names scored beside the stages

    @property
    def model_stages(self) -> list[str]:
        """The stages whose models are evaluated (`from`)."""
        return StageBase.inputs.fget(self)

    @property
    def inputs(self) -> list[str]:
        return list(dict.fromkeys(self.model_stages + ([self.reward_stage] if self.reward_stage else [])))

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if not self.model_stages and not self.models:
            yield ("from",), "eval needs `from` (the stages whose models to score) or `models` (folders or hub names)"
        names = self.model_stages + [m.name for m in self.models]
        for i, m in enumerate(self.models):
            if names.count(m.name) > 1:
                yield ("models", i, "name"), f"'{m.name}' names two of the evaluated models: give each a different name"
        if self.reward and self.reward_stage:
            yield ("reward",), "give `reward` or `reward_stage`, not both"


Stage = Annotated[Union[PretrainStage, SftStage, MergeStage, DpoStage, RewardStage, PpoStage, GrpoStage, PreferencesStage,
                        EvalStage, ExportStage], Field(discriminator="kind")]
STAGE_KINDS = ("pretrain", "sft", "merge", "dpo", "reward", "ppo", "grpo", "preferences", "eval", "export")
