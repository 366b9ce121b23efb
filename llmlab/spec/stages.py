"""The spec's stage blocks: one class per stage kind, built from shared pieces, and the `Stage` union.

    PretrainStage, SftStage, MergeStage, DpoStage, RewardStage, PpoStage, GrpoStage,
    PreferencesStage, EvalStage, ExportStage       # `kind:` picks one; `Stage` is their union

What several kinds share is written once: `StageBase` (from, gates, sweeps, the stages a stage
reads), `ModelStage` (a stage that starts from one model), `Distributed` (torchrun), `Examples`
(sequence length, held-out share, how many examples), `RewardSource` (a reward or a reward stage).
Cross-field rules live next to the fields (`rules()`); rules that span stages (`from`, references)
are in `llmlab.spec.references`. Everything else llmlab knows about a kind — its runner, outputs,
data shape, estimates — is its record in `llmlab.runners`. Never imports torch.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, ClassVar, Iterator, Literal, Union

from pydantic import Field

from llmlab.data.sources import DataSource
from llmlab.spec.base import Loc, StrictModel, redefault
from llmlab.spec.blocks import DistributedSpec, LoraSpec, TrainBase, TrainSpec

REF_KEYS = ("reference_stage", "reward_stage")  # fields that name another stage besides `from`


class SelectSpec(StrictModel):
    """Which branch of a swept upstream stage a stage takes: the one whose branch of `stage` (a stage
    that fans out over the same sweep, e.g. an eval) reported the best `metric`."""

    stage: str = Field(description="the stage whose branches are compared (it follows the same sweep)")
    metric: str = Field(description="a metric that stage reports, e.g. dpo/exact_match")
    mode: Literal["max", "min"] = Field("max", description="whether the highest or the lowest value wins")


class StageBase(StrictModel):
    """Fields every stage has. `from` names the stages whose outputs this one consumes. `sweep`,
    `sweep_mode` and `select` shape the graph (`llmlab.spec.graph`) and are not part of any
    concrete stage's config."""

    makes_model: ClassVar[bool] = False  # its output is a language model a later stage can start from or promote

    from_: str | list[str] | None = Field(None, alias="from", description="the earlier stage(s) whose output this one uses")
    gates: list[str] = Field(default_factory=list, description="conditions the stage's metrics must meet for the pipeline "
                                                               "to go on, e.g. 'eval/ppl < 40', 'exact_match >= previous'")
    sweep: dict[str, list[Any]] | None = Field(None, exclude=True, description="field path -> values: one branch per "
                                                                               "variant, e.g. {beta: [0.1, 0.3]}")
    sweep_mode: Literal["grid", "zip"] = Field("grid", exclude=True, description="grid: every combination of the swept "
                                                                                 "values; zip: the lists paired")
    select: SelectSpec | None = Field(None, exclude=True, description="take one branch of a swept upstream stage")

    @property
    def from_stages(self) -> list[str]:
        """The stages named in `from`."""
        if self.from_ is None:
            return []
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)

    @property
    def inputs(self) -> list[str]:
        """Every stage this one reads: `from`, then a reference or reward stage it names."""
        refs = [getattr(self, key) for key in REF_KEYS if getattr(self, key, None)]
        return list(dict.fromkeys(self.from_stages + refs))

    def shared_issues(self) -> Iterator[tuple[Loc, str]]:
        """Rules every stage kind obeys: gates parse; a reward is named once; optimizer and distributed
        choices fit the stage."""
        from llmlab.gates import parse_gate

        for i, gate in enumerate(self.gates):
            try:
                if parse_gate(gate).bound.startswith("champion."):
                    yield ("gates", i), "a champion.<metric> bound compares model versions: put this gate in `promote.gates`"
            except ValueError as exc:
                yield ("gates", i), str(exc)
        if isinstance(self, RewardSource):
            yield from self.reward_issues()
        train = getattr(self, "train", None)
        kind = getattr(self, "kind", "")
        if train is not None and train.optimizer.name == "sophia" and kind in ("reward", "ppo"):
            yield ("train", "optimizer", "name"), (f"sophia estimates curvature from the model's own next-token samples; a "
                                                   f"{kind} stage trains a scalar head it cannot sample from: use adamw, "
                                                   f"adafactor, lion or muon")
        if train is not None and getattr(train, "stop_at", None) is not None and self._surely_no_held_out_data():
            yield ("train", "stop_at"), (f"stop_at ({train.stop_at:g}) is checked on held-out data, and with val_fraction 0 "
                                         f"none of this stage's sources gives any: set val_fraction above 0, give a source "
                                         f"with a validation split, or drop stop_at")
        dist = getattr(self, "distributed", None)
        if dist is not None and dist.strategy == "fsdp":
            if getattr(self, "lora", None) is not None:
                yield ("distributed", "strategy"), "LoRA trains under ddp only (the adapters are tiny; sharding buys nothing): set strategy: ddp"
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


