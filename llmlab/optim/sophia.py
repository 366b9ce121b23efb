"""Sophia-G: second-order clipped stochastic optimisation (Liu et al. 2023, "Sophia: A Scalable
Stochastic Second-order Optimizer for Language Model Pre-training", https://arxiv.org/abs/2305.14342,
Algorithms 2 and 3).

    opt = SophiaG(model.parameters(), lr=0.05, betas=(0.965, 0.99), rho=0.04, k=10)
    # in the training loop, at the top of each step (llmlab.train.loop does this):
    if opt.hessian_due():
        loss, n = opt.hessian_loss(model, batch)   # CE against labels sampled from the model
        loss.backward(); opt.update_hessian(n); opt.zero_grad()

Per parameter, with gradient g of the training loss:
    m = beta1 * m + (1 - beta1) * g
    every k steps (steps 1, k+1, 2k+1, ...): h_hat = B * grad(L_hat)^2, the Gauss-Newton-Bartlett
        estimate (Algorithm 2): L_hat = (1/B) sum_b CE(logits_b, y_hat_b) with y_hat_b sampled from
        the model's own softmax; then h = beta2 * h + (1 - beta2) * h_hat
    theta <- theta - lr * weight_decay * theta
    theta <- theta - lr * clip(m / max(h, eps), rho)          clip(z, rho) = max(min(z, rho), -rho)
So no coordinate ever moves more than rho * lr per step (plus decay). This is the per-coordinate
clip at rho of the paper's first version; later versions write the same update as
lr' * clip(m / max(gamma * h, eps), 1) with gamma = rho and lr' = rho * lr, which is why the
official code's learning rates (~AdamW's) correspond to lr / rho here.

For a language model B is the number of predicted tokens: every token is one sampled-label example,
and B * (mean gradient)^2 is an unbiased estimate of the diagonal Gauss-Newton matrix of the mean
token loss (the cross terms of independent sampled labels vanish in expectation).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label value of positions without a target (matches train.objectives)


def gnb_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The Gauss-Newton-Bartlett loss of Algorithm 2 for a causal LM batch, and its example count B.

    Labels are sampled from the model's own next-token distribution (not the data's), at every
    position the batch's labels mark as a target (all positions when it has none)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "segment_ids") if k in batch}
    logits = model(**inputs).logits[:, :-1].float()
    with torch.no_grad():
        sampled = torch.distributions.Categorical(logits=logits).sample()
    if "labels" in batch:
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
    elif "attention_mask" in batch:  # e.g. GRPO rollouts: every real token, padding left out
        mask = batch["attention_mask"][:, 1:].bool()
    else:
        mask = torch.ones_like(sampled, dtype=torch.bool)
    n = int(mask.sum())
    ce = F.cross_entropy(logits[mask], sampled[mask], reduction="sum")
    return ce / max(n, 1), n


class SophiaG(torch.optim.Optimizer):
    """Sophia with the Gauss-Newton-Bartlett Hessian estimator; see the module docstring."""

    def __init__(self, params: Iterable, lr: float = 0.05, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, k: int = 10, eps: float = 1e-12, weight_decay: float = 0.0):
        if lr < 0 or rho <= 0 or k < 1 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Sophia hyper-parameters: lr={lr}, betas={betas}, rho={rho}, k={k}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, k=k, eps=eps, weight_decay=weight_decay))

    hessian_loss = staticmethod(gnb_loss)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def steps_done(self) -> int:
        """Optimizer steps taken so far (0 for a fresh optimizer)."""
        for state in self.state.values():
            return int(state["step"])
        return 0

    def hessian_due(self) -> bool:
        """True before steps 1, k+1, 2k+1, ... (the paper's `t mod k = 1`)."""
        return self.steps_done() % self.param_groups[0]["k"] == 0

    @torch.no_grad()
    def update_hessian(self, batch_size: int) -> None:
        """Fold the current gradients (of `hessian_loss`) into the Hessian EMA: h_hat = B * g^2."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                h = self._state(p)["hessian"]
                h.mul_(beta2).addcmul_(p.grad, p.grad, value=(1 - beta2) * batch_size)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta1, rho, eps, wd = group["lr"], group["betas"][0], group["rho"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                m = state["exp_avg"]
                m.lerp_(p.grad, 1 - beta1)
                p.mul_(1 - lr * wd)
                ratio = (m / state["hessian"].clamp(min=eps)).clamp_(-rho, rho)
                p.add_(ratio, alpha=-lr)
        return loss
