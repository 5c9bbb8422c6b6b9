"""The training-free zero-shot CLIP baseline: the "CLIP" row of the zero-shot anomaly papers.

Last-layer patch tokens through CLIP's own ``ln_post`` and projection, against AdaCLIP's normal /
abnormal text ensembles (28 + 20 sentences); maps upsampled, averaged and smoothed as AdaCLIP's; the
image score from the class token. Nothing is learned. It runs QuickGELU, CLIP as OpenAI trained it
(another tag's own activation for other weights), unlike AdaCLIP's exact GELU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..backbone import encode_image, weights_quick_gelu
from ..config import BackboneCfg, ConfigBase
from .base import Method, MethodOutput, Targets, full_precision
from .ensembles import state_sentences
from .registry import register
from .shared import PatchMemory, StateEnsemble, clip_class_probs, mean_logit_map


@dataclass
class CLIPConfig(ConfigBase):
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    smoothing_sigma: float = 4.0          # Gaussian filter on the map, as AdaCLIP's; 0 disables


@register
class CLIPBaseline(Method):
    name = "clip"
    config_class = CLIPConfig
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    reference = "open_clip (MIT); the zero-shot protocol of the anomaly papers' CLIP row"
    learns = "nothing"
    supports_few_shot = True

    def __init__(self, cfg: Optional[CLIPConfig] = None, clip=None, device: Optional[str] = None):
        super().__init__(cfg if cfg is not None else CLIPConfig(), clip, device)
        n_vis = len(self.clip.visual.transformer.resblocks)
        self.out_layers = self.cfg.backbone.out_layers or (n_vis,)
        if not all(1 <= k <= n_vis for k in self.out_layers):
            raise ValueError(f"out_layers {self.out_layers} must lie in 1..{n_vis} for {self.cfg.backbone.name}")
        self.text = StateEnsemble(self.clip, self.cfg.backbone.name, state_sentences)

    @classmethod
    def default_quick_gelu(cls, cfg) -> bool:
        return weights_quick_gelu(cfg.backbone)

    def few_shot_memory(self) -> PatchMemory:
        return PatchMemory(self, self.cfg.smoothing_sigma)

    def forward(self, images: torch.Tensor, class_names: Union[str, Sequence[str]], return_tokens: bool = False,
                text_features: Optional[torch.Tensor] = None, return_details: bool = False,
                return_layer_maps: bool = False, targets: Optional[Targets] = None) -> MethodOutput:
        class_names = self.check_inputs(images, class_names)
        visual = self.clip.visual
        with torch.no_grad():
            feature, tokens = encode_image(visual, images, self.out_layers)
        text = self.text(class_names) if text_features is None else text_features            # (B, D, 2)
        with full_precision(images.device):
            patch = [F.normalize(visual.ln_post(t) @ visual.proj, dim=-1).float() for t in tokens]   # (B, N, D)
            text = text.float()
            logits = [100.0 * torch.einsum("bnd,bdc->bnc", P, text) for P in patch]
            pixel, raw, maps = mean_logit_map(logits, self.image_size, self.cfg.smoothing_sigma)
            probs = clip_class_probs(feature.float(), text)
        details = {"layer_logits": logits, "raw_pixel_scores": raw} if return_details else None
        layer_maps = [torch.softmax(m, dim=1) for m in maps] if return_layer_maps else None
        return MethodOutput(probs[:, 1], pixel, probs, layer_maps, tokens if return_tokens else None, details)