# --------------------------------------------------------------------------- shared pieces


class ModelStage(StageBase):
    """A stage that starts from one model: an earlier stage's (`from`) or a model folder / hub name."""

    model: str | None = Field(None, description="start from this transformers model folder or hub name instead of `from`")
    tokenizer: str | None = Field(None, description="a tokenizer folder or hub name instead of the starting model's own")

    @property
    def start(self) -> str | None:
        """The stage whose model this one starts from (None: `model`)."""
        own = self.from_stages
        return own[0] if own else None

    def rules(self) -> Iterator[tuple[Loc, str]]:
        own = self.from_stages
        if (self.model is None) == (not own):
            yield ("from",), "give exactly one of `from` (an earlier stage) or `model` (a model dir or hub name)"
        if len(own) > 1:
            yield ("from",), f"{self.kind} starts from one model"


class Distributed(StrictModel):
    """A stage that can run as several processes under torchrun."""

    distributed: DistributedSpec | None = Field(None, description="run the stage under torchrun: several processes, "
                                                                  "DDP or FSDP (ppo and grpo: DDP)")


class Examples(StrictModel):
    """How a stage that trains on examples cuts, holds out and caps them."""

    max_seq_len: int | None = Field(None, ge=8, description="longer examples are cut to this many tokens; None = the "
                                                            "model's context")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of examples held out by hash when a source has no "
                                                              "validation split (0: none)")
    max_examples: int | None = Field(None, ge=1, description="training examples read (pairs, for preference data); None = all")


class RewardSource(StrictModel):
    """A reward: a builtin, `module:function` or a reward model (`reward`), or an earlier reward stage
    (`reward_stage`); exactly one of them, or none where the reward is optional."""

    reward_required: ClassVar[bool] = True

    reward: str | None = Field(None, description="a builtin (exact_match, partial_match, numeric_match, format, "
                                                 "length_penalty), module:function, or a reward model folder / hub name")
    reward_stage: str | None = Field(None, description="or: an earlier reward stage, by name")

    def reward_issues(self) -> Iterator[tuple[Loc, str]]:
        given = (self.reward is not None) + (self.reward_stage is not None)
        if self.reward_required and given != 1:
            yield ("reward",), ("give exactly one of `reward` (a builtin such as exact_match, module:function, or a reward "
                                "model dir / hub name) or `reward_stage` (an earlier reward stage)")
        elif given > 1:
            yield ("reward",), "give `reward` or `reward_stage`, not both"


# --------------------------------------------------------------------------- the kinds


