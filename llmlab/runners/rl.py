"""The ppo and grpo stages: online RL on prompts against a reward, from a starting model.

Both sample completions from the policy (batched, KV-cached), score them with the stage's reward (a
builtin, `module:function`, a reward model folder / hub name, or an earlier reward stage), and
update the policy with the clipped objective over `ppo_epochs` passes of mini-batches (one loop
step per mini-batch). The KL reference is the starting model: a frozen copy, or, with `lora:`, the
same network with its adapters disabled. PPO adds a value head on the policy's last hidden state
(saved as `value_head.pt`); GRPO has none. Held-out prompts are scored greedily at every
evaluation (mean reward, exact match when the prompts have answers); the best evaluation's weights
are the stage's output unless `save_best_only: false`. Outputs as the sft stage: `model/` or
`adapters/{final,best}`.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext

import torch

from llmlab.checkpoint import atomic_dir
from llmlab.data.prompts import prepare_prompt_data
from llmlab.device import autocast_dtype, pick_device
from llmlab.errors import UserError
from llmlab.generate import stop_token_ids
from llmlab.models import model_context
from llmlab.parallel import barrier, current
from llmlab.rewards import load_reward
from llmlab.runners.common import (
    StageCallbacks,
    attach_lora,
    load_start,
    prepare_checkpoints,
    report_data,
    save_trained,
    stage_metrics,
    val_limit,
)
from llmlab.runners.context import StageContext
from llmlab.train.grpo import GRPOObjective, GRPOPrepare
from llmlab.train.loop import train
from llmlab.train.ppo import PolicyWithValue, PPOObjective, PPOPrepare
from llmlab.train.rl import AdaptiveKL
from llmlab.train.rollout import RolloutBatches, Sampling, disable_dropout, rl_evaluate, rollout_logps


def _reference(model, disable_adapters: bool, temperature: float, chunk: int):
    """rollout -> (B, N) reference log-probs of its sampled tokens."""

    def score(rollout):
        with model.disable_adapter() if disable_adapters else nullcontext():
            return rollout_logps(model, rollout, temperature, chunk)[0]

    return score


def _policy_only_best(result, ckpt, wrapper):
    """The loop's best state holds the policy and its value head: keep the policy's weights only,
    so the shared writer of model/adapters can load them."""
    if result.best_path is None:
        return result
    if current().main:
        state = torch.load(result.best_path / "state.pt", map_location="cpu", weights_only=True)
        with atomic_dir(ckpt / "best-policy") as tmp:
            torch.save({**state, "model": wrapper.policy_state_dict(state["model"])}, tmp / "state.pt")
            torch.save({k[len("value_head."):]: v for k, v in state["model"].items() if k.startswith("value_head.")},
                       tmp / "value_head.pt")
    barrier()
    return dataclasses.replace(result, best_path=ckpt / "best-policy")


def run_rl(ctx: StageContext) -> tuple[dict[str, str], dict[str, float]]:
    stage, spec = ctx.config, ctx.spec
    ppo = stage.kind == "ppo"
    model, tok, base, new_ids = load_start(ctx)
    context = model_context(model)
    max_prompt = stage.max_prompt_length or context - stage.max_new_tokens
    if max_prompt < 1 or max_prompt + stage.max_new_tokens > context:
        raise UserError(f"stage '{ctx.name}': max_prompt_length ({max_prompt}) + max_new_tokens ({stage.max_new_tokens}) "
                         f"must fit the model's context of {context} tokens; lower max_new_tokens or max_prompt_length")
    data = prepare_prompt_data(stage.data, tok, max_prompt, spec.seed, stage.val_fraction, stage.max_prompts,
                               max_val_prompts=val_limit(stage, stage.eval_prompts))
    report_data(ctx, data, "prompts")
    device = pick_device()
    reward_name = stage.reward or f"reward stage {stage.reward_stage}"
    reward_fn = load_reward(ctx.inputs[stage.reward_stage].outputs["model"] if stage.reward_stage else stage.reward,
                            device=str(device))
    ctx.run.set_tags({"llmlab.reward": reward_name})
    lora = stage.lora is not None
    if lora:
        model = attach_lora(ctx, model, tok, stage.lora, new_ids)
    disable_dropout(model)  # old and new log-probs must come from the same deterministic policy
    model.to(device)
    par = current()
    T = stage.sampling_temperature
    train_cfg = stage.train
    group = 1 if ppo else stage.group_size  # completions per prompt
    if train_cfg.rollout_prompts % (par.world * train_cfg.step_prompts):
        raise UserError(f"stage '{ctx.name}' on {par.world} processes: each process takes an equal share of every "
                         f"rollout, so rollout_prompts ({train_cfg.rollout_prompts}) must be a multiple of {par.world} x "
                         f"batch_prompts x gradient_accumulation_steps ({train_cfg.step_prompts})")
    rank_mini = train_cfg.step_prompts * group  # completions per optimizer step on this process
    micro = train_cfg.batch_prompts * group  # completions per forward pass
    reference = None
    if ppo or stage.kl_coef > 0:
        if lora:
            reference = _reference(model, True, T, micro)
            kind = "the same model with adapters disabled"
        else:
            reference = _reference(copy.deepcopy(model).eval().requires_grad_(False), False, T, micro)
            kind = "a frozen copy of the starting model"
        ctx.run.set_tags({"llmlab.reference": kind})
    sampling = Sampling(stage.max_new_tokens, T, stage.top_k, stage.top_p, stop_token_ids(tok, model),
                        tok.pad_token_id if tok.pad_token_id is not None else 0)
    if ppo:
        hidden = getattr(model.config, "d_model", None) or model.config.hidden_size
        trained = PolicyWithValue(model, hidden).to(device)
        prepare = PPOPrepare(trained, reference, tok, reward_fn, reward_name, sampling,
                             AdaptiveKL(stage.kl_coef, stage.target_kl, stage.kl_horizon), stage.gamma, stage.gae_lambda,
                             micro, spec.seed)
        objective = PPOObjective(stage.clip_range, stage.clip_range_value, stage.vf_coef, T,
                                 str(stage.train.chunked_loss), stage.train.loss_chunk_tokens)
    else:
        trained = model
        prepare = GRPOPrepare(model, reference, tok, reward_fn, reward_name, sampling, stage.group_size, micro, spec.seed,
                              stage.dynamic_sampling, stage.max_resample_rounds)
        objective = GRPOObjective(stage.clip_range, stage.kl_coef, T, str(stage.train.chunked_loss),
                                  stage.train.loss_chunk_tokens)
    per_rollout = train_cfg.ppo_epochs * train_cfg.rollout_prompts // (train_cfg.step_prompts * par.world)
    print(f"[{ctx.name}] {stage.kind}: {train_cfg.rollout_prompts} prompts per rollout "
          f"({train_cfg.rollout_prompts * group} completions), {per_rollout} optimizer steps per rollout, "
          f"{-(-train_cfg.max_steps // per_rollout)} rollouts; reward: {reward_name}")
    amp = autocast_dtype(stage.train.precision, device)
    batches = RolloutBatches(data.train, prepare, train_cfg.rollout_prompts, rank_mini, train_cfg.gradient_accumulation_steps,
                             train_cfg.ppo_epochs, spec.seed, amp, device.type, par.rank, par.world)

    def evaluate(m):
        return rl_evaluate(m.policy if ppo else m, tok, data.val, reward_fn, reward_name, sampling)

    ckpt = prepare_checkpoints(ctx)
    result = train(trained, objective, batches, train_cfg, ckpt, evaluate=evaluate if data.val else None,
                   callbacks=StageCallbacks(ctx), seed=spec.seed, label=ctx.name,
                   best_metric="eval/reward_mean", maximize=True)
    outputs = {"checkpoints": str(ckpt)}
    if ppo:
        result = _policy_only_best(result, ckpt, trained)
        best_head = result.best_path / "value_head.pt" if result.best_path else None
        head = (torch.load(best_head, weights_only=True) if stage.train.save_best_only and best_head
                else trained.value_head.state_dict())  # the value head that goes with the exported policy
        torch.save(head, ctx.out_dir / "value_head.pt")
        outputs["value_head"] = str(ctx.out_dir / "value_head.pt")
    outputs.update(save_trained(ctx, model, tok, base, result, lora, stage.train.save_best_only))
    final = rl_evaluate(model.to(device), tok, data.val, reward_fn, reward_name, sampling) if data.val else {}
    return outputs, stage_metrics(ctx, result, final)
