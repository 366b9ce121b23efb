"""Optimizers and lr schedules, looked up by name.

    opt = build_optimizer(model, train_spec.optimizer, lr=3e-4, weight_decay=0.1)

Optimizers (`OPTIMIZERS`, keyed by the spec's `optimizer.name`; fields in llmlab.spec):
- adamw: torch.optim.AdamW (arXiv 1711.05101), fused on CUDA, foreach elsewhere.
- adafactor: torch.optim.Adafactor (arXiv 1804.04235), torch's defaults.
- lion: `lion.Lion` (arXiv 2302.06675).
- sophia: `sophia.SophiaG` (arXiv 2305.14342); the training loop feeds its Hessian estimator.
- muon: `muon.Muon` (kellerjordan.github.io/posts/muon): hidden matrices orthogonalised, the rest
  AdamW at `adamw_lr_ratio` x lr.
- sgd: torch.optim.SGD with momentum: steps in proportion to the gradient (RL on small models).

Parameter groups everywhere: weight decay only on matrices of linear layers, never on norms, biases
or embeddings (Loshchilov & Hutter 2019; GPT-2/nanoGPT practice). Each group carries `hidden`: True
for the 2-D weights inside the network (not embeddings, not the output head), the ones Muon treats.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from llmlab.optim.lion import Lion
from llmlab.optim.muon import Muon
from llmlab.optim.schedules import Schedule
from llmlab.optim.sophia import SophiaG

__all__ = ["build_optimizer", "param_groups", "OPTIMIZERS", "Schedule", "Lion", "Muon", "SophiaG"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters: hidden matrices (decayed), the untied output head (decayed) and
    the rest (embeddings, norms, biases: not decayed). Tied weights appear once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(head.weight)} if isinstance(getattr(head, "weight", None), torch.Tensor) else set()
    hidden, head_params, no_decay = [], [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in embeddings:
            no_decay.append(p)
        else:
            (head_params if id(p) in head_ids else hidden).append(p)
    groups = [{"params": hidden, "weight_decay": weight_decay, "hidden": True},
              {"params": head_params, "weight_decay": weight_decay, "hidden": False},
              {"params": no_decay, "weight_decay": 0.0, "hidden": False}]
    return [g for g in groups if g["params"]]


def _adamw(groups: list[dict], lr: float, spec: Any) -> torch.optim.Optimizer:
    # fused kernels exist on CUDA; foreach is torch's fast default elsewhere
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(spec.beta1, spec.beta2), eps=spec.eps, fused=fused or None)


def _adafactor(groups: list[dict], lr: float, spec: Any) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(groups, lr=lr, beta2_decay=spec.beta2_decay, eps=(spec.eps1, spec.eps2), d=spec.d)


def _lion(groups: list[dict], lr: float, spec: Any) -> torch.optim.Optimizer:
    return Lion(groups, lr=lr, betas=(spec.beta1, spec.beta2))


def _sophia(groups: list[dict], lr: float, spec: Any) -> torch.optim.Optimizer:
    return SophiaG(groups, lr=lr, betas=(spec.beta1, spec.beta2), rho=spec.rho, k=spec.k, eps=spec.eps)


def _muon(groups: list[dict], lr: float, spec: Any) -> torch.optim.Optimizer:
    # Muon is for hidden weight matrices only (its write-up's advice): embeddings, head and 1-D parameters go to
    # AdamW at adamw_lr_ratio x lr
    split = [{**g, "use_muon": g["hidden"]} if g["hidden"] else {**g, "use_muon": False, "lr": lr * spec.adamw_lr_ratio}
             for g in groups]
    return Muon(split, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov, ns_steps=spec.ns_steps,
                ns_dtype=spec.ns_dtype, betas=(spec.adamw_beta1, spec.adamw_beta2), eps=spec.adamw_eps)


def _sgd(groups: list[dict], lr: float, spec: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov, dampening=spec.dampening)


OPTIMIZERS: dict[str, Callable[[list[dict], float, Any], torch.optim.Optimizer]] = {
    "adamw": _adamw, "adafactor": _adafactor, "lion": _lion, "sophia": _sophia, "muon": _muon, "sgd": _sgd}


def build_optimizer(model: torch.nn.Module, spec: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer named by `spec.name`, over `param_groups(model)`; each group remembers its base lr
    (the loop sets lr = base_lr * schedule factor, so Muon's AdamW groups stay at their ratio)."""
    opt = OPTIMIZERS[spec.name](param_groups(model, weight_decay), lr, spec)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
        g["optimizer"] = spec.name  # saved with the state, so a resume can tell whose state it is
    opt.register_load_state_dict_pre_hook(_same_optimizer(spec.name))
    return opt


def _same_optimizer(name: str) -> Callable:
    """Refuse to load another optimizer's state: torch would load AdamW's moments into Lion silently."""

    def check(optimizer: torch.optim.Optimizer, state: dict) -> None:
        saved = {g.get("optimizer") for g in state.get("param_groups", [])} - {None}
        if saved and saved != {name}:
            raise ValueError(f"the checkpoint holds {', '.join(sorted(saved))} optimizer state but this run uses "
                             f"{name}: resume with `load_optimizer: false` to switch optimizers")

    return check
