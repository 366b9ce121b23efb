"""Optimizers and lr schedules, looked up by name.

    opt = build_optimizer(model, train_spec.optimizer, lr=3e-4, weight_decay=0.1)

Parameter groups everywhere: weight decay only on matrices of linear layers, never on norms, biases
or embeddings (Loshchilov & Hutter 2019; GPT-2/nanoGPT practice).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from llmlab.optim.schedules import Schedule

__all__ = ["build_optimizer", "param_groups", "OPTIMIZERS", "Schedule"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed (linear weights) and not decayed (the rest)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _adamw(groups: list[dict], lr: float, spec: Any) -> torch.optim.Optimizer:
    # fused kernels exist on CUDA; foreach is torch's fast default elsewhere
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(spec.beta1, spec.beta2), eps=spec.eps, fused=fused or None)


OPTIMIZERS: dict[str, Callable[[list[dict], float, Any], torch.optim.Optimizer]] = {"adamw": _adamw}


def build_optimizer(model: torch.nn.Module, spec: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer named by `spec.name`, over `param_groups(model)`; each group remembers its base lr."""
    opt = OPTIMIZERS[spec.name](param_groups(model, weight_decay), lr, spec)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt
