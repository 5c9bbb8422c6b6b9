"""The frozen CLIP every method shares: stock ``open_clip_torch`` (no vendored copy), its weights
(tag, local file, cache; a clear error offline), activation, input size and image transform.

How the positional embedding reaches the input size is a recorded choice, because the references
differ (``BackboneCfg.pos_embed_interp``): AdaCLIP resizes bicubically without antialiasing, open_clip
(APRIL-GAN, AA-CLIP) bicubically with antialiasing (the same when enlarging), AnomalyCLIP and Crane
bilinearly.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import open_clip
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from torchvision import transforms as T

from ..config import BackboneCfg, activation_name

log = logging.getLogger(__name__)

WEIGHTS_ENV = "ADACLIP_CLIP_WEIGHTS"   # path to a local CLIP weights file; overrides a tag
_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)  # registers `adaclip-tiny` for tests and CI


class WeightsUnavailableError(RuntimeError):
    """CLIP weights could not be found locally or downloaded."""


def resolve_weights(cfg: BackboneCfg) -> Optional[str]:
    """Where the CLIP weights come from: a local file, an open_clip tag, or None (random init).

    Order: the ``ADACLIP_CLIP_WEIGHTS`` environment variable (a file) when a tag is configured,
    then ``cfg.pretrained`` as a file path, then as an open_clip tag (which open_clip resolves
    from its cache or downloads).
    """
    if cfg.pretrained is None:
        return None
    env = os.environ.get(WEIGHTS_ENV)
    if env and not _looks_like_path(cfg.pretrained):
        if not Path(env).is_file():
            raise FileNotFoundError(f"{WEIGHTS_ENV}={env} does not name a file; unset it or point it "
                                    f"at the CLIP weights for {cfg.name}")
        log.info("CLIP weights for %s from %s=%s", cfg.name, WEIGHTS_ENV, env)
        return env
    if _looks_like_path(cfg.pretrained):
        if not Path(cfg.pretrained).expanduser().is_file():
            raise FileNotFoundError(f"CLIP weights file {cfg.pretrained} (backbone {cfg.name}) does not exist")
        return str(Path(cfg.pretrained).expanduser())
    tags = open_clip.list_pretrained_tags_by_model(cfg.name)
    tag = _clean_tag(cfg.pretrained)
    if tag not in tags:
        raise ValueError(f"unknown pretrained tag {cfg.pretrained!r} for {cfg.name}; known tags: {tags}, "
                         f"or give a local file path, or None for random weights")
    return tag


def _looks_like_path(p: str) -> bool:
    return os.sep in p or p.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(p).expanduser().is_file()


def config_quick_gelu(name: str) -> bool:
    """The activation open_clip's config for ``name`` builds: exact GELU for the plain ViT configs,
    QuickGELU for the ``-quickgelu`` ones. AdaCLIP's reference builds ``CLIP(**cfg)`` from such a
    config around the OpenAI weights, so it runs exact GELU (ADACLIP_SPEC.md, Backbone)."""
    return bool(open_clip.get_model_config(name).get("quick_gelu", False))


def weights_quick_gelu(cfg: BackboneCfg, default: bool = True) -> bool:
    """The activation the configured weights were trained with: the tag's own; for a file or a random
    init ``default`` (True: OpenAI's QuickGELU, CLIP as OpenAI built it)."""
    tag = _known_tag(cfg)
    if tag:
        return bool(open_clip.get_pretrained_cfg(cfg.name, tag).get("quick_gelu", False))
    return default


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")                      # as open_clip cleans tags


def _known_tag(cfg: BackboneCfg) -> Optional[str]:
    """The configured open_clip tag, cleaned, if it is one (not a file, not None)."""
    if cfg.pretrained is None:
        return None
    tag = _clean_tag(cfg.pretrained)
    return tag if tag in open_clip.list_pretrained_tags_by_model(cfg.name) else None


def build_clip(cfg: BackboneCfg, device: Optional[str] = None) -> nn.Module:
    """Create the frozen CLIP at ``cfg.image_size`` with the configured weights.

    ``device="meta"`` builds the architecture without memory (parameter counts, shape checks).

    Raises ValueError for an unknown or unsupported backbone and WeightsUnavailableError (with
    how to supply a file) when the weights can be neither found nor downloaded.
    """
    if cfg.name not in open_clip.list_models():
        raise ValueError(f"unknown backbone {cfg.name!r}; open_clip ViT models include "
                         f"{[m for m in open_clip.list_models() if m.startswith('ViT-')][:12]} ...")
    vision = open_clip.get_model_config(cfg.name).get("vision_cfg", {})
    if "patch_size" in vision:                    # fail before loading any weights
        check_image_size(cfg.image_size, int(vision["patch_size"]))
    weights = resolve_weights(cfg)
    quick_gelu = config_quick_gelu(cfg.name) if cfg.quick_gelu is None else bool(cfg.quick_gelu)
    if weights is None:
        # a backbone open_clip has weights for, built without them, may be a mistake: a warning. One with
        # none anywhere (the tiny test ViT) is random by design and every output of its runs says so
        # (config.json, figure titles, a line in the notebooks): a warning here only added red stderr
        # copies of that line to each notebook that builds a model
        level = logging.WARNING if open_clip.list_pretrained_tags_by_model(cfg.name) else logging.INFO
        log.log(level, "random weights: scores are meaningless (backbone %s, pretrained=None)", cfg.name)
    try:
        # Built at the native size, then resized below as the method's reference resizes
        # (open_clip's loader would always antialias).
        # `quick_gelu` as a model argument overrides the config both ways; open_clip's warning that
        # OpenAI's weights were trained with QuickGELU is expected where GELU is the recorded choice
        with _seeded(cfg.init_seed if weights is None else None), _without_random_init_warning(), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="QuickGELU mismatch")
            clip = open_clip.create_model(cfg.name, pretrained=weights, quick_gelu=quick_gelu,
                                          **({"device": device} if device else {}))
    except Exception as e:  # network / hub / cache failures all end here
        if weights is None or isinstance(e, (FileNotFoundError, ValueError)):
            raise
        raise WeightsUnavailableError(
            f"could not load CLIP weights {cfg.pretrained!r} for backbone {cfg.name} ({type(e).__name__}: {e}). "
            f"Offline? Download the weights elsewhere and pass pretrained='/path/to/file' (or set "
            f"{WEIGHTS_ENV}=/path/to/file); open_clip's cache (~/.cache/huggingface, ~/.cache/clip) is "
            f"also searched. For a smoke run without weights use pretrained=None (scores are meaningless)."
        ) from e
    visual = getattr(clip, "visual", None)
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
        raise ValueError(f"backbone {cfg.name} is not a plain open_clip ViT (got {type(visual).__name__}); "
                         f"the methods need ViT patch tokens, e.g. ViT-B-16, ViT-L-14, ViT-L-14-336")
    if getattr(clip, "text_pool_type", "argmax") != "argmax" or not hasattr(clip, "token_embedding"):
        raise ValueError(f"backbone {cfg.name} has no CLIP text tower with EOT (argmax) pooling")
    if not (visual.transformer.batch_first and clip.transformer.batch_first):
        raise ValueError(f"backbone {cfg.name} runs its transformers sequence-first; the prompted passes "
                         f"expect open_clip's default batch-first layout")
    set_image_size(visual, cfg.image_size, cfg.pos_embed_interp)
    log.info("%s: %s activation", cfg.name, activation_name(quick_gelu))
    clip.eval().requires_grad_(False)
    return clip


