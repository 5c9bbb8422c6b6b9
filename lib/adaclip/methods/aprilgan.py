"""APRIL-GAN (Chen, Han, Zhang; VAND challenge report, arXiv 2305.17382): linear heads on four layers.

Reference code: github ByChelsea/VAND-APRIL-GAN (MIT, "Copyright (c) 2023 Xuhai Chen"); what it
computes, quirk by quirk, is APRILGAN_WINCLIP_SPEC.md Part 1, followed here:

- the frozen OpenAI ViT-L-14-336 at 518 px with exact GELU (the reference rebuilds open_clip's plain
  config at 518; its released heads were trained on those features), taps after blocks 6, 12, 18, 24;
- text: 7 normal and 5 abnormal states in 35 templates, each sentence normalised, averaged, normalised;
- four ``Linear(1024 -> 768)`` heads on the raw residual patch tokens (no ``ln_post``), normalised; per
  layer 100 · P @ T upsampled bilinearly (``align_corners=True``), then softmaxed; the map is the **sum**
  of the four abnormal channels, unsmoothed (``smoothing_sigma`` adds a Gaussian for a harness-uniform
  comparison, reported as its own setting); the image score is CLIP's class token against the text;
- few-shot: per layer a memory of the references' raw tokens, each test patch's 1 - largest cosine,
  upsampled and summed over layers, added to the zero-shot map; the image score is
  0.5 · (s + max(map) / 12) by default, or the reference's per-category min-max of max(map) over the
  **test set** (``few_shot_image_score="test_minmax"``, transductive, flagged wherever reported);
- training: Σ over layers of focal + Dice (abnormal channel) on the annotated test split of the
  auxiliary dataset, Adam lr 1e-3, betas (0.5, 0.999), batch 8, 3 epochs on MVTec AD (15 on VisA),
  the 2x2 mosaic with probability 0.2 on MVTec AD.

Our maps are the reference's divided by their upper bound (4 zero-shot, 12 few-shot) so that they lie
in [0, 1]; every metric only ranks, so none changes. Release files: ``{"trainable_linearlayer":
{"fc.{i}.weight", "fc.{i}.bias"}}`` (``mvtec_pretrained.pth``, ``visa_pretrained.pth``), ``fc.i`` <-> our
``heads.i``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import default_out_layers, encode_image
from ..config import BackboneCfg, ConfigBase
from . import checkpoint
from .base import Method, MethodOutput, PathLike, Targets, full_precision, replace
from .ensembles import ABNORMAL_STATES, APRILGAN_TEMPLATES, NORMAL_STATES, class_text, sentences
from .losses import dice_loss, focal_loss
from .registry import register
from .shared import StateEnsemble, clip_class_probs, gaussian_blur, patch_map

ZERO_SHOT_BOUND, FEW_SHOT_BOUND = 4.0, 12.0   # the reference map's upper bounds: 4 layers; + 4 distances <= 2


@dataclass
class APRILGANConfig(ConfigBase):
    backbone: BackboneCfg = field(default_factory=lambda: BackboneCfg(pos_embed_interp="bicubic_antialias"))
    class_names: str = "readable"          # "readable" ("metal_nut" -> "metal nut") or "verbatim" (reference)
    smoothing_sigma: float = 0.0           # the reference smooths nothing
    few_shot_image_score: str = "fixed"    # "fixed": 0.5·(s + max/12); "test_minmax": the reference (transductive)

    def __post_init__(self):
        class_text("x", self.class_names)
        if self.few_shot_image_score not in ("fixed", "test_minmax"):
            raise ValueError(f"few_shot_image_score must be 'fixed' or 'test_minmax', got {self.few_shot_image_score!r}")


@register
class APRILGAN(Method):
    name = "aprilgan"
    config_class = APRILGANConfig
    published_name = "APRIL-GAN"
    paper = "Chen, Han, Zhang, APRIL-GAN: A Zero-/Few-Shot Anomaly Classification and Segmentation Method, arXiv 2305.17382"
    reference = "github.com/ByChelsea/VAND-APRIL-GAN (MIT)"
    learns = "four linear heads (patch tokens -> joint space)"
    supports_few_shot = True
    train_defaults = dict(epochs=3, batch_size=8, lr=1e-3, betas=(0.5, 0.999), optimizer="adam", aug_rate=0.2)

    def __init__(self, cfg: Optional[APRILGANConfig] = None, clip=None, device: Optional[str] = None):
        super().__init__(cfg if cfg is not None else APRILGANConfig(), clip, device)
        visual = self.clip.visual
        n_vis = len(visual.transformer.resblocks)
        self.out_layers = self.cfg.backbone.out_layers or default_out_layers(n_vis)
        if not all(1 <= k <= n_vis for k in self.out_layers):
            raise ValueError(f"out_layers {self.out_layers} must lie in 1..{n_vis} for {self.cfg.backbone.name}")
        self.heads = nn.ModuleList([nn.Linear(visual.transformer.width, visual.output_dim) for _ in self.out_layers])
        mode = self.cfg.class_names
        self.text = StateEnsemble(self.clip, self.cfg.backbone.name, lambda c: sentences(
            class_text(c, mode), NORMAL_STATES, ABNORMAL_STATES, APRILGAN_TEMPLATES))

    def forward(self, images: torch.Tensor, class_names: Union[str, Sequence[str]], return_tokens: bool = False,
                text_features: Optional[torch.Tensor] = None, return_details: bool = False,
                return_layer_maps: bool = False, targets: Optional[Targets] = None) -> MethodOutput:
        class_names = self.check_inputs(images, class_names)
        with torch.no_grad():
            feature, tokens = encode_image(self.clip.visual, images, self.out_layers)   # (B, D), 4 x (B, N, W)
        text = self.text(class_names) if text_features is None else text_features            # (B, D, 2)
        patch = [F.normalize(head(t), dim=-1) for head, t in zip(self.heads, tokens)]          # (B, N, D) each
        with full_precision(images.device):
            text = text.float()
            probs = clip_class_probs(feature.float(), text)                                   # (B, 2)
            # per layer: upsample the logits, then softmax (the reference's order)
            maps = [torch.softmax(patch_map(100.0 * torch.einsum("bnd,bdc->bnc", P.float(), text), self.image_size,
                                            align_corners=True), dim=1) for P in patch]       # (B, 2, S, S) each
            total = torch.stack([m[:, 1] for m in maps]).sum(0)                               # (B, S, S) in [0, 4]
            pixel = gaussian_blur(total / ZERO_SHOT_BOUND, self.cfg.smoothing_sigma)
        out = MethodOutput(probs[:, 1], pixel, probs, maps if return_layer_maps else None,
                           tokens if return_tokens else None,
                           {"zero_shot_map": total} if (return_details or return_tokens) else None)
        if targets is not None:
            out.loss, out.loss_parts = aprilgan_loss(maps, targets)
        return out

    # ---------------------------------------------------------------- few-shot
    def few_shot_memory(self) -> "APRILGANMemory":
        return APRILGANMemory(self)

    @property
    def transductive(self) -> bool:
        return self.cfg.few_shot_image_score == "test_minmax"

    def finalize_scores(self, parts: np.ndarray) -> np.ndarray:
        """The reference's few-shot image score: 0.5 · (s + min-max of max(map) over the category's test
        images). ``parts``: (n, 2) [zero-shot score s, max of the few-shot + zero-shot map]."""
        s, m = parts[:, 0], parts[:, 1]
        span = m.max() - m.min()
        return 0.5 * (s + ((m - m.min()) / span if span > 0 else np.zeros_like(m)))

    # ---------------------------------------------------------------- official files
    def load_official_checkpoint(self, path: PathLike) -> "APRILGAN":
        """``mvtec_pretrained.pth`` / ``visa_pretrained.pth``: ``{"trainable_linearlayer": {"fc.i.*"}}``."""
        obj = checkpoint.read(path)
        state = obj.get("trainable_linearlayer") if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise checkpoint.CheckpointError(f"{path} is not an APRIL-GAN release file: it has no "
                                             f"'trainable_linearlayer' state dict")
        mapped = {k.replace("fc.", "heads.", 1) if k.startswith("fc.") else k: v for k, v in state.items()}
        checkpoint.load_state(self, mapped, path)
        self.trained_on = {"mvtec_pretrained": "mvtec", "visa_pretrained": "visa"}.get(Path(path).stem)
        return self


def aprilgan_loss(maps: list, targets: Targets):
    """Σ over layers of focal + Dice on the abnormal channel, images with pixel ground truth only
    (the reference has no image-level loss and no Dice on the normal channel)."""
    has = targets.has_mask
    if not bool(has.any()):
        zero = sum(m.sum() for m in maps) * 0.0
        return zero, {"image_focal": 0.0, "segmentation": 0.0}
    masks = targets.masks[has]
    seg = sum(focal_loss(m.float()[has], masks) + dice_loss(m.float()[has][:, 1], masks, targets.dice) for m in maps)
    return seg, {"image_focal": 0.0, "segmentation": float(seg.detach())}


class APRILGANMemory:
    """APRIL-GAN's few-shot memory: per category and tapped layer, the references' raw patch tokens."""

    def __init__(self, model: APRILGAN):
        self.model = model
        self.banks: dict[str, list[torch.Tensor]] = {}        # key -> per layer (k·N, W), L2-normalised

    @torch.no_grad()
    def add(self, key: str, images: torch.Tensor, class_name: str) -> None:
        out = self.model(images.to(self.model.device), class_name, return_tokens=True)
        self.banks[key] = [F.normalize(t.float(), dim=-1).reshape(-1, t.shape[-1]) for t in out.patch_tokens]

    def apply(self, out: MethodOutput, keys: Sequence[str]) -> MethodOutput:
        """The zero-shot ``out`` (``return_tokens=True``) with the memory's distances added."""
        if out.patch_tokens is None:
            raise ValueError("few-shot scoring needs the patch tokens: call the model with return_tokens=True")
        model = self.model
        dist = []
        for b, key in enumerate(keys):
            if key not in self.banks:
                raise KeyError(f"no few-shot references for {key!r}; add them first")
            per_layer = [1 - (F.normalize(t[b].float(), dim=-1) @ bank.T).max(dim=-1).values          # (N,)
                         for t, bank in zip(out.patch_tokens, self.banks[key])]
            dist.append(torch.stack(per_layer))                                                 # (K, N)
        dist = torch.stack(dist)                                                                # (B, K, N)
        few = patch_map(dist.transpose(1, 2), model.image_size, align_corners=True).sum(1)      # (B, S, S) in [0, 8]
        total = out.details["zero_shot_map"] + few                                              # (B, S, S) in [0, 12]
        top = total.flatten(1).max(dim=1).values
        pixel = gaussian_blur(total / FEW_SHOT_BOUND, model.cfg.smoothing_sigma)
        score = 0.5 * (out.image_scores + top / FEW_SHOT_BOUND)
        parts = torch.stack([out.image_scores, top], dim=1)                                    # for test_minmax
        return replace(out, image_scores=score, pixel_scores=pixel, score_parts=parts)
