"""The ppo stage: PPO with the InstructGPT recipe — a value head on the policy's last hidden state,
GAE advantages, clipped policy and value losses, a per-token KL penalty to the starting model
(adapted toward `target_kl` when set). What it shares with grpo is `llmlab.runners.rl`; the value
head that goes with the exported policy is saved as `value_head.pt`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmlab.data.formats import PROMPTS
from llmlab.runners.kind import StageKind, reward_models
from llmlab.runners.rl import describe_rl, rl_forward, rl_work
from llmlab.spec.stages import PpoStage

if TYPE_CHECKING:
    from llmlab.estimate import Forward, ModelSource
    from llmlab.runners.context import StageContext
    from llmlab.spec import Pipeline

# Per-token fp32 values of a rollout row kept until its updates are done (llmlab.train.ppo):
# completion_mask, old_logps, old_values, advantages, returns
ROW_VALUES = 5


def run_ppo(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    import torch

    from llmlab.runners.rl import finish_rl, prepare_rl, train_rl
    from llmlab.train.ppo import PolicyWithValue, PPOObjective, PPOPrepare, policy_only_best
    from llmlab.train.rl import AdaptiveKL

    stage, spec = ctx.config, ctx.spec
    setup = prepare_rl(ctx, group=1, reference=True)
    model = setup.model
    hidden = getattr(model.config, "d_model", None) or model.config.hidden_size
    trained = PolicyWithValue(model, hidden).to(setup.device)
    prepare = PPOPrepare(trained, setup.reference, setup.tok, setup.reward_fn, setup.reward_name, setup.sampling,
                         AdaptiveKL(stage.kl_coef, stage.target_kl, stage.kl_horizon), stage.gamma, stage.gae_lambda,
                         setup.micro, spec.seed)
    objective = PPOObjective(stage.clip_range, stage.clip_range_value, stage.vf_coef, stage.temperature,
                             str(stage.train.chunked_loss), stage.train.loss_chunk_tokens)
    result, ckpt, batches = train_rl(ctx, setup, trained, prepare, objective, policy=lambda m: m.policy)
    result = policy_only_best(result, ckpt, trained)
    best_head = result.best_path / "value_head.pt" if result.best_path else None
    head = (torch.load(best_head, weights_only=True) if stage.train.save_best_only and best_head
            else trained.value_head.state_dict())  # the value head that goes with the exported policy
    torch.save(head, ctx.out_dir / "value_head.pt")
    return finish_rl(ctx, setup, result, ckpt, batches, {"value_head": str(ctx.out_dir / "value_head.pt")})


def _forward(spec: Pipeline, block: Any, source: ModelSource) -> Forward:
    from llmlab.model.memory import FP32_BYTES

    head = (source.shape.d_model + 1) * FP32_BYTES * 4  # a d_model -> 1 linear head with its gradient and AdamW state
    return rl_forward(spec, block, source, group=1, row_values=ROW_VALUES, reference=True, own={"value head": head})


KIND = StageKind(
    name="ppo", config=PpoStage, run=run_ppo, main_output="output",
    summary="online RL with PPO against a reward", data=(("data", PROMPTS),), policy=True, models=reward_models,
    forward=_forward, work=lambda block, est: rl_work(block, est, group=1, reference=True),
    describe=lambda spec, block, est: describe_rl(block, group=1))
