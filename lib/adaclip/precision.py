"""Numeric precision regions shared by the harness (evaluation, training, few-shot, benchmarks) and
the methods: one module both sides import, so that neither imports the other for them."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; nothing on CPU (the references' fp16 rounding is not reproduced)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device: torch.device):
    """Leave any autocast region (meta tensors have none): maps and scores in float32, since bf16
    maps would turn pixel metrics into ties."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
