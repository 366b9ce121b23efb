"""Muon: MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024,
https://kellerjordan.github.io/posts/muon/; analysed at scale in Liu et al. 2025, arXiv 2502.16982).

    opt = Muon([{"params": hidden_matrices, "use_muon": True},
                {"params": the_rest, "use_muon": False, "lr": 0.1 * lr}], lr=0.02)

Groups with `use_muon` (the 2-D hidden weight matrices) take, per matrix W with gradient G:
    B = momentum * B + (1 - momentum) * G
    U = G + momentum * (B - G) if nesterov else B          (torch.optim.Muon's formulation)
    O = NewtonSchulz5(U) ~ U V^T of U's SVD (singular values pushed to ~[0.7, 1.2])
    W <- W - lr * weight_decay * W - lr * sqrt(max(1, rows / cols)) * O
The other groups (embeddings, the output head, all 1-D parameters) take an AdamW step, identical to
torch.optim.AdamW's; `build_optimizer` gives them `adamw_lr_ratio` (0.1) x the learning rate.

Why our own class and not torch.optim.Muon: torch's runs Newton-Schulz in bf16, which CPUs without
bf16 hardware run tens of times slower than fp32, and it takes 2-D parameters only. Here `ns_dtype="auto"` runs Newton-Schulz in bf16 on GPUs and in fp32 on CPUs.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Jordan et al.: maximal slope at zero


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a matrix: X <- a X + (b A + c A^2) X with A = X X^T."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # Frobenius norm >= spectral norm, so singular values start <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


def _ns_dtype(name: str, p: torch.Tensor) -> torch.dtype:
    if name == "bf16" or (name == "auto" and p.is_cuda):
        return torch.bfloat16
    return torch.float32


class Muon(torch.optim.Optimizer):
    """Muon for `use_muon` groups, AdamW for the others; see the module docstring."""

    def __init__(self, params: Iterable, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: str = "auto",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr < 0 or not 0 <= momentum < 1 or ns_dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"invalid Muon hyper-parameters: lr={lr}, momentum={momentum}, ns_dtype={ns_dtype}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, ns_dtype=ns_dtype, betas=tuple(betas), eps=eps, use_muon=False))
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon orthogonalises 2-D matrices only: put other parameters in a use_muon=False group")

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon if group["use_muon"] else self._adamw)(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            ortho = newton_schulz(update, group["ns_steps"], _ns_dtype(group["ns_dtype"], p))
            p.mul_(1 - lr * wd)
            # scale so the per-element step of a tall matrix matches a square one (Jordan et al.)
            p.add_(ortho, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))

    def _adamw(self, group: dict) -> None:
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * wd)
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