@contextlib.contextmanager
def _without_random_init_warning():
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly": the root logger's
    (stderr, "WARNING:root:" in a notebook) copy of what `build_clip` says itself."""
    drop = lambda record: not record.getMessage().startswith("No pretrained weights loaded")  # noqa: E731
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Random init from a fixed seed (so a random-weight checkpoint reloads the same backbone),
    without touching the caller's random state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


POS_EMBED_INTERP = {            # BackboneCfg.pos_embed_interp -> F.interpolate arguments
    "bicubic": dict(mode="bicubic", align_corners=False),                    # AdaCLIP's reference
    "bicubic_antialias": dict(mode="bicubic", align_corners=False, antialias=True),   # open_clip's own
    "bilinear": dict(mode="bilinear", align_corners=False),                  # AnomalyCLIP, Crane
}


def resize_pos_embed(pos_embed: torch.Tensor, grid: int, interp: str = "bicubic") -> torch.Tensor:
    """(1 + g², W) -> (1 + grid², W): interpolated over the grid (`POS_EMBED_INTERP`), class position kept."""
    cls_pos, grid_pos = pos_embed[:1], pos_embed[1:]
    old = int(round(grid_pos.shape[0] ** 0.5))
    if old * old != grid_pos.shape[0]:
        raise ValueError(f"positional embedding of {grid_pos.shape[0]} patches is not a square grid")
    if old == grid:
        return pos_embed
    x = grid_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()   # (1, W, g, g)
    x = F.interpolate(x, size=(grid, grid), **POS_EMBED_INTERP[interp])
    x = x.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, x], dim=0)


def set_image_size(visual: nn.Module, image_size: int, interp: str = "bicubic") -> None:
    """Make a ViT take (image_size, image_size) inputs by resizing its positional embedding."""
    patch = patch_size(visual)
    check_image_size(image_size, patch)
    grid = image_size // patch
    if tuple(visual.grid_size) != (grid, grid):
        old = tuple(visual.grid_size)
        visual.positional_embedding = nn.Parameter(resize_pos_embed(visual.positional_embedding.data, grid, interp),
                                                   requires_grad=False)
        visual.grid_size = (grid, grid)
        visual.image_size = (image_size, image_size)
        log.info("positional embedding resized (%s) from grid %s to %s", interp, old, (grid, grid))


def check_image_size(image_size: int, patch: int) -> None:
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}; "
                         f"use e.g. {image_size // patch * patch} or {(image_size // patch + 1) * patch}")


def patch_size(visual: nn.Module) -> int:
    p = visual.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def default_out_layers(n_layers: int) -> tuple[int, ...]:
    """Quarter depths, 1-based: 24 layers -> (6, 12, 18, 24), 12 -> (3, 6, 9, 12)."""
    q = n_layers // 4
    if q < 1:
        raise ValueError(f"a ViT with {n_layers} layers has no four quarter-depth outputs; set out_layers")
    return (q, 2 * q, 3 * q, 4 * q)


def normalization(cfg: BackboneCfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Image mean/std of the configured weights (OpenAI's unless the tag says otherwise)."""
    tag = _known_tag(cfg)
    pc = open_clip.get_pretrained_cfg(cfg.name, tag) if tag else {}
    return tuple(pc.get("mean") or OPENAI_DATASET_MEAN), tuple(pc.get("std") or OPENAI_DATASET_STD)




