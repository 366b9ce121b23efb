"""Online RL math for PPO and GRPO: pure tensor functions, no models, no sampling.

All per-token tensors are (B, T) over the *completion* tokens, aligned with a `mask` (B, T) that is
1/True on real completion tokens and 0 on padding (and anything else that carries no loss).
Masked positions never contribute to a sum, a mean or a recursion.

PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347)
with the InstructGPT reward shaping (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155):

    rewards = kl_penalty_rewards(scores, logp, ref_logp, mask, kl_ctl.value)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)     # arXiv 1506.02438
    adv = masked_whiten(adv, mask)
    pg, clip_frac, approx_kl = ppo_policy_loss(new_logp, logp, adv, mask, clip_range=0.2)
    vf = value_loss(new_values, values, ret, mask, clip_range=0.2)
    kl_ctl.update(observed_kl, n_steps=batch_size)                 # AdaptiveKL, Ziegler et al. 2019

GRPO (Shao et al. 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300): G completions per
prompt, rows ordered prompt-major (prompt 0's G completions, then prompt 1's, ...):

    adv = group_advantages(scores, group_size=G)                   # (N*G,)
    loss, metrics = grpo_loss(new_logp, old_logp, ref_logp, adv, mask, clip_range=0.2, kl_coef=0.04)

`k3_kl` is Schulman's "k3" estimator (http://joschu.net/blog/kl-approx.html) of KL(π‖π_ref) from
samples of π; `entropy_from_logits` gives the masked mean policy entropy for logging.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is set (0 when there are none)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean when `shift_mean`) over the masked positions;
    masked-out positions come back as 0."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

    Over each row's valid steps t (mask set), going backwards:
        δ_t = r_t + γ·V_{t+1} − V_t,    A_t = δ_t + γλ·A_{t+1},    R_t = A_t + V_t
    where "t+1" is the next *valid* step (masked steps are skipped, not treated as zero-reward
    steps), and the last valid step bootstraps with V = 0 and A = 0 (the episode ends there).
    Returns (advantages, returns), both (B, T) and 0 at masked positions; no gradient.
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and "
                         f"mask {tuple(mask.shape)} must have the same (B, T) shape")
    m = mask.to(torch.bool)
    r = rewards.float()
    v = values.float()
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float32, device=r.device)
    next_value = torch.zeros(B, dtype=torch.float32, device=r.device)
    next_adv = torch.zeros(B, dtype=torch.float32, device=r.device)
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        valid = m[:, t]
        adv[:, t] = torch.where(valid, a, torch.zeros_like(a))
        next_value = torch.where(valid, v[:, t], next_value)
        next_adv = torch.where(valid, a, next_adv)
    returns = (adv + v) * m.float()
    return adv, returns


def ppo_policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), per token.

    With r = exp(logp_new − logp_old) and ε = clip_range:
        loss         = masked mean of max(−A·r, −A·clip(r, 1−ε, 1+ε))
        clip_fraction = masked share of tokens where the clipped term is the larger (active) one
        approx_kl    = masked mean of (r − 1) − log r   (k3 estimate of KL(old‖new), ≥ 0)
    clip_fraction and approx_kl are detached.
    """
    log_ratio = logp_new - logp_old.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((pg2 > pg1).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Clipped value loss (as in OpenAI baselines' PPO2 and InstructGPT):
        v_clip = old + clip(v − old, −ε, ε)
        loss   = 0.5 · masked mean of max((v − R)², (v_clip − R)²)
    """
    old = old_values.detach()
    ret = returns.detach()
    v_clip = old + torch.clamp(values - old, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2), mask)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last set mask position; raises when a row has none."""
    m = mask.to(torch.bool)
    if not bool(m.any(dim=1).all()):
        empty = (~m.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have no valid (unmasked) token to put their score on")
    idx = torch.arange(m.size(1), device=m.device).expand_as(m)
    return torch.where(m, idx, torch.full_like(idx, -1)).max(dim=1).values


@torch.no_grad()
def kl_penalty_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token PPO rewards with a KL penalty (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593;
    InstructGPT, https://arxiv.org/abs/2203.02155):
        r_t = −kl_coef · (logp_t − ref_logp_t)      on every valid token
        r_T += score                                on each row's last valid token
    Returns (B, T), 0 at masked positions; raises if a row has no valid token."""
    m = mask.to(logp.dtype)
    rewards = -kl_coef * (logp - ref_logp) * m
    last = last_valid_index(mask)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


class AdaptiveKL:
    """Adaptive KL coefficient (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593, §2.2):
        e = clip(current_kl / target − 1, −0.2, 0.2)
        β ← β · (1 + e · n_steps / horizon)
    so β grows when the policy drifts past `target` nats and shrinks when it stays below.
    `target=None` keeps β fixed. Read the coefficient from `.value`."""

    def __init__(self, init_kl_coef: float, target: float | None, horizon: float):
        if horizon <= 0:
            raise ValueError(f"AdaptiveKL: horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust β after `n_steps` samples (episodes) at observed KL `current_kl`; returns β."""
        if self.target is None:
            return self.value
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = state["target"]
        self.horizon = float(state["horizon"])


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a spread), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} "
                         f"elements, got shape {tuple(rewards.shape)}")
    return rewards.float().view(-1, group_size)


@torch.no_grad()
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, https://arxiv.org/abs/2402.03300, §4.1.2):
        A_i = (r_i − mean(group)) / (std(group) + eps)
    `rewards` is (N·G,), prompt-major (each prompt's G completions consecutive); std is the sample
    std (Bessel-corrected, as in TRL). A group whose rewards are all equal gets advantages 0."""
    g = _groups(rewards, group_size)
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


@torch.no_grad()
def zero_variance_share(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose G rewards are all equal (those give no GRPO learning signal)."""
    g = _groups(rewards, group_size)
    return float(((g.max(dim=1).values - g.min(dim=1).values) == 0).float().mean())


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref) from tokens sampled from π
    (http://joschu.net/blog/kl-approx.html; used by GRPO, arXiv 2402.03300 eq. 4):
        d = ref_logp − logp,   k3 = exp(d) − d − 1
    Unbiased (E_π[exp(d)] = 1) and non-negative (eˣ ≥ 1 + x)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_range: float, kl_coef: float
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective (Shao et al. 2024, https://arxiv.org/abs/2402.03300, eq. 3), as a loss.

    Per token, with r = exp(logp_new − logp_old), the row's advantage A broadcast over its tokens:
        ℓ_t = max(−A·r, −A·clip(r, 1−ε, 1+ε)) + kl_coef · k3(logp_new, ref_logp)
    then the mean over each row's valid tokens, then the mean over rows that have any valid token.
    `ref_logp` may be None when kl_coef == 0. Metrics (detached 0-d tensors, so a training step
    needs no device sync): policy_loss, kl (per-row mean k3, batch mean; 0 without a reference),
    clip_fraction, ratio_mean.
    """
    if ref_logp is None and kl_coef != 0:
        raise ValueError("grpo_loss: kl_coef != 0 needs ref_logp")
    m = mask.to(logp_new.dtype)
    log_ratio = logp_new - logp_old.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(logp_new.dtype).unsqueeze(1)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg = torch.maximum(pg1, pg2)
    kl = k3_kl(logp_new, ref_logp.detach()) if ref_logp is not None else torch.zeros_like(pg)
    per_token = pg + kl_coef * kl if kl_coef != 0 else pg

    counts = m.sum(dim=1)
    has = counts > 0
    n_rows = has.sum().clamp(min=1).to(m.dtype)

    def row_mean_then_batch(x: torch.Tensor) -> torch.Tensor:
        per_row = (x * m).sum(dim=1) / counts.clamp(min=1.0)
        return (per_row * has.to(m.dtype)).sum() / n_rows

    loss = row_mean_then_batch(per_token)
    with torch.no_grad():
        metrics = {
            "policy_loss": row_mean_then_batch(pg),
            "kl": row_mean_then_batch(kl),
            "clip_fraction": masked_mean((pg2 > pg1).to(m.dtype), m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean per-token entropy H = logsumexp(z) − Σ softmax(z)·z of (B, T, V) logits."""
    z = logits.float()
    log_probs = torch.log_softmax(z, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return masked_mean(entropy, mask)


__all__ = [
    "AdaptiveKL", "entropy_from_logits", "gae", "group_advantages", "grpo_loss", "k3_kl",
    "kl_penalty_rewards", "last_valid_index", "masked_mean", "masked_whiten", "ppo_policy_loss",
    "value_loss", "zero_variance_share",
]
