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
from llmlab.train.rl import group_advantages, grpo_loss, masked_mean, zero_variance_share
from llmlab.train.rollout import (
    Sampling,
    policy_logps,
    rollout_logps,
    sample_rollout,
    score_completions,
    select_rollouts,
    stats_metrics,
)


class GRPOPrepare:
    """The rollout step (see the module docstring). With `dynamic_sampling` (DAPO, Yu et al. 2025,
    arXiv 2503.14476), a group whose G rewards are all equal — no advantage, so no gradient — is
    replaced: more prompts are drawn and sampled, up to `max_rounds` extra rounds, until the rollout
    holds as many groups with a spread as it asked for (short of that, zero-spread groups fill it)."""

    def __init__(self, model: torch.nn.Module, reference: Callable[[Any], torch.Tensor] | None, tokenizer,
                 reward_fn: Callable, reward_name: str, sampling: Sampling, group_size: int, chunk: int, seed: int,
                 dynamic_sampling: bool = False, max_rounds: int = 4):
        self.model, self.reference, self.tokenizer = model, reference, tokenizer
        self.reward_fn, self.reward_name, self.s = reward_fn, reward_name, sampling
        self.group_size, self.chunk, self.seed = group_size, chunk, seed
        self.dynamic_sampling, self.max_rounds = dynamic_sampling, max_rounds

    def wanted_groups(self, scores: torch.Tensor) -> torch.Tensor:
        """Per group of G scores: whether dynamic sampling counts it as informative (its rewards
        are not all equal). The one place the rule lives; a subclass may ask for more."""
        return scores.view(-1, self.group_size).std(dim=1) > 0

    def _sample(self, prompts: list[Prompt], g: torch.Generator) -> tuple[Any, torch.Tensor]:
        repeated = [p for p in prompts for _ in range(self.group_size)]  # prompt-major: each prompt's G together
        r = sample_rollout(self.model, self.tokenizer, [p.ids for p in repeated], self.s, g)
        return r, score_completions(self.reward_fn, repeated, r.completions, self.reward_name)

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], rollout_index: int,
                 draw: Callable[[int], list[Prompt]] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        device = next(self.model.parameters()).device
        g = torch.Generator(device=device).manual_seed(self.seed * 7919 + rollout_index)
        G, wanted = self.group_size, len(prompts)
        r, scores = self._sample(prompts, g)
        sampled_scores, drawn = [scores], 0
        if self.dynamic_sampling and draw is not None:
            parts, informative = [(r, scores)], int(self.wanted_groups(scores).sum())
            for _ in range(self.max_rounds):
                if informative >= wanted:
                    break
                extra = draw(wanted - informative)
                drawn += len(extra)
                r2, s2 = self._sample(extra, g)
                parts.append((r2, s2))
                sampled_scores.append(s2)
                informative += int(self.wanted_groups(s2).sum())
            if len(parts) > 1:  # keep informative groups first, then fill with the rest, up to `wanted` groups
                wanted_by_part = [self.wanted_groups(s).tolist() for _, s in parts]
                keep = [(k, grp) for k, w in enumerate(wanted_by_part) for grp in range(len(w)) if w[grp]]
                rest = [(k, grp) for k, w in enumerate(wanted_by_part) for grp in range(len(w)) if not w[grp]]
                chosen = (keep + rest)[:wanted]
                rows = {k: [grp * G + j for kk, grp in chosen if kk == k for j in range(G)] for k in range(len(parts))}
                r = select_rollouts([(parts[k][0], rows[k]) for k in range(len(parts)) if rows[k]], self.s.pad_id)
                scores = torch.cat([parts[k][1][rows[k]] for k in range(len(parts)) if rows[k]])
        adv = group_advantages(scores, G)
        logps, _ = rollout_logps(self.model, r, self.s.temperature, self.chunk)
        mask = r.completion_mask
        groups = scores.view(-1, G)
        everything = torch.cat(sampled_scores)
        stats = {"rl/reward_mean": float(scores.mean()), "rl/reward_std": float(scores.std()),
                 "rl/group_reward_std": float(groups.std(dim=1).mean()),
                 # of every group sampled (before dynamic sampling dropped any), and of those trained on
                 "rl/zero_variance_share": zero_variance_share(everything, G),
                 "rl/trained_zero_variance_share": zero_variance_share(scores, G),
                 "rl/resampled_prompts": float(drawn),
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

    def __init__(self, clip_range: float, kl_coef: float, temperature: float, chunked: str = "off",
                 chunk_tokens: int = 4096):
        self.clip_range, self.kl_coef, self.temperature = clip_range, kl_coef, temperature
        self.chunked, self.chunk_tokens = chunked, chunk_tokens

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].size(0)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["input_ids"].size(0)
        mask = batch["completion_mask"]
        _, logps, _, entropy = policy_logps(model, batch["input_ids"], batch["attention_mask"], int(batch["prompt_width"]),
                                            self.temperature, chunked=self.chunked, chunk_tokens=self.chunk_tokens)
        loss, m = grpo_loss(logps, batch["old_logps"], batch.get("ref_logps"), batch["advantages"], mask,
                            self.clip_range, self.kl_coef)
        with torch.no_grad():
            log_ratio = logps - batch["old_logps"]
            metrics = {"rl/policy_loss": m["policy_loss"] * n, "rl/kl": m["kl"] * n,
                       "rl/clip_fraction": m["clip_fraction"] * n, "rl/ratio_mean": m["ratio_mean"] * n,
                       "rl/approx_kl": masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask) * n,
                       "rl/entropy": masked_mean(entropy, mask) * n,
                       **stats_metrics(batch, n)}
        return loss * n, metrics