class PretrainStage(StageBase, Distributed):
    """Train a causal LM on packed text; from scratch, or continued from `from`."""

    makes_model: ClassVar[bool] = True

    kind: Literal["pretrain"] = Field(description="train a causal LM on packed text")
    data: list[DataSource] = Field(min_length=1, description="text to train on")
    train: TrainSpec = Field(default_factory=TrainSpec, description="the training schedule")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="share of documents held out, chosen by hash (0: none)")
    max_tokens: int | None = Field(None, ge=1, description="training tokens to prepare; None = all the data")
    document_masks: bool = Field(True, description="packed blocks keep documents apart: attention within each document, "
                                                   "positions restarting at its first token, no loss on a document's "
                                                   "first token (llmlab's model; validation stays plain)")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if len(self.from_stages) > 1:
            yield ("from",), "pretrain continues from at most one stage"


class SftTrain(TrainSpec):
    """SFT training fields. The defaults suit full fine-tuning of a pretrained hub model (a small lr, a
    step of 4 x 16 = 64 sequences); a model trained from scratch here wants a larger lr."""

    max_steps: int = redefault(TrainSpec, "max_steps", 5000)
    lr: float = redefault(TrainSpec, "lr", 5e-6)
    weight_decay: float = redefault(TrainSpec, "weight_decay", 0.01)
    warmup_steps: int = redefault(TrainSpec, "warmup_steps", 100)
    batch_sequences: int = redefault(TrainSpec, "batch_sequences", 4)
    gradient_accumulation_steps: int = redefault(TrainSpec, "gradient_accumulation_steps", 16)
    eval_every: int = redefault(TrainSpec, "eval_every", 50)
    eval_steps: int = redefault(TrainSpec, "eval_steps", 50)
    save_every: int = redefault(TrainSpec, "save_every", 50)


class SftStage(ModelStage, Examples, Distributed):
    """Supervised fine-tuning on conversations; loss on assistant tokens (and end of turn) only."""

    makes_model: ClassVar[bool] = True

    kind: Literal["sft"] = Field(description="supervised fine-tuning on conversations")
    data: list[DataSource] = Field(min_length=1, description="conversations, prompt/response pairs, instructions, or plain text (learnt whole)")
    train: SftTrain = Field(default_factory=SftTrain, description="the training schedule")
    lora: LoraSpec | None = Field(None, description="train LoRA adapters instead of every weight")
    packing: bool = Field(False, description="several short examples per row, no attention across them")


class MergeStage(StageBase):
    """Fold LoRA adapters into a plain model: from a stage with `lora`, or an adapter folder."""

    makes_model: ClassVar[bool] = True

    kind: Literal["merge"] = Field(description="fold LoRA adapters into a plain model")
    adapters: str | None = Field(None, description="an adapter folder, when not `from` a stage")
    base_model: str | None = Field(None, description="the adapters' base model (default: the adapter config's "
                                                     "base_model_name_or_path)")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if (self.adapters is None) == (not self.from_stages):
            yield ("from",), "give exactly one of `from` (a stage with lora) or `adapters` (a folder)"
        if len(self.from_stages) > 1:
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

    max_steps: int = redefault(TrainBase, "max_steps", 1000)
    lr: float = redefault(TrainBase, "lr", 1.4e-5)
    weight_decay: float = redefault(TrainBase, "weight_decay", 0.0)
    warmup_steps: int = redefault(TrainBase, "warmup_steps", 0)
    batch_pairs: int = Field(32, ge=1, description="pairs per forward pass (per process)")
    gradient_accumulation_steps: int = redefault(TrainBase, "gradient_accumulation_steps", 4)
    eval_every: int = redefault(TrainBase, "eval_every", 50)
    eval_steps: int = redefault(TrainBase, "eval_steps", 10)
    save_every: int = redefault(TrainBase, "save_every", 50)


