"""Crane (Salehi et al., arXiv 2504.11055): AnomalyCLIP's machinery with E-Attn, context-guided prompts
and score-based pooling.

Reference code: github AlirezaSalehy/Crane (MIT, "Copyright (c) 2024 Alireza Salehi"); what it
computes, quirk by quirk, is ANOMALYCLIP_CRANE_AACLIP_SPEC.md section 2, followed here:

- AnomalyCLIP's backbone (QuickGELU, bilinear positional embedding), object-agnostic sentences and deep
  prompts (`anomalyclip.py`), with the side path's attention replaced by **E-Attn**: per head
  [softmax(Q Qᵀ s) + softmax(K Kᵀ s) + softmax(V Vᵀ s)] V, the three summed **without renormalising**
  (rows sum to 3), then the block's output projection;
- the image feature **with** ``ln_post`` (unlike AnomalyCLIP);
- **score-based pooling**: the patch features weighted by their softmax(P·T / 0.07)[abnormal], summed,
  normalised, averaged half-half with the image feature and normalised: that scores the image;
- **context-guided prompts** in training: each image's normalised feature is inserted as a token after
  the 12 contexts (the rest of each sentence shifted by one, its last padding dropped), so the text
  features are per image; at test the reference inserts none (its test.sh default), and neither do we
  by default (``context_token_at_test=True`` inserts it, flagged as not the reference's test);
- the released Crane setting lists layers 6, 12, 18, 24 but reads layer 24 four times (a view that
  later blocks update in place): ``layers=(24,)`` with the segmentation loss counted 4 x 2 = 8 times is
  that computation (``alias_layers`` and the four layers reproduce it literally);
- training: 8 x [focal + Dice (abnormal channel only)] + 0.2 x CE(<g', T_b> / 0.01, y), Adam lr 1e-3,
  betas (0.6, 0.999), batch 8, 5 epochs; the maps upsampled bilinearly in training too (the reference:
  nearest, ``train_upsample="nearest"``).

Crane+ (DINOv2-guided D-Attn) is not built here: its DINOv2 weights cannot be obtained offline.
Release files: ``checkpoints/trained_on_{mvtec,visa}_{crane,cranep}/epoch_N.pth`` (``{"prompt_learner":
...}`` with CUDA tensors: loaded onto the CPU), read by AnomalyCLIP's loader; a copy of
``trained_on_mvtec_crane/epoch_5.pth`` is a test fixture (``tests/fixtures/crane/``, with its licence).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import BackboneCfg
from .anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from .base import Targets
from .losses import dice_loss, focal_loss
from .registry import register


@dataclass
class CraneConfig(AnomalyCLIPConfig):
    backbone: BackboneCfg = field(default_factory=lambda: BackboneCfg(pos_embed_interp="bilinear"))
    global_ln_post: bool = True            # Crane applies ln_post to its image feature
    seg_weight: float = 8.0                # 2 per entry x 4 entries that all read layer 24 (released Crane)
    image_weight: float = 0.2
    image_temperature: float = 0.01        # the training CE's temperature (maps and test scores: 0.07)
    pooling_weight: float = 0.5            # g' = normalise(w · pooled + (1 - w) · g)
    context_token_at_test: bool = False    # the reference's test inserts no image token
    train_upsample: str = "bilinear"       # "nearest": the reference's training upsampling

    def __post_init__(self):
        super().__post_init__()
        if self.train_upsample not in ("bilinear", "nearest"):
            raise ValueError(f"train_upsample must be 'bilinear' or 'nearest', got {self.train_upsample!r}")


@register
class Crane(AnomalyCLIP):
    name = "crane"
    config_class = CraneConfig
    published_name = "Crane"
    paper = "Salehi et al., Crane: Context-Guided Prompt Learning and Attention Refinement for Zero-Shot Anomaly Detections, arXiv 2504.11055"
    reference = "github.com/AlirezaSalehy/Crane (MIT)"
    learns = "AnomalyCLIP's context sentences and deep text prompts (43,008 values)"
    train_defaults = dict(epochs=5, batch_size=8, lr=1e-3, betas=(0.6, 0.999), optimizer="adam", aug_rate=0.0)
    side_kinds = ("qq", "kk", "vv")

    # ---------------------------------------------------------------- text with the image token
    def prompt_embeddings(self, image_tokens: Optional[torch.Tensor] = None):
        """With ``image_tokens`` (B, Wt): per image, the token after the contexts and the rest shifted."""
        emb, tokens = super().prompt_embeddings()                                 # (1, 2, T, Wt), (1, 2, T)
        if image_tokens is None:
            return emb, tokens
        B, at = image_tokens.shape[0], 1 + self.cfg.n_ctx
        emb = emb.expand(B, -1, -1, -1)
        token = image_tokens.to(emb.dtype)[:, None, None].expand(B, 2, 1, -1)
        emb = torch.cat([emb[:, :, :at], token, emb[:, :, at:-1]], dim=2)
        ids = tokens.expand(B, -1, -1)
        ids = torch.cat([ids[..., :at], torch.zeros_like(ids[..., :1]), ids[..., at:-1]], dim=-1)
        return emb, ids

    @property
    def text_depends_on_image(self) -> bool:
        return self.cfg.context_token_at_test

    def forward_text(self, feature: torch.Tensor, targets: Optional[Targets]) -> torch.Tensor:
        """Per image (the context token) in training, or at test with ``context_token_at_test``."""
        if targets is not None or self.cfg.context_token_at_test:
            return self.text_features(image_tokens=feature)
        return self.text_features()

    # ---------------------------------------------------------------- score-based pooling
    def pooled_feature(self, feature: torch.Tensor, patches, text: torch.Tensor) -> torch.Tensor:
        """normalise(w · normalise(Σ_n a_n P̄_n) + (1 - w) · g), a the patches' abnormal probability."""
        mean_patch = torch.stack([P.float() for P in patches]).mean(0)                    # (B, N, D), not renormalised
        logits = torch.stack([torch.einsum("bnd,bdc->bnc", P.float(), text) for P in patches]).mean(0)
        a = torch.softmax(logits / self.cfg.temperature, dim=-1)[..., 1]                 # (B, N)
        pooled = F.normalize(torch.einsum("bn,bnd->bd", a, mean_patch), dim=-1)
        w = self.cfg.pooling_weight
        return F.normalize(w * pooled + (1 - w) * feature.float(), dim=-1)

    def image_probs(self, feature, patches, probs, text, temperature):
        g = self.pooled_feature(feature, patches, text)
        return torch.softmax(torch.einsum("bd,bdc->bc", g, text) / temperature, dim=-1)

    def loss(self, feature, patches, probs, text, targets: Targets):
        """seg_weight x Σ layers [focal + Dice(abnormal, m)] + image_weight x CE(<g', T_b> / 0.01, y)."""
        g = self.pooled_feature(feature, patches, text)
        logits = torch.einsum("bd,bdc->bc", g, text) / self.cfg.image_temperature
        image = F.cross_entropy(logits, targets.labels.long())
        has = targets.has_mask
        seg = torch.zeros((), device=image.device)
        if bool(has.any()):
            m = targets.masks[has]
            for p in probs:
                M = self.upsample(p[has], self.cfg.train_upsample)
                seg = seg + focal_loss(M, m) + dice_loss(M[:, 1], m, targets.dice)
        loss = self.cfg.seg_weight * seg + self.cfg.image_weight * image
        return loss, {"image_focal": float(image.detach()), "segmentation": float(seg.detach())}

    @staticmethod
    def official_trained_on(path: Path) -> Optional[str]:
        """``trained_on_mvtec_crane/epoch_5.pth`` -> "mvtec"."""
        name = path.parent.name
        if name.startswith("trained_on_"):
            return name[len("trained_on_"):].rsplit("_", 1)[0]
        return None

