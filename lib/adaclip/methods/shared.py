"""Pieces several methods share: the text-ensemble features, maps from patch logits, the Gaussian
smoothing, and the patch-token few-shot memory of AdaCLIP and its baselines."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import encode_text


class StateEnsemble:
    """Normal / abnormal text features of a class name from its sentence ensemble, computed once per
    class name (the text tower is frozen and unprompted) and cached.

    ``sentences(name) -> (normal, abnormal)``. Each sentence's EOT feature (``ln_final``, projection)
    is L2-normalised, averaged per state and normalised again (AdaCLIP, APRIL-GAN); with
    ``normalize_each=False`` the raw features are averaged (WinCLIP's re-implementations), and the
    cosine at scoring time normalises.
    """

    def __init__(self, clip: nn.Module, tokenizer_name: str, sentences: Callable, normalize_each: bool = True):
        self.clip, self.sentences, self.normalize_each = clip, sentences, normalize_each
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name)
        self.cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        """(G, D, 2) features of ``names``, column 0 normal, 1 abnormal."""
        return torch.cat([self.features(n) for n in names])

    def features(self, name: str) -> torch.Tensor:
        device, dtype = self.clip.logit_scale.device, self.clip.logit_scale.dtype
        key = (name, device, dtype)
        if key not in self.cache:
            normal, abnormal = self.sentences(name)
            tokens = self.tokenizer(normal + abnormal).to(device)                  # (S, T)
            length = int(tokens.argmax(-1).max()) + 1
            with torch.no_grad():
                feats = encode_text(self.clip, tokens[None], length=length)[0]     # (S, D)
            if self.normalize_each:
                feats = F.normalize(feats, dim=-1)
            pooled = [feats[:len(normal)].mean(0), feats[len(normal):].mean(0)]
            if self.normalize_each:
                pooled = [F.normalize(p, dim=-1) for p in pooled]
            self.cache[key] = torch.stack(pooled, dim=-1)[None]                   # (1, D, 2)
        return self.cache[key]


def patch_map(logits: torch.Tensor, size: int, align_corners: bool) -> torch.Tensor:
    """(B, N, C) patch logits -> (B, C, size, size), bilinear (N a square grid)."""
    B, N, C = logits.shape
    g = int(round(N ** 0.5))
    x = logits.transpose(1, 2).reshape(B, C, g, g)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=align_corners)


def mean_logit_map(logits: Sequence[torch.Tensor], size: int, sigma: float):
    """AdaCLIP's map from per-layer patch logits (B, N, 2): each upsampled bilinearly with
    ``align_corners=True``, averaged, softmaxed, (p1 + 1 - p0) / 2 (= p1), then smoothed with a
    Gaussian of ``sigma``. Returns (smoothed (B, S, S), unsmoothed (B, S, S), per-layer (B, 2, S, S))."""
    maps = [patch_map(m, size, align_corners=True) for m in logits]                 # (B, 2, S, S) each
    agg = torch.softmax(torch.stack(maps).mean(0), dim=1)
    raw = (agg[:, 1] + 1 - agg[:, 0]) / 2                                           # (B, S, S)
    return gaussian_blur(raw, sigma), raw, maps


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """(B, H, W) -> (B, H, W); equals scipy.ndimage.gaussian_filter(mode='reflect') per image."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype).to(maps.device)
    x = maps[:, None]                                                             # (B, 1, H, W)
    for dim in (2, 3):
        x = _symmetric_pad(x, radius, dim)
        w = kernel.view(1, 1, -1, 1) if dim == 2 else kernel.view(1, 1, 1, -1)
        x = F.conv2d(x, w)
    return x[:, 0]


def _symmetric_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """scipy's 'reflect' (d c b a | a b c d | d c b a), for any pad width."""
    n = x.shape[dim]
    i = torch.arange(-r, n + r, device=x.device) % (2 * n)
    i = torch.where(i >= n, 2 * n - 1 - i, i)
    return x.index_select(dim, i)


class PatchMemory:
    """Few-shot memory of AdaCLIP and its baselines: k normal references of a category, their patch
    tokens per tapped layer (APRIL-GAN / AnomalyCLIP's idea, on this method's own taps).

    Each test patch gets 1 - its largest cosine similarity to the bank of its layer, averaged over the
    layers, upsampled and smoothed like the zero-shot map; the maps are added and the image score adds
    the few-shot map's maximum, both sums halved (the distance clipped to [0, 1]) so scores stay in
    [0, 1].

    >>> memory = model.few_shot_memory()
    >>> memory.add("visa/capsules", reference_images, "capsules")           # (k, 3, S, S)
    >>> out = memory.apply(model(images, names, return_tokens=True), ["visa/capsules"] * len(images))
    """

    def __init__(self, model, smoothing_sigma: float, align_corners: bool = True):
        self.model, self.smoothing_sigma, self.align_corners = model, smoothing_sigma, align_corners
        self.banks: dict[str, list[torch.Tensor]] = {}   # key -> per layer (k·N, W), L2-normalised

    @torch.no_grad()
    def add(self, key: str, images: torch.Tensor, class_name: str) -> None:
        """Remember the patch features of ``images`` (k, 3, S, S), normal images of category ``key``."""
        out = self.model(images.to(self.model.device), class_name, return_tokens=True)
        self.banks[key] = [F.normalize(t.float(), dim=-1).reshape(-1, t.shape[-1]) for t in out.patch_tokens]

    def bank(self, key: str) -> list[torch.Tensor]:
        if key not in self.banks:
            raise KeyError(f"no few-shot references for {key!r}; add them first")
        return self.banks[key]

    def distance_map(self, tokens: Sequence[torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
        """(B, S, S) few-shot map in [0, 1] for tokens per layer (B, N, W) of images of ``keys``."""
        rows = []
        for b, key in enumerate(keys):
            per_layer = [1 - (F.normalize(t[b].float(), dim=-1) @ bank.T).max(dim=-1).values        # (N,)
                         for t, bank in zip(tokens, self.bank(key))]
            rows.append(torch.stack(per_layer).mean(0))
        dist = torch.stack(rows).clamp(0, 1)                                                      # (B, N)
        up = patch_map(dist[..., None], self.model.image_size, self.align_corners)[:, 0]
        return gaussian_blur(up, self.smoothing_sigma).clamp(0, 1)

    def apply(self, out, keys: Sequence[str]):
        """The zero-shot output ``out`` (from ``return_tokens=True``) with the few-shot map added."""
        if out.patch_tokens is None:
            raise ValueError("few-shot scoring needs the patch tokens: call the model with return_tokens=True")
        few = self.distance_map(out.patch_tokens, keys)
        pixel = (out.pixel_scores + few) / 2
        score = (out.image_scores + few.flatten(1).max(dim=1).values) / 2
        return dataclasses.replace(out, image_scores=score, pixel_scores=pixel)


def clip_class_probs(features: torch.Tensor, text: torch.Tensor, scale: float = 100.0,
                     normalize: bool = True) -> torch.Tensor:
    """softmax(scale · f @ T) over [normal, abnormal]: features (B, D), text (B, D, 2) -> (B, 2)."""
    f = F.normalize(features, dim=-1) if normalize else features
    return torch.softmax(scale * torch.einsum("bd,bdc->bc", f, text), dim=-1)


__all__ = ["StateEnsemble", "patch_map", "gaussian_blur", "PatchMemory", "clip_class_probs"]
