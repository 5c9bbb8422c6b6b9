"""The `linear` baseline: AdaCLIP's recipe without prompts and HSF, an ablation of what AdaCLIP adds.

Learned linear projections of the four tapped layers' patch tokens into the joint space (the part
APRIL-GAN also learns), scored against AdaCLIP's text ensembles and combined as AdaCLIP combines
them (mean of the layer logits, softmax, Gaussian sigma 4), trained with AdaCLIP's loss and optimiser;
the image score is CLIP's frozen class feature against the text. It differs from `aprilgan` (35
templates, the sum of per-layer softmax maps unsmoothed, its own loss and optimiser), which is the
method as its authors ran it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import default_out_layers, encode_image
from ..config import BackboneCfg, ConfigBase
from .adaclip import adaclip_loss_for
from .base import Method, MethodOutput, Targets, full_precision
from .ensembles import state_sentences
from .registry import register
from .shared import PatchMemory, StateEnsemble, clip_class_probs, mean_logit_map


@dataclass
class LinearConfig(ConfigBase):
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    smoothing_sigma: float = 4.0


@register
class LinearBaseline(Method):
    name = "linear"
    config_class = LinearConfig
    paper = "an ablation of AdaCLIP (ECCV 2024): its patch projections alone"
    reference = "this repository"
    learns = "linear projections of four layers' patch tokens"
    supports_few_shot = True
    train_defaults = dict(epochs=5, batch_size=1, lr=0.01, betas=(0.5, 0.999), optimizer="adamw", aug_rate=0.0)

    def __init__(self, cfg: Optional[LinearConfig] = None, clip=None, device: Optional[str] = None):
        super().__init__(cfg if cfg is not None else LinearConfig(), clip, device)
        visual = self.clip.visual
        n_vis = len(visual.transformer.resblocks)
        self.out_layers = self.cfg.backbone.out_layers or default_out_layers(n_vis)
        if not all(1 <= k <= n_vis for k in self.out_layers):
            raise ValueError(f"out_layers {self.out_layers} must lie in 1..{n_vis} for {self.cfg.backbone.name}")
        self.patch_proj = nn.ModuleList([nn.Linear(visual.transformer.width, visual.output_dim)
                                         for _ in self.out_layers])
        self.text = StateEnsemble(self.clip, self.cfg.backbone.name, state_sentences)

    def few_shot_memory(self) -> PatchMemory:
        return PatchMemory(self, self.cfg.smoothing_sigma)

    def forward(self, images: torch.Tensor, class_names: Union[str, Sequence[str]], return_tokens: bool = False,
                text_features: Optional[torch.Tensor] = None, return_details: bool = False,
                return_layer_maps: bool = False, targets: Optional[Targets] = None) -> MethodOutput:
        class_names = self.check_inputs(images, class_names)
        with torch.no_grad():
            feature, tokens = encode_image(self.clip.visual, images, self.out_layers)
        text = self.text(class_names) if text_features is None else text_features            # (B, D, 2)
        patch = [F.normalize(proj(t), dim=-1) for proj, t in zip(self.patch_proj, tokens)]     # (B, N, D) each
        with full_precision(images.device):
            text = text.float()
            logits = [100.0 * torch.einsum("bnd,bdc->bnc", P.float(), text) for P in patch]
            pixel, raw, maps = mean_logit_map(logits, self.image_size, self.cfg.smoothing_sigma)
            probs = clip_class_probs(feature.float(), text)
        details = {"layer_logits": logits, "raw_pixel_scores": raw} if return_details else None
        layer_maps = [torch.softmax(m, dim=1) for m in maps] if (return_layer_maps or targets is not None) else None
        out = MethodOutput(probs[:, 1], pixel, probs, layer_maps, tokens if return_tokens else None, details)
        if targets is not None:
            out.loss, out.loss_parts = adaclip_loss_for(out, targets)
        return out
