"""How fast a training step runs: per-block torch.compile, and model FLOPs utilisation.

    if should_compile(cfg.compile, device): compile_blocks(model)    # before the first step
    mfu = tokens_per_sec * flops_per_token(model, seq_len) / peak_flops(device)

`compile: auto` compiles on CUDA only: on these CPUs compiling gained nothing measurable and costs
start-up time. Blocks (the model's `_no_split_modules` classes, i.e. its transformer layers) are
compiled one by one — every layer has the same code, so one compilation serves all of them and
compile time stays short; LoRA layers inside a block are compiled with it.

FLOPs per token follow PaLM's accounting (Chowdhery et al. 2022, appendix B): 6 per matmul weight
(forward and backward) plus 12 x layers x d_model x sequence length for attention scores. A LoRA
step does fewer (no gradients for frozen weights), so its MFU reads low by up to a third. The peak is
the card's dense bf16 tensor rate from a table of known cards; unknown cards log no MFU.
"""

from __future__ import annotations

from typing import Any

import torch

from llmlab.parallel import _blocks

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets, without sparsity)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 125.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "A6000": 155.0, "V100": 125.0, "T4": 65.0}


def should_compile(setting: Any, device: torch.device) -> bool:
    return bool(setting) if setting != "auto" else device.type == "cuda"


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile each transformer block in place (`nn.Module.compile`); how many were. Compilation itself
    happens at a block's first call (the first training step)."""
    blocks = _blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)


def uncompile_blocks(model: torch.nn.Module) -> None:
    """Undo `compile_blocks`: every block runs eagerly again (its weights untouched)."""
    for block in _blocks(model):
        block._compiled_call_impl = None


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, when it is a known card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for card, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):  # "A10G" before "A10"
        if card in name:
            return tflops * 1e12
    return None


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul weights + 12 x layers x d_model x seq_len. The input
    embedding is a lookup, not a matmul; with tied embeddings its matrix is the LM head, counted once."""
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    params = {id(p): p.numel() for p in model.parameters()}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = sum(params.values())
    if embed is not None and (head is None or head.weight is not embed.weight):
        n -= embed.weight.numel()  # untied: the lookup table does no matmul
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", 0)
    d_model = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    return 6.0 * n + 12.0 * layers * d_model * seq_len
