"""Every stage kind's record (`llmlab.runners.kind.StageKind`), by name: the one list of kinds.

    KINDS["sft"].run(ctx)                     # or runner("sft"): seeded from the spec's seed first
    kind_of(spec, "dpo").main_output          # the record of a concrete stage of a spec
    resolved_config(spec, "dpo")              # the config it runs with: what cache keys hash
    estimate_stage(spec, "dpo")               # its peak training memory (None: it trains nothing)

Adding a stage kind: its block in `llmlab.spec.stages` (and the `Stage` union), its runner module
here with a `KIND` record, and one entry below. Importing this module is cheap (no torch): runners
import what they need when they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmlab.runners import dpo, eval, export, grpo, merge, ppo, preferences, pretrain, reward, sft, tokenizer
from llmlab.runners.kind import Runner, StageKind

if TYPE_CHECKING:
    from llmlab.estimate import StageEstimate
    from llmlab.runners.context import StageContext
    from llmlab.spec import Pipeline

KINDS: dict[str, StageKind] = {kind.name: kind for kind in (
    tokenizer.KIND,
    pretrain.KIND,
    sft.KIND,
    merge.KIND,
    dpo.KIND,
    reward.KIND,
    ppo.KIND,
    grpo.KIND,
    preferences.KIND,
    eval.KIND,
    export.KIND,
)}


def kind_of(spec: Pipeline, stage: str) -> StageKind:
    """The record of a concrete stage of `spec` (the implicit `tokenizer` stage included)."""
    return KINDS["tokenizer" if stage == "tokenizer" else spec.stages[stage].kind]


def resolved_config(spec: Pipeline, stage: str) -> dict[str, Any]:
    """The stage's full configuration as it will run: its block plus what it inherits (the seed; a
    pretrain stage from scratch the model and tokenizer). Cache keys and checkpoints hash it."""
    return kind_of(spec, stage).resolve(spec, stage)


def estimate_stage(spec: Pipeline, stage: str) -> StageEstimate | None:
    """The peak training memory of a stage (`llmlab.estimate`); None for a stage that trains nothing."""
    return None if stage == "tokenizer" else kind_of(spec, stage).estimate(spec, stage)


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators from the spec's seed. Whatever ran earlier in
    the process (another stage, a library drawing at import) then cannot change what a stage draws
    without its own generator: new embedding rows, LoRA's initial A matrices, dropout masks."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def runner(kind: str) -> Runner:
    """The runner function of a stage kind: ctx -> (outputs {name: path}, metrics), seeded from the
    spec's seed before it starts."""
    run = KINDS[kind].run

    def seeded(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
        seed_everything(ctx.spec.seed)
        return run(ctx)

    return seeded
