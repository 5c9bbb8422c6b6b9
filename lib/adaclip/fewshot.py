"""Few-shot mode, the harness side: which normal references each test category gets, and a
method's memory filled with them. What a memory computes is the method's own (`Method.few_shot_memory`:
AdaCLIP and its baselines compare patch tokens, APRIL-GAN its raw tokens per layer, WinCLIP+ its
windows and patches).

>>> drawn = draw_references(train_rows, test_rows, k=4, seed=0)
>>> memory = memory_from_references(model, drawn, root)
>>> out = memory.apply(model(images, names, return_tokens=True), ["visa/capsules"] * len(images))
"""
from __future__ import annotations

from typing import Optional

import pandas as pd
import torch

from .data import AnomalyDataset
from .precision import autocast


def memory_from_references(model, drawn: dict, root):
    """The method's few-shot memory of every category's references: ``drawn`` maps (dataset, category)
    to manifest rows (see `draw_references`) whose paths are relative to ``root``."""
    memory = model.few_shot_memory()
    for (name, category), rows in drawn.items():
        refs = AnomalyDataset(rows, root, model.transform, model.image_size)
        with autocast(model.device):
            memory.add(f"{name}/{category}", torch.stack([refs[i]["image"] for i in range(len(refs))]), category)
    return memory


def draw_references(pool: pd.DataFrame, test: pd.DataFrame, k: int, seed: int = 0) -> dict[tuple, pd.DataFrame]:
    """k normal training images per (dataset, category) of ``test``, drawn with ``seed`` from ``pool``.

    Raises ValueError when a category has no (or too few) normal training images, or when a drawn
    reference is also a test image (few-shot references must stay outside the test set).
    """
    if k < 1:
        raise ValueError(f"k_shot must be >= 1 to draw references, got {k}")
    normal = pool[(pool.label == 0) & (pool.split == "train")]
    test_images = set(zip(test.image, test["crop"] if "crop" in test else [""] * len(test)))
    drawn = {}
    for key in dict.fromkeys(zip(test.dataset, test.category)):
        candidates = normal[(normal.dataset == key[0]) & (normal.category == key[1])]
        if len(candidates) == 0:
            raise ValueError(f"{key[0]}/{key[1]} has no normal training images (split 'train', label 0) to draw "
                             f"{k}-shot references from; use k_shot=0 or a manifest with its train split")
        if len(candidates) < k:
            raise ValueError(f"{key[0]}/{key[1]} has {len(candidates)} normal training images, fewer than k_shot={k}")
        picks = candidates.sample(k, random_state=seed).sort_values("image")
        overlap = [p for p in zip(picks.image, picks["crop"] if "crop" in picks else [""] * k) if p in test_images]
        if overlap:
            raise ValueError(f"few-shot reference {overlap[0][0]} of {key[0]}/{key[1]} is also a test image; "
                             f"references must come from outside the test set")
        drawn[key] = picks
    return drawn


def reference_list(drawn: Optional[dict]) -> dict:
    """For config.json: 'dataset/category' -> the reference images."""
    return {f"{d}/{c}": list(rows.image) for (d, c), rows in (drawn or {}).items()}


__all__ = ["memory_from_references", "draw_references", "reference_list"]
