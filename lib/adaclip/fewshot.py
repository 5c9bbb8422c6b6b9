"""Few-shot mode: a memory bank of normal reference patches, as APRIL-GAN and AnomalyCLIP add it.

With k normal images of the test category, each test patch gets 1 - (its largest cosine similarity
to the references' patches of the same layer), averaged over the four layers, upsampled and smoothed
like the zero-shot map. The maps are then added, and the image score adds the few-shot map's
maximum; both sums are halved (and the distance clipped to [0, 1]) so scores stay in [0, 1].

>>> memory = FewShotMemory(model)
>>> memory.add("visa/capsules", reference_images, "capsules")            # (k, 3, S, S)
>>> out = memory.apply(model(images, names, return_tokens=True), ["visa/capsules"] * len(images))
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from .model.fusion import gaussian_blur


class FewShotMemory:
    def __init__(self, model):
        self.model = model
        self.banks: dict[str, list[torch.Tensor]] = {}   # key -> per layer (k·N, W), L2-normalised

    @classmethod
    def from_references(cls, model, drawn: dict, root) -> "FewShotMemory":
        """A memory of every category's references: ``drawn`` maps (dataset, category) to manifest rows
        (see `draw_references`) whose paths are relative to ``root``."""
        from .data import AnomalyDataset
        from .evaluate import autocast

        memory = cls(model)
        for (name, category), rows in drawn.items():
            refs = AnomalyDataset(rows, root, model.transform, model.image_size)
            with autocast(model.device):
                memory.add(f"{name}/{category}", torch.stack([refs[i]["image"] for i in range(len(refs))]), category)
        return memory

    @torch.no_grad()
    def add(self, key: str, images: torch.Tensor, class_name: str) -> None:
        """Remember the patch features of ``images`` (k, 3, S, S), normal images of category ``key``."""
        out = self.model(images.to(self.model.device), class_name, return_tokens=True)
        self.banks[key] = [F.normalize(t.float(), dim=-1).reshape(-1, t.shape[-1]) for t in out.patch_tokens]

    def distance_map(self, tokens: Sequence[torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
        """(B, S, S) few-shot map in [0, 1] for tokens per layer (B, N, W) of images of ``keys``."""
        rows = []
        for b, key in enumerate(keys):
            if key not in self.banks:
                raise KeyError(f"no few-shot references for {key!r}; add them first")
            per_layer = [1 - (F.normalize(t[b].float(), dim=-1) @ bank.T).max(dim=-1).values        # (N,)
                         for t, bank in zip(tokens, self.banks[key])]
            rows.append(torch.stack(per_layer).mean(0))
        dist = torch.stack(rows).clamp(0, 1)                                                      # (B, N)
        B, N = dist.shape
        g, size = self.model.image_size // self.model.patch_size, self.model.image_size
        up = F.interpolate(dist.reshape(B, 1, g, g), size=(size, size), mode="bilinear", align_corners=True)[:, 0]
        return gaussian_blur(up, self.model.cfg.fusion.smoothing_sigma).clamp(0, 1)

    def apply(self, out, keys: Sequence[str]):
        """The zero-shot output ``out`` (from ``return_tokens=True``) with the few-shot map added."""
        if out.patch_tokens is None:
            raise ValueError("few-shot scoring needs the patch tokens: call the model with return_tokens=True")
        few = self.distance_map(out.patch_tokens, keys)
        pixel = (out.pixel_scores + few) / 2
        score = (out.image_scores + few.flatten(1).max(dim=1).values) / 2
        return dataclasses.replace(out, image_scores=score, pixel_scores=pixel)


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


__all__ = ["FewShotMemory", "draw_references", "reference_list"]
