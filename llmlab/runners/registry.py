"""The runner of each stage kind, looked up by name: `runner(kind)(ctx) -> (outputs, metrics)`.

A plain dict of functions (no plugin machinery). Importing it imports every runner module, so only
code that runs stages (`llmlab.stages`, `llmlab.launch`) imports it.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

from llmlab.runners.context import StageContext
from llmlab.runners.dpo import run_dpo
from llmlab.runners.eval import run_eval
from llmlab.runners.export import run_export
from llmlab.runners.merge import run_merge
from llmlab.runners.preferences import run_preferences
from llmlab.runners.pretrain import run_pretrain
from llmlab.runners.reward import run_reward
from llmlab.runners.rl import run_rl
from llmlab.runners.sft import run_sft
from llmlab.runners.tokenizer import run_tokenizer

Runner = Callable[[StageContext], tuple[dict[str, str], dict[str, float]]]

RUNNERS: dict[str, Runner] = {
    "tokenizer": run_tokenizer,
    "pretrain": run_pretrain,
    "sft": run_sft,
    "merge": run_merge,
    "dpo": run_dpo,
    "reward": run_reward,
    "ppo": run_rl,
    "grpo": run_rl,
    "preferences": run_preferences,
    "export": run_export,
    "eval": run_eval,
}


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators from the spec's seed. Whatever ran earlier in
    the process (another stage, a library drawing at import) then cannot change what a stage draws
    without its own generator: new embedding rows, LoRA's initial A matrices, dropout masks."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def runner(kind: str) -> Runner:
    """The runner function of a stage kind: ctx -> (outputs {name: path}, metrics), seeded from the
    spec's seed before it starts."""
    run = RUNNERS[kind]

    def seeded(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
        seed_everything(ctx.spec.seed)
        return run(ctx)

    return seeded
