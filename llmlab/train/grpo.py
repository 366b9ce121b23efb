"""GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300): no value function; each prompt gets
`group_size` completions and each completion's advantage is its reward normalised within its group.

    prepare = GRPOPrepare(policy, reference, tokenizer, reward_fn, "exact_match", sampling, group_size=4, ...)
    batches = RolloutBatches(prompts, prepare, batch_size // group_size, mini_batch_size, accumulation, ppo_epochs, seed)
    train(policy, GRPOObjective(clip_range=0.2, kl_coef=0.04, temperature=1.0), batches, ...)

Rollout step (`GRPOPrepare`, no gradient): repeat each prompt G times (prompt-major), sample at the
GRPO temperature, score, compute group advantages, old log-probs and (when kl_coef > 0) the
reference log-probs. Update step (`GRPOObjective`): the clipped importance-ratio objective plus
kl_coef × the k3 estimate of KL(π‖π_ref), per token, averaged per completion then over completions.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from llmlab.data.prompts import Prompt
from llmlab.train.rl import entropy_from_logits, group_advantages, grpo_loss, masked_mean, zero_variance_share
from llmlab.train.rollout import Sampling, policy_logps, rollout_logps, sample_rollout, score_completions, stats_metrics


class GRPOPrepare:
    def __init__(self, model: torch.nn.Module, reference: Callable[[Any], torch.Tensor] | None, tokenizer,
                 reward_fn: Callable, reward_name: str, sampling: Sampling, group_size: int, chunk: int, seed: int):
        self.model, self.reference, self.tokenizer = model, reference, tokenizer
        self.reward_fn, self.reward_name, self.s = reward_fn, reward_name, sampling
        self.group_size, self.chunk, self.seed = group_size, chunk, seed

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], rollout_index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        device = next(self.model.parameters()).device
        g = torch.Generator(device=device).manual_seed(self.seed * 7919 + rollout_index)
        G = self.group_size
        repeated = [p for p in prompts for _ in range(G)]  # prompt-major: each prompt's G completions together
        r = sample_rollout(self.model, self.tokenizer, [p.ids for p in repeated], self.s, g)
        scores = score_completions(self.reward_fn, repeated, r.completions, self.reward_name)
        adv = group_advantages(scores, G)
        logps, _ = rollout_logps(self.model, r, self.s.temperature, self.chunk)
        mask = r.completion_mask
        groups = scores.view(-1, G)
        stats = {"rl/reward_mean": float(scores.mean()), "rl/reward_std": float(scores.std()),
                 "rl/group_reward_std": float(groups.std(dim=1).mean()),
                 "rl/zero_variance_share": zero_variance_share(scores, G),
                 "rl/best_of_n": float(groups.max(dim=1).values.mean()),
                 "rl/completion_length": float(mask.sum(1).mean()), "rl/stopped_share": float(r.stopped.float().mean()),
                 "rl/rollout_tokens_per_sec": float(mask.sum()) / max(r.seconds, 1e-9),
                 "generation_seconds": r.seconds}
        rows = {"input_ids": r.input_ids, "attention_mask": r.attention_mask, "completion_mask": mask,
                "old_logps": logps, "advantages": adv, "prompt_width": torch.tensor(r.prompt_width)}
        if self.reference is not None:
            rows["ref_logps"] = self.reference(r)
        return {k: v.cpu() for k, v in rows.items()}, stats

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GRPOObjective:
    """The GRPO loss on a micro-batch of completions; loop protocol as `PPOObjective`."""

    def __init__(self, clip_range: float, kl_coef: float, temperature: float):
        self.clip_range, self.kl_coef, self.temperature = clip_range, kl_coef, temperature

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].size(0)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["input_ids"].size(0)
        mask = batch["completion_mask"]
        logits, logps, _ = policy_logps(model, batch["input_ids"], batch["attention_mask"], int(batch["prompt_width"]),
                                        self.temperature)
        loss, m = grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], mask,
                            self.clip_range, self.kl_coef)
        with torch.no_grad():
            log_ratio = logps - batch["old_logps"]
            metrics = {"rl/policy_loss": m["policy_loss"] * n, "rl/kl": m["kl"] * n,
                       "rl/clip_fraction": m["clip_fraction"] * n, "rl/ratio_mean": m["ratio_mean"] * n,
                       "rl/approx_kl": masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask) * n,
                       "rl/entropy": entropy_from_logits(logits, mask) * n,
                       **stats_metrics(batch, n)}
        return loss * n, metrics
