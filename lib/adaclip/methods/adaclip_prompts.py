"""Learnable prompts for one encoder: static (shared) and dynamic (generated per image).

Parameter names mirror what they are; `checkpoint.OFFICIAL_KEY_MAP` maps the reference's names
(`visual_prompter.static_prompts.0`, `dynamic_visual_prompt_generator.head.3.weight`, ...).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class HybridPrompts(nn.Module):
    """Static prompts (J tensors of (L, W)) and/or L dynamic heads Linear(D -> W) (paper Sec. 3.2).

    The same dynamic prompt is added to every prompted layer's static prompt (reference).
    """

    def __init__(self, width: int, embed_dim: int, length: int, depth: int, static: bool, dynamic: bool):
        super().__init__()
        if not (static or dynamic):
            raise ValueError("prompts need at least one of static / dynamic")
        self.length, self.depth = length, depth
        self.static = None
        self.dynamic = None
        if static:
            self.static = nn.ParameterList([nn.Parameter(torch.empty(length, width)) for _ in range(depth)])
            for p in self.static:
                nn.init.normal_(p, std=0.02)
        if dynamic:
            # one head per prompt token, as in the reference (not one wide head), so the
            # official checkpoints map one-to-one
            self.dynamic = nn.ModuleList([nn.Linear(embed_dim, width) for _ in range(length)])

    def generate(self, image_feature: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, D) pooled image feature of the unprompted pass -> dynamic prompt (B, L, W), or None."""
        if self.dynamic is None:
            return None
        return torch.stack([head(image_feature) for head in self.dynamic], dim=1)

    def layer_prompts(self, dynamic: Optional[torch.Tensor]) -> list[torch.Tensor]:
        """Per prompted layer: static[i] + dynamic, shaped (B or 1, L, W)."""
        out = []
        for i in range(self.depth):
            p = self.static[i].unsqueeze(0) if self.static is not None else 0
            out.append(p + dynamic if dynamic is not None else p)
        return out
