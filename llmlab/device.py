"""Where models run and in which precision: one answer for training, evaluation and sampling.

    device = pick_device()                         # cuda when visible, else cpu
    amp = autocast_dtype("auto", device)           # torch.bfloat16 or None (plain fp32)
"""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays on GPUs that support it. On CPUs it does not: without AMX/AVX512-BF16 a
    training step runs many times slower than in fp32, and even with AMX a small model trains no faster
    in bf16. So `auto` keeps CPUs in fp32; `precision: bf16` still forces it."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a `precision` setting: None means plain fp32."""
    if precision == "bf16" or (precision == "auto" and bf16_is_fast(device)):
        return torch.bfloat16
    return None
