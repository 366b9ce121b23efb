"""What llmlab knows about one stage kind, in one record: `StageKind`.

    KIND = StageKind(name="sft", config=SftStage, run=run_sft, main_output="output", ...)   # in runners/sft.py

Each runner module (`llmlab.runners.<kind>`) defines its kind's record next to its runner, and
`llmlab.runners.registry` lists them; every other module asks the record — the stage executor for
the runner and the main output, the cache for the resolved config, preflight for the data shape and
the models a stage names, `inspect` and `plan` for the memory and time estimates and the line that
says what the stage does. Importing a record is cheap: runners import torch and the training code
only when they run, so `llmlab validate` and `plan` stay quick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from llmlab.data.reader import Kind
    from llmlab.data.sources import DataSource
    from llmlab.estimate import ForwardFn, StageEstimate, Work
    from llmlab.runners.context import StageContext
    from llmlab.spec import Pipeline

Runner = Callable[["StageContext"], "tuple[dict[str, str], dict[str, float]]"]


@dataclass(frozen=True)
class NamedModel:
    """A model folder or hub name a stage loads besides its starting model, and what it must be."""

    path: str
    role: str  # how the stage uses it, in words: "reference model", "reward model", "evaluated model 'x'"
    need: str  # "causal" (a causal LM), "classifier" (a sequence classifier) or "adapters" (a peft adapter folder)


def block_config(spec: Pipeline, stage: str) -> dict[str, Any]:
    """A stage's resolved config as most kinds have it: its block, plus the pipeline's seed."""
    return {**spec.stages[stage].model_dump(mode="json", by_alias=True), "seed": spec.seed}


def no_models(stage: Any) -> list[NamedModel]:
    return []


def reward_models(stage: Any) -> list[NamedModel]:
    """The reward model a `reward:` names when it is a model folder or hub name (not a builtin or
    module:function)."""
    from pathlib import Path

    ref = stage.reward
    if ref and (("/" in ref and ":" not in ref) or Path(ref).expanduser().exists()):
        return [NamedModel(ref, "reward model", "classifier")]
    return []


def describe_sequences(spec: Pipeline, block: Any, est: StageEstimate | None) -> str:
    """A stage that counts sequences: its steps, sequences per step and tokens in all."""
    train = block.train
    seq = est.seq_len if est is not None and est.seq_len else spec.model.max_seq_len
    tokens = train.max_steps * train.batch_sequences * train.gradient_accumulation_steps * seq
    return (f"{train.max_steps:,} steps x {train.batch_sequences}x{train.gradient_accumulation_steps} sequences = "
            f"{tokens:,} tokens")


def describe_pairs(spec: Pipeline, block: Any, est: StageEstimate | None) -> str:
    """A stage that counts preference pairs: its steps, pairs per step and sequences per forward pass."""
    train = block.train
    return (f"{train.max_steps:,} steps x {train.batch_pairs * train.gradient_accumulation_steps} pairs "
            f"({2 * train.batch_pairs} sequences per forward pass)")


@dataclass(frozen=True)
class StageKind:
    """Everything about one stage kind. Fields without a default say what every kind must say; a test
    walks the registry and checks each record is complete and agrees with the spec."""

    name: str  # the spec's `kind:` ("tokenizer" for the pipeline's implicit first stage)
    config: type  # its spec block (a `llmlab.spec.stages` class; TokenizerSpec for the tokenizer)
    run: Runner  # ctx -> (outputs {name: path}, metrics); imports what it needs when it runs
    main_output: str  # the output whose fingerprint identifies a finished stage (what downstream cache keys hash)
    summary: str  # what the stage does, in a few words (inspect and plan)
    data: tuple[tuple[str, Kind], ...] = ()  # (field of the block, dotted, and row shape) of each data list it reads
    policy: bool = False  # its `model:` must be a causal LM (it samples or trains one)
    models: Callable[[Any], list[NamedModel]] = no_models  # the other models its block names
    forward: ForwardFn | None = None  # its part of the memory estimate; None for a stage that trains nothing
    work: Callable[[Any, StageEstimate], Work] | None = None  # (block, memory estimate) -> its FLOPs
    describe: Callable[[Pipeline, Any, StageEstimate | None], str] | None = None  # -> the work it does, in words
    resolve: Callable[[Pipeline, str], dict[str, Any]] = block_config  # the config it runs with (what the cache hashes)

    @property
    def makes_model(self) -> bool:
        """Its output is a language model a later stage can start from (`llmlab.spec.stages`)."""
        return bool(getattr(self.config, "makes_model", False))

    @property
    def trains(self) -> bool:
        return self.forward is not None

    def sources(self, stage: Any) -> list[tuple[DataSource, Kind]]:
        """Every data source a stage block of this kind reads, with the row shape it expects."""
        found = []
        for path, kind in self.data:
            node = stage
            for name in path.split("."):  # a dotted path: the tokenizer's `train.data`
                node = getattr(node, name, None) if node is not None else None
            found += [(source, kind) for source in node or []]
        return found

    def estimate(self, spec: Pipeline, stage: str) -> StageEstimate | None:
        """The stage's peak training memory (`llmlab.estimate`); None when it trains nothing."""
        if self.forward is None:
            return None
        from llmlab.estimate import estimate_training

        return estimate_training(spec, stage, self.forward)
