"""Position-wise feed-forward networks, chosen by `config.activation`.

Module names follow Llama (`gate_proj`, `up_proj`, `down_proj`): LoRA presets and the Llama export
rely on them. No biases, as in Llama.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.model.config import LlmlabConfig

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


class MLP(nn.Module):
    """Linear(d_model, d_ff) -> activation -> Linear(d_ff, d_model)."""

    def __init__(self, config: LlmlabConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.act = ACTIVATIONS[config.activation]()
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.down_proj.is_residual_projection = True  # read by _init_weights (GPT-2 scaled init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class SwiGLU(nn.Module):
    """Gated FFN: down(silu(gate(x)) * up(x)).

    Shazeer 2020, "GLU Variants Improve Transformer", arXiv 2002.05202.
    """

    def __init__(self, config: LlmlabConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.down_proj.is_residual_projection = True  # read by _init_weights (GPT-2 scaled init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_ffn(config: LlmlabConfig) -> nn.Module:
    return SwiGLU(config) if config.activation == "swiglu" else MLP(config)
