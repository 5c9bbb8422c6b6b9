"""AdaCLIP: a frozen CLIP with hybrid learnable prompts (Cao et al., ECCV 2024).

Follows ADACLIP_SPEC.md step by step; batched (the reference supports batch size 1 only).
``cfg.method`` selects a baseline through the same forward (config.METHODS): ``clip`` projects the
last layer's patch tokens with CLIP's own ln_post and projection, ``linear`` learns the patch
projections only; both score the image with CLIP's frozen class feature.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdaCLIPConfig
from ..text import NORMAL_STATES, TEMPLATES, state_sentences
from ..transforms import build_transform
from . import checkpoint
from .backbone import (build_clip, config_quick_gelu, default_out_layers, encode_image, encode_text, patch_size,
                       weights_quick_gelu)
from .fusion import gaussian_blur, hybrid_semantic_fusion
from . import text_packing
from .prompts import HybridPrompts

log = logging.getLogger(__name__)


@dataclass
class AdaCLIPOutput:
    image_scores: torch.Tensor                       # (B,) P(abnormal) from the image feature
    pixel_scores: torch.Tensor                       # (B, S, S) smoothed anomaly map in [0, 1]
    image_probs: torch.Tensor                        # (B, 2) [normal, abnormal], for the loss
    layer_maps: Optional[list[torch.Tensor]] = None  # per output layer (B, 2, S, S) softmax, for the loss
    patch_tokens: Optional[list[torch.Tensor]] = None  # per output layer (B, N, W), the maps' own pass (few-shot)
    details: Optional[dict] = None   # return_details: layer_logits, raw_pixel_scores, hsf_patches, hsf_clusters


class AdaCLIP(nn.Module):
    """Frozen CLIP (``self.clip``) plus the learnable parts: prompts and projections.

    >>> model = AdaCLIP.from_config(AdaCLIPConfig.tiny())
    >>> out = model(torch.randn(2, 3, 32, 32), ["bottle", "bottle"])
    >>> out.pixel_scores.shape, out.image_scores.shape
    (torch.Size([2, 32, 32]), torch.Size([2]))
    """

    def __init__(self, cfg: AdaCLIPConfig, clip: Optional[nn.Module] = None, device: Optional[str] = None):
        super().__init__()
        if cfg.backbone.quick_gelu is None:      # resolved here, so that every config written records it
            cfg.backbone.quick_gelu = default_quick_gelu(cfg)
        self.cfg = cfg
        self.clip = clip if clip is not None else build_clip(cfg.backbone, device)
        self.clip.eval().requires_grad_(False)
        visual = self.clip.visual
        n_vis, n_txt = len(visual.transformer.resblocks), len(self.clip.transformer.resblocks)
        self.method = cfg.method
        default_layers = (n_vis,) if cfg.method == "clip" else default_out_layers(n_vis)
        self.out_layers = cfg.backbone.out_layers or default_layers
        if not all(1 <= k <= n_vis for k in self.out_layers):
            raise ValueError(f"out_layers {self.out_layers} must lie in 1..{n_vis} for {cfg.backbone.name}")
        width, text_width = visual.transformer.width, self.clip.transformer.width
        embed_dim = visual.output_dim
        self.image_size, self.patch_size = cfg.backbone.image_size, patch_size(visual)

        p = cfg.prompts
        if p.branch and p.depth > min(n_vis, n_txt):
            raise ValueError(f"prompt depth {p.depth} exceeds the encoder depth ({n_vis} visual, {n_txt} text)")
        self.visual_prompts = HybridPrompts(width, embed_dim, p.length, p.depth, p.static, p.dynamic) \
            if p.visual else None
        self.text_prompts = HybridPrompts(text_width, embed_dim, p.length, p.depth, p.static, p.dynamic) \
            if p.text else None
        # "clip" learns nothing; "linear" learns the patch projections only (config.METHODS)
        self.patch_proj = nn.ModuleList([nn.Linear(width, embed_dim) for _ in self.out_layers]) \
            if cfg.method != "clip" else None
        self.cls_proj = nn.Linear(embed_dim, embed_dim) if cfg.method == "adaclip" else None

        self.tokenizer = open_clip.get_tokenizer(cfg.backbone.name)
        self._n_normal = len(NORMAL_STATES) * len(TEMPLATES)  # sentences 0..n-1 normal, the rest abnormal
        self._tokens: dict[str, torch.Tensor] = {}       # class name -> (S, T) token ids
        self._lengths: dict[str, int] = {}               # class name -> tokens up to its last EOT
        self._packed: dict[tuple, tuple] = {}            # (class name, L, ...) -> layer-0 output, packing
        self._packable = text_packing.supported(self.clip)
        # recompute the frozen blocks' activations in backward instead of storing them (training memory)
        self.checkpoint_activations = False
        self._frozen_text: dict[tuple, torch.Tensor] = {}  # text features of an unprompted text tower
        self.random_weights = cfg.backbone.pretrained is None
        # the auxiliary datasets it learned from ("mvtec+colondb"), "" when it learns nothing, None unknown
        self.trained_on: Optional[str] = None if self.learnable_parameters() else ""

    # ---------------------------------------------------------------- construction / io
    @classmethod
    def from_config(cls, cfg: Union[AdaCLIPConfig, dict, None] = None) -> "AdaCLIP":
        if cfg is None:
            cfg = AdaCLIPConfig()
        elif isinstance(cfg, dict):
            cfg = AdaCLIPConfig.from_dict(cfg)
        return cls(cfg)

    @property
    def transform(self):
        """PIL image -> normalised (3, S, S) tensor, as the model expects."""
        return build_transform(self.cfg.backbone)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("clip.")]

    def learnable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def save(self, path: Union[str, Path], **extra) -> None:
        """Learnable parameters plus the config, written atomically."""
        checkpoint.save(path, self, **extra)

    @classmethod
    def load(cls, path: Union[str, Path], map_location="cpu", **backbone_overrides) -> "AdaCLIP":
        """Rebuild from a checkpoint written by `save`. ``backbone_overrides`` (e.g.
        ``pretrained="/path/ViT-L-14-336px.pt"``) replace fields of the stored backbone config."""
        return checkpoint.load(cls, path, map_location=map_location, **backbone_overrides)

    def load_official_checkpoint(self, path: Union[str, Path]) -> "AdaCLIP":
        """Load a release file of the reference code (e.g. ``pretrained_all.pth``) into this model
        (which must have the file's setting; `from_official` builds it)."""
        checkpoint.load_official(self, path)
        return self

    @classmethod
    def from_official(cls, path: Union[str, Path], **overrides) -> "AdaCLIP":
        """An official release file in the setting it was trained in (the paper's, exact GELU);
        ``overrides``: config sections as dicts, e.g. ``backbone={"pretrained": "/path/ViT-L-14-336px.pt"}``
        (``backbone={"quick_gelu": True}`` runs QuickGELU instead, with a warning)."""
        return cls(checkpoint.official_config(**overrides)).load_official_checkpoint(path)

    # ---------------------------------------------------------------- text
    def _tokens_for(self, name: str) -> torch.Tensor:
        if name not in self._tokens:
            normal, abnormal = state_sentences(name)
            self._tokens[name] = self.tokenizer(normal + abnormal)
            tokens = self._tokens[name]                                            # up to the last EOT
            self._lengths[name] = tokens.shape[-1] if tokens.is_meta else int(tokens.argmax(-1).max()) + 1
        return self._tokens[name]

    def _encode_states(self, names: Sequence[str], layer_prompts) -> torch.Tensor:
        if layer_prompts is not None and len(layer_prompts) > 1 and self._packable and not self.device.type == "meta":
            feats = F.normalize(self._encode_packed(names, layer_prompts), dim=-1)    # (G, S, D)
        else:
            tokens = torch.stack([self._tokens_for(c) for c in names]).to(self.device)   # (G, S, T)
            length = max(self._lengths[c] for c in names)
            feats = F.normalize(encode_text(self.clip, tokens, layer_prompts, length=length), dim=-1)
        n = self._n_normal
        normal = F.normalize(feats[:, :n].mean(1), dim=-1)
        abnormal = F.normalize(feats[:, n:].mean(1), dim=-1)
        return torch.stack([normal, abnormal], dim=-1)                              # (G, D, 2)

    def _encode_packed(self, names: Sequence[str], layer_prompts) -> torch.Tensor:
        """The prompted text pass without repeated work (text_packing.py), per distinct class name."""
        G, L = len(names), layer_prompts[0].shape[1]
        out = [None] * G
        for name in dict.fromkeys(names):
            where = [g for g, c in enumerate(names) if c == name]
            key = (name, L, self.device, self.clip.logit_scale.dtype)
            if key not in self._packed:
                tokens = self._tokens_for(name)
                self._packed[key] = (text_packing.layer0(self.clip, tokens.to(self.device)),
                                     text_packing.Packing.build(tokens, L))
            first, packing = self._packed[key]
            prompts = [p[where] if p.shape[0] == G and G > 1 else p for p in layer_prompts]
            feats = text_packing.encode_text_packed(self.clip, first, packing, prompts,
                                                    checkpoint=self._checkpointing())    # (g or 1, S, D)
            for j, g in enumerate(where):
                out[g] = feats[j if feats.shape[0] > 1 else 0]
        return torch.stack(out)

    def text_features(self, class_names: Sequence[str], dynamic: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, D, 2) text features, column 0 normal, 1 abnormal.

        Computed once per distinct class name unless dynamic text prompts make them per image;
        cached when the text tower is not prompted (they are constants then).
        """
        if self.text_prompts is not None and dynamic is not None:
            return self._encode_states(class_names, self.text_prompts.layer_prompts(dynamic))
        uniq = list(dict.fromkeys(class_names))
        if self.text_prompts is not None:
            feats = self._encode_states(uniq, self.text_prompts.layer_prompts(None))
        else:
            feats = torch.cat([self._frozen_text_features(c) for c in uniq])
        return feats[[uniq.index(c) for c in class_names]]

    def _frozen_text_features(self, name: str) -> torch.Tensor:
        key = (name, self.device, self.clip.logit_scale.dtype)
        if key not in self._frozen_text:
            with torch.no_grad():
                self._frozen_text[key] = self._encode_states([name], None)
        return self._frozen_text[key]

    # ---------------------------------------------------------------- forward
    def _check_inputs(self, images, class_names) -> list[str]:
        S, P = self.image_size, self.patch_size
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor of shape (B, 3, {S}, {S}), got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, {S}, {S}) (RGB), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point, normalised by model.transform; got {images.dtype}")
        H, W = images.shape[-2:]
        if H % P or W % P:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {P}")
        if (H, W) != (S, S):
            raise ValueError(f"images must be {S}x{S} (the configured image_size), got {H}x{W}")
        if isinstance(class_names, str):
            class_names = [class_names] * images.shape[0]
        class_names = list(class_names)
        if len(class_names) != images.shape[0] or not all(isinstance(c, str) for c in class_names):
            raise ValueError(f"class_names must be one string or {images.shape[0]} strings (one per image), "
                             f"got {len(class_names)} items")
        return class_names

    def forward(self, images: torch.Tensor, class_names: Union[str, Sequence[str]],
                return_layer_maps: bool = False, return_tokens: bool = False,
                text_features: Optional[torch.Tensor] = None, return_details: bool = False) -> AdaCLIPOutput:
        """images: (B, 3, S, S) from `transform`; class_names: one per image (or one for all).
        ``text_features`` (B, D, 2): precomputed ones, valid only where no dynamic text prompt makes
        them depend on the image (an exported graph keeps them as constants)."""
        class_names = self._check_inputs(images, class_names)
        p, visual = self.cfg.prompts, self.clip.visual
        dynamic = p.dynamic and bool(p.branch)

        # 1. unprompted pass: pooled feature for the dynamic prompts, or everything if V is off
        feature = tokens = None
        if dynamic or self.visual_prompts is None:
            with torch.no_grad():
                feature, tokens = encode_image(visual, images, self.out_layers if self.visual_prompts is None else ())
        # 2. dynamic prompts from that feature
        dyn_v = self.visual_prompts.generate(feature) if dynamic and self.visual_prompts else None
        dyn_t = self.text_prompts.generate(feature) if dynamic and self.text_prompts else None
        # 3. prompted visual pass
        if self.visual_prompts is not None:
            feature, tokens = encode_image(visual, images, self.out_layers,
                                           self.visual_prompts.layer_prompts(dyn_v), checkpoint=self._checkpointing())
        # 4. text features (B, D, 2)
        text = self.text_features(class_names, dyn_t) if text_features is None else text_features
        # 5. projections into the joint space
        if self.patch_proj is None:               # "clip": CLIP's own ln_post and projection
            patch = [F.normalize(visual.ln_post(t) @ visual.proj, dim=-1) for t in tokens]    # (B, N, D) each
        else:
            patch = [F.normalize(proj(t), dim=-1) for proj, t in zip(self.patch_proj, tokens)]
        image_feature = F.normalize(self.cls_proj(feature) if self.cls_proj is not None else feature, dim=-1)  # (B, D)
        # 6.-9. in float32 even under autocast: bf16 maps would turn pixel metrics into ties
        with _full_precision(images.device):
            patch = [P.float() for P in patch]
            text, image_feature = text.float(), image_feature.float()
            # 6. per-layer patch-text logits
            logits = [100.0 * torch.einsum("bnd,bdc->bnc", P, text) for P in patch]         # (B, N, 2) each
            # 7. hybrid semantic fusion
            fc = self.cfg.fusion
            details = {"layer_logits": logits} if return_details else None
            if fc.use_hsf:
                h, chosen, clusters = hybrid_semantic_fusion(patch, logits, fc.k_clusters, fc.seed, fc.kmeans,
                                                             return_clusters=True)
                image_feature = F.normalize(fc.alpha * h + (1 - fc.alpha) * image_feature, dim=-1)
                if details is not None:
                    details.update(hsf_patches=chosen, hsf_clusters=clusters)
            # 8. image score
            image_probs = torch.softmax(100.0 * torch.einsum("bd,bdc->bc", image_feature, text), dim=-1)
            # 9. pixel maps
            maps = [self._upsample(m) for m in logits]                                      # (B, 2, S, S) each
            agg = torch.softmax(torch.stack(maps).mean(0), dim=1)
            pixel = (agg[:, 1] + 1 - agg[:, 0]) / 2                                         # (B, S, S)
            if details is not None:
                details["raw_pixel_scores"] = pixel
            pixel = gaussian_blur(pixel, fc.smoothing_sigma)
            layer_maps = [torch.softmax(m, dim=1) for m in maps] if return_layer_maps else None
        return AdaCLIPOutput(image_probs[:, 1], pixel, image_probs, layer_maps, tokens if return_tokens else None,
                             details)

    def _upsample(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) -> (B, 2, S, S), bilinear with align_corners=True (reference)."""
        B, N, C = logits.shape
        g = self.image_size // self.patch_size                  # a plain int, also when traced for export
        x = logits.transpose(1, 2).reshape(B, C, g, g)
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)

    def _checkpointing(self) -> bool:
        return self.checkpoint_activations and self.training and torch.is_grad_enabled()

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen: dropout / patch dropout stay off
        return self


def default_quick_gelu(cfg: AdaCLIPConfig) -> bool:
    """Each method's activation as its reference ran it (ADACLIP_SPEC.md, Backbone): AdaCLIP (and the
    `linear` heads, APRIL-GAN's at 518 px) build open_clip's config, exact GELU for ViT-L-14-336 with
    OpenAI's weights; the training-free `clip` baseline is CLIP as its weights were trained (QuickGELU)."""
    if cfg.method == "clip":
        return weights_quick_gelu(cfg.backbone)
    return config_quick_gelu(cfg.backbone.name)


def _full_precision(device: torch.device):
    """Leave any autocast region (meta tensors have none)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def build_model(cfg: Union[AdaCLIPConfig, dict, None] = None) -> AdaCLIP:
    return AdaCLIP.from_config(cfg)
