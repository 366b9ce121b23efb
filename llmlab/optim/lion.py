"""Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms",
https://arxiv.org/abs/2302.06675, Algorithm 2).

    opt = Lion(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=1.0)

Per parameter, with gradient g and momentum m (initially 0):
    c = beta1 * m + (1 - beta1) * g          # interpolation used for the update only
    theta <- theta - lr * (sign(c) + weight_decay * theta)
    m = beta2 * m + (1 - beta2) * g          # the momentum tracks g with the slower beta2
Every coordinate moves by exactly lr (plus decay), so Lion wants a 3-10x smaller lr than AdamW and
a correspondingly larger weight decay. Its only state is m: half of AdamW's memory.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class Lion(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Lion hyper-parameters: lr={lr}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                update = m.lerp(p.grad, 1 - beta1).sign_()  # sign(beta1 * m + (1 - beta1) * g)
                p.mul_(1 - lr * wd)  # decoupled decay, as in the paper's algorithm
                p.add_(update, alpha=-lr)
                m.lerp_(p.grad, 1 - beta2)
        return loss