def build_transform(cfg: BackboneCfg, normalize: bool = True) -> T.Compose:
    """PIL RGB image -> (3, S, S) float tensor: resize to (S, S) bicubic (no aspect-preserving crop, as
    every reference squashes), to tensor, normalise with the weights' mean/std (OpenAI's for `openai`).
    ``normalize=False``: the resized image as a uint8 tensor, for `Normalizer` to finish on the model's
    device (a quarter of the bytes to move; the same numbers)."""
    mean, std = normalization(cfg)
    size = cfg.image_size
    resize = T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)
    if not normalize:
        return T.Compose([resize, T.PILToTensor()])
    return T.Compose([resize, T.ToTensor(), T.Normalize(mean, std)])


class Normalizer:
    """uint8 (B, 3, S, S) images from ``build_transform(cfg, normalize=False)`` -> what
    ``build_transform(cfg)`` gives, bit for bit: ToTensor's ``float / 255``, then Normalize's
    ``sub_(mean).div_(std)``, on whatever device the batch is."""

    def __init__(self, cfg: BackboneCfg):
        self.mean, self.std = normalization(cfg)
        self._on: dict = {}                                # device -> (mean, std): copied there once, not per batch

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():                     # already normalised (the plain transform)
            return images
        if images.device not in self._on:
            self._on[images.device] = tuple(torch.as_tensor(v, dtype=torch.float32, device=images.device).view(-1, 1, 1)
                                            for v in (self.mean, self.std))
        mean, std = self._on[images.device]
        return images.to(torch.float32).div_(255).sub_(mean).div_(std)      # the cast is a new tensor: in place after it
