"""PPO for language models (Schulman et al. 2017, arXiv 1707.06347; InstructGPT, arXiv 2203.02155).

    policy = PolicyWithValue(causal_lm)                      # a value head on the policy's last hidden state
    prepare = PPOPrepare(policy, reference, tokenizer, reward_fn, "exact_match", sampling, kl=AdaptiveKL(...), ...)
    batches = RolloutBatches(prompts, prepare, batch_size, mini_batch_size, accumulation, ppo_epochs, seed)
    train(policy, PPOObjective(clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, temperature=1.0), batches, ...)

Rollout step (`PPOPrepare`, no gradient): sample completions, score them with the reward, compute
the old log-probs and values, the reference log-probs, the per-token rewards −kl_coef·(logp − ref)
with the score added on the last token, GAE advantages (whitened over the batch) and returns; then
the adaptive KL coefficient moves toward `target_kl`. Update step (`PPOObjective`): clipped policy
loss + vf_coef × clipped value loss on a mini-batch. The math lives in `llmlab.train.rl`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from llmlab.checkpoint import atomic_dir
from llmlab.data.prompts import Prompt
from llmlab.parallel import all_sum, barrier, current, mean_float
from llmlab.train.rl import AdaptiveKL, gae, kl_penalty_rewards, masked_mean, ppo_policy_loss, value_loss
from llmlab.train.rollout import Sampling, policy_logps, rollout_logps, sample_rollout, score_completions, stats_metrics


class PolicyWithValue(torch.nn.Module):
    """A causal LM (plain or peft) and a scalar value head read from its final hidden states. The
    head starts at zero, so the first values are 0 and the first advantages are the rewards'."""

    def __init__(self, policy: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, temperature: float,
                chunked: str = "off", chunk_tokens: int = 4096
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits / T, completion log-probs, values, entropies), as `policy_logps` (a module call, so DDP syncs it)."""
        return policy_logps(self.policy, input_ids, attention_mask, prompt_width, temperature, self.value_head,
                            chunked, chunk_tokens)

    def policy_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The policy's own entries of a state dict of this module."""
        return {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}


def whiten_across_ranks(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`masked_whiten` with the mean and variance of every rank's rollout rows (one process: the same)."""
    m = mask.to(x.dtype)
    count = all_sum(m.sum()).clamp(min=1.0)
    mean = all_sum((x * m).sum()) / count
    var = all_sum((((x - mean) ** 2) * m).sum()) / count
    return (x - mean) * torch.rsqrt(var + eps) * m


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(returns − values) / Var(returns) over the masked tokens (1 = perfect, ≤ 0 = useless)."""
    var_ret = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_diff = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1.0 - var_diff / var_ret) if var_ret > 0 else 0.0


class PPOPrepare:
    def __init__(self, model: PolicyWithValue, reference: Callable[[Any], Any] | None, tokenizer, reward_fn: Callable,
                 reward_name: str, sampling: Sampling, kl: AdaptiveKL, gamma: float, lam: float, chunk: int, seed: int):
        self.model, self.reference, self.tokenizer = model, reference, tokenizer
        self.reward_fn, self.reward_name, self.s = reward_fn, reward_name, sampling
        self.kl, self.gamma, self.lam, self.chunk, self.seed = kl, gamma, lam, chunk, seed

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], rollout_index: int, draw: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        device = next(self.model.parameters()).device
        g = torch.Generator(device=device).manual_seed(self.seed * 7919 + rollout_index)
        r = sample_rollout(self.model.policy, self.tokenizer, [p.ids for p in prompts], self.s, g)
        scores = score_completions(self.reward_fn, prompts, r.completions, self.reward_name).to(device)
        logps, values = rollout_logps(self.model.policy, r, self.s.temperature, self.chunk, self.model.value_head)
        ref_logps = self.reference(r)
        mask = r.completion_mask
        rewards = kl_penalty_rewards(scores, logps, ref_logps, mask, self.kl.value)
        adv, returns = gae(rewards, values, mask, self.gamma, self.lam)
        adv = whiten_across_ranks(adv, mask)  # over the whole rollout, every rank's rows
        kl = float(((logps - ref_logps) * mask).sum(1).mean())
        stats = {"rl/reward_mean": float(scores.mean()), "rl/reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
                 "rl/kl": kl, "rl/kl_coef": self.kl.value, "rl/explained_variance": explained_variance(values, returns, mask),
                 "rl/completion_length": float(mask.sum(1).mean()), "rl/stopped_share": float(r.stopped.float().mean()),
                 "rl/rollout_tokens_per_sec": float(mask.sum()) / max(r.seconds, 1e-9),
                 "generation_seconds": r.seconds}
        self.kl.update(mean_float(kl), n_steps=len(prompts) * current().world)  # every rank keeps the same coefficient
        rows = {"input_ids": r.input_ids, "attention_mask": r.attention_mask, "completion_mask": mask,
                "old_logps": logps, "old_values": values, "advantages": adv, "returns": returns,
                "prompt_width": torch.tensor(r.prompt_width)}
        return {k: v.cpu() for k, v in rows.items()}, stats

    def state_dict(self) -> dict:
        return {"kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl.load_state_dict(state["kl"])


class PPOObjective:
    """Clipped policy loss + vf_coef × clipped value loss on a micro-batch of rollout rows; the loop
    protocol: `count` = rows, the loss and metrics come back multiplied by the rows. Both losses are
    token means within the micro-batch (as TRL's per-mini-batch means), so a mini-batch split into
    micro-batches weighs its tokens by micro-batch, not exactly as one forward would."""

    def __init__(self, clip_range: float, clip_range_value: float, vf_coef: float, temperature: float,
                 chunked: str = "off", chunk_tokens: int = 4096):
        self.clip_range, self.clip_range_value, self.vf_coef, self.temperature = clip_range, clip_range_value, vf_coef, temperature
        self.chunked, self.chunk_tokens = chunked, chunk_tokens

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].size(0)

    def __call__(self, model: PolicyWithValue, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["input_ids"].size(0)
        mask = batch["completion_mask"]
        _, logps, values, entropy = model(batch["input_ids"], batch["attention_mask"], int(batch["prompt_width"]),
                                          self.temperature, self.chunked, self.chunk_tokens)
        pg, clip_fraction, approx_kl = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, self.clip_range)
        vf = value_loss(values, batch["old_values"], batch["returns"], mask, self.clip_range_value)
        with torch.no_grad():
            metrics = {"rl/policy_loss": pg.detach() * n, "rl/value_loss": vf.detach() * n,
                       "rl/clip_fraction": clip_fraction * n, "rl/approx_kl": approx_kl * n,
                       "rl/entropy": masked_mean(entropy, mask) * n,
                       "rl/ratio_mean": masked_mean(torch.exp(logps - batch["old_logps"]), mask) * n,
                       **stats_metrics(batch, n)}
        return (pg + self.vf_coef * vf) * n, metrics


def policy_only_best(result: Any, ckpt: Path, wrapper: PolicyWithValue) -> Any:
    """The loop's best state holds the policy and its value head: keep the policy's weights in
    `best-policy/state.pt` (what the shared writer of model/adapters loads) and the head beside them
    in `value_head.pt`; the result then points there."""
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