class DpoStage(ModelStage, Examples, Distributed):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) on preference pairs."""

    makes_model: ClassVar[bool] = True

    kind: Literal["dpo"] = Field(description="direct preference optimization on preference pairs")
    data: list[DataSource] = Field(default_factory=list, description="preference pairs; may be empty when `from` is a "
                                                                     "preferences stage")
    train: DpoTrain = Field(default_factory=DpoTrain, description="the training schedule")
    beta: float = Field(0.2, gt=0, description="strength of the implicit KL constraint (the paper's beta; 0.1-0.5 is usual)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: the assumed share of flipped labels")
    sft_weight: float = Field(0.0, ge=0, description="weight of an NLL term on the chosen response, added to the loss (RPO)")
    lora: LoraSpec | None = Field(None, description="train LoRA adapters; the reference is then the same model with its "
                                                    "adapters disabled")
    reference_stage: str | None = Field(None, description="an earlier stage whose model is the reference (default: the "
                                                          "starting model)")
    reference_model: str | None = Field(None, description="a model folder or hub name as the reference")
    precompute_reference: bool = Field(False, description="score the reference once before training, then drop it")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if self.reference_stage and self.reference_model:
            yield ("reference_model",), "give reference_stage or reference_model, not both"


class RewardTrain(DpoTrain):
    """DpoTrain's fields and pair semantics (batch_pairs pairs per forward pass)."""

    lr: float = redefault(DpoTrain, "lr", 1e-5)


class RewardStage(ModelStage, Examples, Distributed):
    """A reward model on preference pairs (Bradley-Terry: -log sigmoid(r_chosen - r_rejected)): the
    starting model's backbone with a scalar head on the last token. Later ppo/grpo stages use it by
    name (`reward_stage`)."""

    kind: Literal["reward"] = Field(description="train a reward model (a scalar head) on preference pairs")
    data: list[DataSource] = Field(min_length=1, description="preference pairs (the dpo stage's formats)")
    train: RewardTrain = Field(default_factory=RewardTrain, description="the training schedule")


class RlTrain(TrainBase):
    """Training fields of ppo and grpo, which count prompts: each rollout samples completions for
    `rollout_prompts` prompts (x group_size in GRPO); a forward pass trains on the completions of
    `batch_prompts` prompts and a step on batch_prompts x gradient_accumulation_steps, so a rollout
    gives `steps_per_rollout` optimizer steps."""

    renamed: ClassVar[dict[str, str]] = {
        "batch_size": "RL stages count prompts: rollout_prompts is prompts per rollout (the old batch_size of "
                      "completions / group_size)",
        "mini_batch_size": "RL stages count prompts: batch_prompts per forward pass x gradient_accumulation_steps "
                           "is the old mini_batch_size of completions / group_size",
        "batch_sequences": "RL stages count prompts: use batch_prompts (prompts per forward pass)"}

    max_steps: int = redefault(TrainBase, "max_steps", 1000)
    lr: float = redefault(TrainBase, "lr", 1.41e-5)  # TRL's PPO default, for fine-tuning pretrained models
    weight_decay: float = redefault(TrainBase, "weight_decay", 0.0)
    warmup_steps: int = redefault(TrainBase, "warmup_steps", 0)
    rollout_prompts: int = Field(32, ge=1, description="prompts sampled per rollout (all processes together)")
    batch_prompts: int = Field(8, ge=1, description="prompts whose completions one forward pass trains on (per process)")
    gradient_accumulation_steps: int = redefault(TrainBase, "gradient_accumulation_steps", 1)
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout")
    eval_every: int = redefault(TrainBase, "eval_every", 50)
    # RL can lower held-out scores (noisy gradients): the starting model is a candidate too
    eval_at_start: bool = redefault(TrainBase, "eval_at_start", True)
    save_every: int = redefault(TrainBase, "save_every", 50)

    @property
    def step_prompts(self) -> int:
        """Prompts whose completions one optimizer step trains on (per process)."""
        return self.batch_prompts * self.gradient_accumulation_steps

    def steps_per_rollout(self, world: int = 1) -> int:
        """Optimizer steps one rollout gives on `world` processes: every process takes an equal share of
        the rollout's prompts and passes over them `ppo_epochs` times, `step_prompts` at a time."""
        return self.ppo_epochs * self.rollout_prompts // (self.step_prompts * world)

    def rollouts(self, world: int = 1) -> int:
        """Rollouts sampled over the whole stage (the last one may be used in part)."""
        return -(-self.max_steps // max(1, self.steps_per_rollout(world)))

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if self.rollout_prompts % self.step_prompts:
            yield ("rollout_prompts",), (f"rollout_prompts ({self.rollout_prompts}) must be a multiple of batch_prompts x "
                                         f"gradient_accumulation_steps ({self.batch_prompts} x "
                                         f"{self.gradient_accumulation_steps}), so every rollout splits into whole steps")


class Decoding(StrictModel):
    """Which decoder generates a stage's tokens."""

    decode: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="static: a preallocated KV cache and, on CUDA, a graph-captured decode step; dynamic: a "
                            "growing KV cache; both give the same tokens. auto = static on CUDA for llmlab's own model, "
                            "falling back to dynamic (with a warning) if it fails there; a forced static that fails ends "
                            "the stage. LLMLAB_DECODE overrides")


