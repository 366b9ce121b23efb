"""The grpo stage: GRPO — `group_size` completions per prompt, advantages normalised within each
prompt's group, the clipped objective and a k3 KL to the starting model (none with `kl_coef: 0`),
no value head; with `dynamic_sampling`, groups whose rewards are all equal are replaced by fresh
prompts (DAPO). What it shares with ppo is `llmlab.runners.rl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmlab.data.formats import PROMPTS
from llmlab.runners.kind import StageKind, reward_models
from llmlab.runners.rl import describe_rl, rl_forward, rl_work
from llmlab.spec.stages import GrpoStage

if TYPE_CHECKING:
    from llmlab.estimate import Forward, ModelSource
    from llmlab.runners.context import StageContext
    from llmlab.spec import Pipeline

# Per-token fp32 values of a rollout row kept until its updates are done (llmlab.train.grpo):
# completion_mask and old_logps, plus ref_logps with a reference
ROW_VALUES = 2


def run_grpo(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    from llmlab.runners.rl import finish_rl, prepare_rl, train_rl
    from llmlab.train.grpo import GRPOObjective, GRPOPrepare

    stage, spec = ctx.config, ctx.spec
    setup = prepare_rl(ctx, group=stage.group_size, reference=stage.kl_coef > 0)
    prepare = GRPOPrepare(setup.model, setup.reference, setup.tok, setup.reward_fn, setup.reward_name, setup.sampling,
                          stage.group_size, setup.micro, spec.seed, stage.dynamic_sampling, stage.max_resample_rounds)
    objective = GRPOObjective(stage.clip_range, stage.kl_coef, stage.temperature, str(stage.train.chunked_loss),
                              stage.train.loss_chunk_tokens)
    result, ckpt, batches = train_rl(ctx, setup, setup.model, prepare, objective, policy=lambda m: m)
    return finish_rl(ctx, setup, result, ckpt, batches, {})


def _forward(spec: Pipeline, block: Any, source: ModelSource) -> Forward:
    reference = block.kl_coef > 0
    return rl_forward(spec, block, source, group=block.group_size, row_values=ROW_VALUES + reference, reference=reference)


KIND = StageKind(
    name="grpo", config=GrpoStage, run=run_grpo, main_output="output",
    summary="online RL with GRPO against a reward", data=(("data", PROMPTS),), policy=True, models=reward_models,
    forward=_forward, work=lambda block, est: rl_work(block, est, group=block.group_size, reference=block.kl_coef > 0),
    describe=lambda spec, block, est: describe_rl(block, group=block.group_size))
