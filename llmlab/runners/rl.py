"""What the ppo and grpo stages share: online RL on prompts against a reward, from a starting model.

Both sample completions from the policy (batched, KV-cached), score them with the stage's reward (a
builtin, `module:function`, a reward model folder / hub name, or an earlier reward stage), and
update the policy with the clipped objective over `ppo_epochs` passes of mini-batches (one loop
step per mini-batch; `RlTrain.steps_per_rollout`). The KL reference is the starting model: a frozen
copy, or, with `lora:`, the same network with its adapters disabled. Held-out prompts are scored
greedily at every evaluation (mean reward, exact match when the prompts have answers); the best
evaluation's weights are the stage's output unless `save_best_only: false`. Outputs as the sft
stage: `model/` or `adapters/{final,best}`.

    setup = prepare_rl(ctx, group, reference=True)      # model, data, reward, sampling, reference
    result, ckpt, batches = train_rl(ctx, setup, trained, prepare, objective, policy=...)
    return finish_rl(ctx, setup, result, ckpt, batches, outputs)

`runners/ppo.py` and `runners/grpo.py` add what is their own (a value head; groups of completions).
The memory, time and description hooks of both records are here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from llmlab.estimate import Forward, ModelSource, StageEstimate, Work, reference_bytes, reward_model_bytes

if TYPE_CHECKING:
    from llmlab.runners.context import StageContext
    from llmlab.spec import Pipeline

# The update's logits (llmlab.train.rollout.policy_logps): the full (B, P+N, V) logits and their
# gradient do not live together; one full-length tensor plus two completion-length ones (tempered
# logits, their gradient) are alive at the peak.
FULL_LOGIT_COPIES = 1
COMPLETION_LOGIT_COPIES = 2
EVAL_BATCH = 64  # llmlab.train.rollout.rl_evaluate samples held-out prompts 64 at a time
TOKEN_ID_BYTES = 8  # int64 input_ids and attention_mask of rollout rows


@dataclass
class RlSetup:
    """What both RL stages build before training: the model and tokenizer, prompts, the reward, how
    to sample, and the KL reference (None without one)."""

    model: Any
    tok: Any
    base: str
    data: Any  # prompt data: train and val prompts
    reward_fn: Callable
    reward_name: str
    sampling: Any  # llmlab.train.rollout.Sampling
    reference: Callable | None  # rollout -> (B, N) reference log-probs
    device: Any
    group: int  # completions per prompt
    micro: int  # completions per forward pass


def _reference(model: Any, disable_adapters: bool, temperature: float, chunk: int) -> Callable:
    """rollout -> (B, N) reference log-probs of its sampled tokens."""
    from contextlib import nullcontext

    from llmlab.train.rollout import rollout_logps

    def score(rollout):
        with model.disable_adapter() if disable_adapters else nullcontext():
            return rollout_logps(model, rollout, temperature, chunk)[0]

    return score


def prepare_rl(ctx: StageContext, group: int, reference: bool) -> RlSetup:
    """Load the starting model (with LoRA when asked), the prompts, the reward; check the batch splits
    over the processes; build the sampler settings and, when `reference`, the KL reference."""
    import copy

    from llmlab.data.prompts import prepare_prompt_data
    from llmlab.device import pick_device
    from llmlab.errors import UserError
    from llmlab.generate import stop_token_ids
    from llmlab.models import model_context
    from llmlab.parallel import current
    from llmlab.rewards import load_reward
    from llmlab.runners.common import attach_lora, load_start, report_data, val_limit
    from llmlab.train.rollout import Sampling, disable_dropout

    stage, spec = ctx.config, ctx.spec
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
    if stage.lora is not None:
        model = attach_lora(ctx, model, tok, stage.lora, new_ids)
    disable_dropout(model)  # old and new log-probs must come from the same deterministic policy
    model.to(device)
    train_cfg, world = stage.train, current().world
    if train_cfg.rollout_prompts % (world * train_cfg.step_prompts):
        raise UserError(f"stage '{ctx.name}' on {world} processes: each process takes an equal share of every "
                        f"rollout, so rollout_prompts ({train_cfg.rollout_prompts}) must be a multiple of {world} x "
                        f"batch_prompts x gradient_accumulation_steps ({train_cfg.step_prompts})")
    micro = train_cfg.batch_prompts * group
    scorer = None
    if reference:
        if stage.lora is not None:
            scorer = _reference(model, True, stage.temperature, micro)
            what = "the same model with adapters disabled"
        else:
            scorer = _reference(copy.deepcopy(model).eval().requires_grad_(False), False, stage.temperature, micro)
            what = "a frozen copy of the starting model"
        ctx.run.set_tags({"llmlab.reference": what})
    sampling = Sampling(stage.max_new_tokens, stage.temperature, stage.top_k, stage.top_p, stop_token_ids(tok, model),
                        tok.pad_token_id if tok.pad_token_id is not None else 0)
    return RlSetup(model, tok, base, data, reward_fn, reward_name, sampling, scorer, device, group, micro)


def train_rl(ctx: StageContext, setup: RlSetup, trained: Any, prepare: Any, objective: Any,
             policy: Callable[[Any], Any]) -> tuple[Any, Any, Any]:
    """Run the loop on rollouts of `prepare` with `objective`; `policy(trained)` is the model that
    samples at evaluations. Returns (loop result, checkpoint folder, the rollout batch source)."""
    from llmlab.device import autocast_dtype
    from llmlab.parallel import current
    from llmlab.runners.common import StageCallbacks, prepare_checkpoints
    from llmlab.train.loop import train
    from llmlab.train.rollout import RolloutBatches, rl_evaluate

    stage, spec, train_cfg, par = ctx.config, ctx.spec, ctx.config.train, current()
    per_rollout = train_cfg.steps_per_rollout(par.world)
    group = setup.group
    print(f"[{ctx.name}] {stage.kind}: {train_cfg.rollout_prompts} prompts per rollout "
          f"({train_cfg.rollout_prompts * group} completions), {per_rollout} optimizer steps per rollout, "
          f"{train_cfg.rollouts(par.world)} rollouts; reward: {setup.reward_name}")
    amp = autocast_dtype(train_cfg.precision, setup.device)
    batches = RolloutBatches(setup.data.train, prepare, train_cfg.rollout_prompts, train_cfg.step_prompts * group,
                             train_cfg.gradient_accumulation_steps, train_cfg.ppo_epochs, spec.seed, amp,
                             setup.device.type, par.rank, par.world)

    def evaluate(m):
        return rl_evaluate(policy(m), setup.tok, setup.data.val, setup.reward_fn, setup.reward_name, setup.sampling)

    ckpt = prepare_checkpoints(ctx)
    result = train(trained, objective, batches, train_cfg, ckpt, evaluate=evaluate if setup.data.val else None,
                   callbacks=StageCallbacks(ctx), seed=spec.seed, label=ctx.name,
                   best_metric="eval/reward_mean", maximize=True)
    return result, ckpt, batches


def finish_rl(ctx: StageContext, setup: RlSetup, result: Any, ckpt: Any, batches: Any,
              outputs: dict[str, str]) -> tuple[dict[str, str], dict[str, float]]:
    """Write the policy (model or adapters), score it on the held-out prompts; the stage's metrics
    include the rollouts it sampled (`rl/rollouts`, this process's)."""
    from llmlab.runners.common import save_trained, stage_metrics
    from llmlab.train.rollout import rl_evaluate

    stage = ctx.config
    outputs = {"checkpoints": str(ckpt), **outputs,
               **save_trained(ctx, setup.model, setup.tok, setup.base, result, stage.lora is not None,
                              stage.train.save_best_only)}
    final = (rl_evaluate(setup.model.to(setup.device), setup.tok, setup.data.val, setup.reward_fn, setup.reward_name,
                         setup.sampling) if setup.data.val else {})
    return outputs, {**stage_metrics(ctx, result, final), "rl/rollouts": float(batches.rollouts)}


# --------------------------------------------------------------------------- estimates


def rl_forward(spec: Pipeline, block: Any, source: ModelSource, group: int, row_values: int, reference: bool,
               own: dict[str, int] | None = None) -> Forward:
    """A PPO/GRPO update's forward pass (the completions of batch_prompts prompts, prompt and answer),
    and what an RL stage holds besides: the reference (when `reference`), the kind's `own` parts (a
    value head), a reward model, the rollout's rows (`row_values` fp32 values per completion token),
    and sampling's KV cache and logits."""
    from llmlab.model import memory as mm

    shape, train, b = source.shape, block.train, mm.FP32_BYTES
    prompt = block.max_prompt_length or shape.max_context - block.max_new_tokens
    length = prompt + block.max_new_tokens
    world = block.distributed.world_size if block.distributed is not None else 1
    rollout = max(1, train.rollout_prompts // world) * group  # completions sampled at once on this process
    fwd = Forward(train.batch_prompts * group, length)
    if reference:
        fwd.parts["reference model"] = reference_bytes(spec, block, source, fwd.notes)
    else:
        fwd.notes.append("no reference model (kl_coef 0)")
    fwd.parts.update(own or {})
    fwd.parts.update(reward_model_bytes(spec, block, fwd.notes))
    row = length * 2 * TOKEN_ID_BYTES + block.max_new_tokens * row_values * b
    fwd.parts["rollout buffers"] = rollout * row * (train.ppo_epochs + 1)  # the rollout's rows and the queued passes
    sampled = max(rollout, min(block.eval_prompts, EVAL_BATCH))
    fwd.parts["KV cache"] = mm.kv_cache_bytes(shape, sampled, length)
    fwd.parts["sampling logits"] = mm.logits_bytes(shape, sampled)  # llmlab.generate keeps one position's logits per step
    fwd.notes.append(f"update: {fwd.sequences} completions of {length} tokens per forward pass; sampling: {sampled} "
                     f"at once with a KV cache")
    fwd.logits = (mm.logits_bytes(shape, fwd.sequences * length, FULL_LOGIT_COPIES)
                  + mm.logits_bytes(shape, fwd.sequences * block.max_new_tokens, COMPLETION_LOGIT_COPIES))
    return fwd


def rl_work(block: Any, est: StageEstimate, group: int, reference: bool) -> Work:
    """Training: 6 x parameters per token of every update's forward pass, plus scoring each rollout
    once with the policy (old log-probs) and the reference; sampling: 2 x parameters per decoded
    token of every rollout and every held-out evaluation (at most max_new_tokens per answer)."""
    params, train = est.params or 0, block.train
    rollouts = train.rollouts()
    completions = rollouts * train.rollout_prompts * group
    scored = completions * est.seq_len * 2 * params * (1 + reference)
    evaluations = train.max_steps // train.eval_every + int(train.eval_at_start) + 1
    decoded = (completions + evaluations * block.eval_prompts) * block.max_new_tokens
    updates = est.sequences * est.seq_len * train.max_steps * train.gradient_accumulation_steps * 6 * params
    return Work(updates + scored, 2 * params * decoded, rollouts)


def describe_rl(block: Any, group: int) -> str:
    train = block.train
    return (f"{train.max_steps:,} updates of {train.step_prompts} prompts ({train.step_prompts * group} completions), "
            f"{train.rollouts():,} rollouts of {train.rollout_prompts} prompts ({train.rollout_prompts * group} "
            f"completions), {train.steps_per_rollout()} updates each")