class Sampling(Decoding):
    """How a stage samples answers from its model."""

    temperature: float = Field(1.0, gt=0, description="sampling temperature (RL log-probabilities use the same one)")
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens; 0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="sample within this probability mass; 1 = off")
    max_prompt_length: int | None = Field(None, ge=1, description="prompts are cut from the left to this many tokens; "
                                                                  "None = the context minus max_new_tokens")


class RlStageBase(ModelStage, RewardSource, Sampling, Distributed):
    """What PPO and GRPO share: prompts, a reward, sampling, a KL to the starting model, LoRA."""

    makes_model: ClassVar[bool] = True

    data: list[DataSource] = Field(min_length=1, description="prompts: a prompt column, chat messages or hh-rlhf "
                                                             "transcripts")
    train: RlTrain = Field(default_factory=RlTrain, description="the training schedule")
    lora: LoraSpec | None = Field(None, description="train LoRA adapters; the KL reference is then the same model with "
                                                    "its adapters disabled")
    max_new_tokens: int = Field(128, ge=1, description="completion length limit, in tokens")
    clip_range: float = Field(0.2, gt=0, description="the policy ratio's clip epsilon")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of prompts held out by hash when a source has no "
                                                              "validation split (0: none)")
    max_prompts: int | None = Field(None, ge=1, description="training prompts read; None = all")
    eval_prompts: int = Field(64, ge=1, description="held-out prompts scored (greedy) at each evaluation")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if self.distributed is not None and self.distributed.strategy == "fsdp":
            yield ("distributed", "strategy"), f"{self.kind} runs under ddp only (rollouts need the whole policy on each rank): set strategy: ddp"


class PpoStage(RlStageBase):
    """PPO (Schulman et al. 2017, arXiv 1707.06347) with the InstructGPT recipe: a value head, GAE,
    clipped policy and value losses, a per-token KL penalty to the starting model."""

    kind: Literal["ppo"] = Field(description="online RL with PPO: a value head, GAE, a per-token KL penalty")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    clip_range_value: float = Field(0.2, gt=0, description="the value prediction's clip")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE's bias/variance trade-off")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty (the initial value when adaptive)")
    target_kl: float | None = Field(None, gt=0, description="nats per completion; set = adapt kl_coef toward it "
                                                            "(Ziegler et al. 2019)")
    kl_horizon: int = Field(10000, ge=1, description="episodes over which the adaptive coefficient moves")


class GrpoStage(RlStageBase):
    """GRPO (Shao et al. 2024, arXiv 2402.03300): group_size completions per prompt, advantages
    normalised within the group, the clipped objective, a k3 KL to the starting model, no value."""

    renamed: ClassVar[dict[str, str]] = {
        "grpo_temperature": "renamed to temperature (the sampling temperature, as in ppo and preferences)"}

    kind: Literal["grpo"] = Field(description="online RL with GRPO: groups of completions per prompt, no value head")
    group_size: int = Field(4, ge=2, description="completions per prompt")
    kl_coef: float = Field(0.04, ge=0, description="weight of the k3 KL term (0 = no reference model)")
    dynamic_sampling: bool = Field(False, description="drop groups whose rewards are all equal and sample more prompts "
                                                      "(DAPO)")
    max_resample_rounds: int = Field(4, ge=1, description="with dynamic_sampling: extra sampling rounds per rollout at most")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        yield from super().rules()
        if self.dynamic_sampling and self.distributed is not None and self.distributed.world_size > 1:
            yield ("dynamic_sampling",), ("dynamic_sampling draws a varying number of prompts per rollout, which "
                                          "one process does; set it off under distributed")


class PreferencesStage(ModelStage, RewardSource, Sampling):
    """On-policy preference pairs: sample `samples_per_prompt` answers per prompt from the starting
    model, score them with a reward, and keep the best and the worst of each prompt as a chosen /
    rejected pair (pairs from the model's own mistakes, as online and iterative DPO use). A dpo stage
    that starts `from` this stage trains on these pairs (and its own `data:`), from the same model."""

    kind: Literal["preferences"] = Field(description="sample answers, score them, write chosen/rejected pairs")
    data: list[DataSource] = Field(min_length=1, description="prompts: the ppo/grpo formats (prompt, messages, hh-rlhf, "
                                                             "question)")
    samples_per_prompt: int = Field(8, ge=2, description="answers sampled per prompt")
    max_new_tokens: int = Field(64, ge=1, description="answer length limit, in tokens")
    max_prompts: int | None = Field(2000, ge=1, description="prompts sampled (the training split's first ones)")
    batch_prompts: int = Field(32, ge=1, description="prompts sampled at once (x samples_per_prompt sequences)")
    min_margin: float = Field(0.0, ge=0, description="a pair needs chosen score - rejected score > this (ties teach nothing)")
    answer_as_chosen: bool = Field(False, description="when no sample beats another, the row's `answer` column is the "
                                                      "chosen response")


class ExportStage(StageBase):
    """Export a stage's model: `hf` (transformers format, llmlab's code registered) or `llama`
    (a stock LlamaForCausalLM, for Llama-compatible architectures; logits equal ours)."""

    makes_model: ClassVar[bool] = True

    kind: Literal["export"] = Field(description="write a stage's model in another format")
    format: Literal["hf", "llama"] = Field("hf", description="hf: transformers with llmlab's code; llama: a stock "
                                                             "LlamaForCausalLM (Llama-compatible architectures)")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if len(self.from_stages) != 1:
            yield ("from",), "export takes exactly one stage in `from`"


DEFAULT_PROMPTS = ["The", "def ", "Return the", "This module"]


class EvalModel(StrictModel):
    """A model an eval stage scores beside the pipeline's own: a folder or a hub name."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="its name in the report and in metric names")
    path: str = Field(description="a model folder (transformers format) or a hub name (needs network, or the local cache)")


class Benchmark(StrictModel):
    """An lm-evaluation-harness task (or group) an eval stage runs on every model it scores: llmlab's own
    (`llmlab`, `llmlab_tasks_gen`, `llmlab_tasks_mc`, `llmlab_stdlib_mc`, offline), one of lm-eval's
    built-in tasks (its dataset from the hub or the local cache), or one defined in a local task YAML."""

    task: str = Field(description="the task or group name")
    include: str | None = Field(None, description="a task YAML file, or a folder of them, that defines the task (lm-eval's "
                                                   "include_path); its data may be local JSON/JSONL/CSV/parquet files")
    num_fewshot: int | None = Field(None, ge=0, description="examples in each prompt; None = the task's own default")
    limit: int | None = Field(None, ge=1, description="documents scored per model; None = every document of the task")
    chat_template: bool | None = Field(None, description="render prompts with each model's chat template; None = the "
                                                         "task's own choice (llmlab's chat tasks: yes; every other: no)")


class EvalStage(StageBase, RewardSource, Decoding):
    """Held-out loss/perplexity of each model — the `from` stages' and any `models:` folders or hub
    names, all on the same held-out documents, tasks and pairs — plus sample generations."""

    renamed: ClassVar[dict[str, str]] = {"batch_size": "renamed to batch_sequences (sequences per evaluation batch)"}
    reward_required: ClassVar[bool] = False

    kind: Literal["eval"] = Field(description="score models on held-out text, tasks and pairs")
    data: list[DataSource] = Field(default_factory=list, description="text whose held-out documents are scored for loss "
                                                                     "and perplexity")
    val_fraction: float = Field(0.01, gt=0, lt=1, description="must match the pretrain stage's, so the documents stay held out")
    batch_sequences: int = Field(8, ge=1, description="sequences per evaluation batch")
    batches: int = Field(20, ge=1, description="evaluation batches per model")
    seq_len: int | None = Field(None, ge=8, description="tokens per scored sequence; None = the model's max_seq_len")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="prompts whose continuations "
                                                                                          "the report shows")
    max_new_tokens: int = Field(32, ge=1, description="length of the shown continuations, in tokens")
    tasks: list[DataSource] = Field(default_factory=list, description="held-out checkable prompts, e.g. builtin:tasks-prompts "
                                                                      "split test")
    tasks_limit: int = Field(200, ge=1, description="prompts scored per model for exact match")
    task_max_new_tokens: int = Field(16, ge=1, description="longest answer generated for a task prompt")
    preferences: list[DataSource] = Field(default_factory=list, description="held-out pairs, e.g. builtin:tasks-preference "
                                                                            "split test")
    preferences_limit: int = Field(200, ge=1, description="pairs scored per model for preference accuracy")
    temperature: float = Field(0.0, ge=0, description="sampling temperature of the answers; 0 = greedy, so they are "
                                                      "reproducible")
    models: list[EvalModel] = Field(default_factory=list, description="model folders / hub names scored beside the stages")
    benchmarks: list[Benchmark] = Field(default_factory=list, description="lm-evaluation-harness tasks run on every model")
    contamination_ngram: int = Field(13, ge=1, description="word n-gram size of the contamination check: a benchmark "
                                                           "document counts as seen when one of its n-grams (the whole "
                                                           "document, when shorter) occurs in an upstream stage's "
                                                           "training data")

    @property
    def model_stages(self) -> list[str]:
        """The stages whose models are evaluated (`from`)."""
        return self.from_stages

    def rules(self) -> Iterator[tuple[Loc, str]]:
        if not self.model_stages and not self.models:
            yield ("from",), "eval needs `from` (the stages whose models to score) or `models` (folders or hub names)"
        if not (self.data or self.tasks or self.preferences or self.benchmarks):
            yield ("data",), "eval scores nothing: give `data` (held-out text), `tasks`, `preferences` or `benchmarks`"
        tasks = [b.task for b in self.benchmarks]
        for i, b in enumerate(self.benchmarks):
            if tasks.count(b.task) > 1:
                yield ("benchmarks", i, "task"), f"'{b.task}' is listed twice: give each task once"
        names = self.model_stages + [m.name for m in self.models]
        for i, m in enumerate(self.models):
            if names.count(m.name) > 1:
                yield ("models", i, "name"), f"'{m.name}' names two of the evaluated models: give each a different name"


Stage = Annotated[Union[PretrainStage, SftStage, MergeStage, DpoStage, RewardStage, PpoStage, GrpoStage, PreferencesStage,
                        EvalStage, ExportStage], Field(discriminator="kind")]
# kind -> its block, read off the union (each block's `kind` is a one-value Literal)
STAGE_CLASSES: dict[str, type[StageBase]] = {typing.get_args(cls.model_fields["kind"].annotation)[0]: cls
                                             for cls in typing.get_args(typing.get_args(Stage)[0])}
STAGE_KINDS = tuple(STAGE_CLASSES)
