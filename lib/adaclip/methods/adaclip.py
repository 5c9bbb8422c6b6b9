"""AdaCLIP: a frozen CLIP with hybrid learnable prompts (Cao et al., ECCV 2024, arXiv 2407.15795).

Reference code: github caoyunkang/AdaCLIP (MIT licence); what it computes, quirk by quirk, is
ADACLIP_SPEC.md, followed here step by step and batched (the reference supports batch size 1 only).
Learnable: static prompts and dynamic prompt heads in the first ``depth`` layers of both encoders,
per-layer patch projections and a class projection (10,665,472 parameters at the paper's setting);
Hybrid Semantic Fusion for the image score (`adaclip_hsf.py`), the prompts in `adaclip_prompts.py`.

Official release files (``pretrained_mvtec_colondb.pth``, ``pretrained_visa_clinicdb.pth``,
``pretrained_all.pth``): a plain state dict of the reference trainer, keys prefixed ``clip_model.``,
trained with ViT-L-14-336 at 518 px, prompt depth 4, length 5, type SD, branch VL (the defaults), on
exact-GELU features: the reference builds open_clip's plain ``ViT-L-14-336`` config, which has no
``quick_gelu``, around the OpenAI weights (ADACLIP_SPEC.md, Backbone). `official_config` is that
setting; loading a release file into a QuickGELU model warns. Key mapping (reference -> ours):

| reference key                                        | ours                              |
|------------------------------------------------------|-----------------------------------|
| clip_model.visual_prompter.static_prompts.{i}         | visual_prompts.static.{i}         |
| clip_model.text_prompter.static_prompts.{i}           | text_prompts.static.{i}           |
| clip_model.dynamic_visual_prompt_generator.head.{l}.* | visual_prompts.dynamic.{l}.*      |
| clip_model.dynamic_text_prompt_generator.head.{l}.*   | text_prompts.dynamic.{l}.*        |
| clip_model.patch_token_layer.head.{k}.*               | patch_proj.{k}.*                  |
| clip_model.cls_token_layer.head.0.*                   | cls_proj.*                        |
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import default_out_layers, encode_image, encode_text, text_packing
from ..config import BackboneCfg, ConfigBase
from . import checkpoint
from .adaclip_hsf import hybrid_semantic_fusion
from .adaclip_prompts import HybridPrompts
from .base import Method, MethodOutput, PathLike, Targets, full_precision
from .ensembles import NORMAL_STATES, TEMPLATES, state_sentences
from .losses import adaclip_loss
from .registry import register
from .shared import PatchMemory, StateEnsemble, mean_logit_map

AdaCLIPOutput = MethodOutput     # the name this model's output had before the methods package


@dataclass
class PromptCfg(ConfigBase):
    depth: int = 4          # J: layers 0..J-1 of each encoder are prompted
    length: int = 5         # L: prompt tokens per layer
    type: str = "SD"        # S static, D dynamic, SD hybrid (static + dynamic)
    branch: str = "VL"      # V visual, L language (text), VL both, "" no prompts

    def __post_init__(self):
        self.type = "".join(sorted(self.type.upper(), reverse=True))  # "DS" -> "SD"
        self.branch = "".join(sorted(self.branch.upper(), reverse=True))
        if self.type not in ("S", "D", "SD"):
            raise ValueError(f"prompt type must be 'S', 'D' or 'SD', got {self.type!r}")
        if self.branch not in ("", "V", "L", "VL"):
            raise ValueError(f"prompt branch must be '', 'V', 'L' or 'VL', got {self.branch!r}")
        if self.branch and (self.depth < 1 or self.length < 1):
            raise ValueError(f"prompt depth and length must be >= 1, got {self.depth} and {self.length}")

    @property
    def static(self) -> bool:
        return "S" in self.type

    @property
    def dynamic(self) -> bool:
        return "D" in self.type

    @property
    def visual(self) -> bool:
        return "V" in self.branch

    @property
    def text(self) -> bool:
        return "L" in self.branch


@dataclass
class FusionCfg(ConfigBase):
    use_hsf: bool = True          # Hybrid Semantic Fusion for the image score
    k_clusters: int = 20          # k-means clusters; top 5·k patches are clustered
    alpha: float = 0.2            # weight of the HSF feature against the class feature
    kmeans: str = "torch"         # "torch": seeded, batched; "sklearn": the reference (per image)
    seed: int = 0                 # k-means seed (the reference's sklearn call is unseeded)
    max_iter: int = 100           # Lloyd steps at most (an exported graph runs them all)
    smoothing_sigma: float = 4.0  # Gaussian filter on the inference map; 0 disables

    def __post_init__(self):
        if self.kmeans not in ("torch", "sklearn"):
            raise ValueError(f"fusion.kmeans must be 'torch' or 'sklearn', got {self.kmeans!r}")
        if self.k_clusters < 1:
            raise ValueError(f"fusion.k_clusters must be >= 1, got {self.k_clusters}")
        if self.max_iter < 1:
            raise ValueError(f"fusion.max_iter must be >= 1, got {self.max_iter}")


@dataclass
class AdaCLIPConfig(ConfigBase):
    """AdaCLIP at the paper's setting: ViT-L-14-336 with OpenAI's weights at 518 px, exact GELU (as the
    reference ran), hybrid prompts of depth 4 and length 5 in both encoders, HSF with 20 clusters."""
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    prompts: PromptCfg = field(default_factory=PromptCfg)
    fusion: FusionCfg = field(default_factory=FusionCfg)

    @classmethod
    def tiny(cls, **backbone_overrides) -> "AdaCLIPConfig":
        """A tiny randomly initialised ViT for tests, CI and smoke runs (scores are meaningless)."""
        bb = dict(name="adaclip-tiny", pretrained=None, image_size=32)
        bb.update(backbone_overrides)
        return cls(backbone=BackboneCfg(**bb), prompts=PromptCfg(depth=2, length=2),
                   fusion=FusionCfg(k_clusters=3, max_iter=20))


@register
class AdaCLIP(Method):
    """Frozen CLIP (``self.clip``) plus the learnable parts: prompts and projections.

    >>> model = AdaCLIP.from_config(AdaCLIPConfig.tiny())
    >>> out = model(torch.randn(2, 3, 32, 32), ["bottle", "bottle"])
    >>> out.pixel_scores.shape, out.image_scores.shape
    (torch.Size([2, 32, 32]), torch.Size([2]))
    """

    name = "adaclip"
    config_class = AdaCLIPConfig
    published_name = "AdaCLIP"
    paper = "Cao et al., AdaCLIP: Adapting CLIP with Hybrid Learnable Prompts for Zero-Shot Anomaly Detection, ECCV 2024"
    reference = "github.com/caoyunkang/AdaCLIP (MIT)"
    learns = "static and dynamic prompts in both encoders, patch and class projections"
    supports_few_shot = True
    train_defaults = dict(epochs=5, batch_size=1, lr=0.01, betas=(0.5, 0.999), optimizer="adamw", aug_rate=0.0)
    notebook_params = {"prompt_depth": "prompts.depth", "prompt_length": "prompts.length", "prompt_type": "prompts.type",
                       "prompt_branch": "prompts.branch", "use_hsf": "fusion.use_hsf", "k_clusters": "fusion.k_clusters"}

    def __init__(self, cfg: Optional[AdaCLIPConfig] = None, clip: Optional[nn.Module] = None,
                 device: Optional[str] = None):
        super().__init__(cfg if cfg is not None else AdaCLIPConfig(), clip, device)
        cfg, visual = self.cfg, self.clip.visual
        n_vis, n_txt = len(visual.transformer.resblocks), len(self.clip.transformer.resblocks)
        self.out_layers = cfg.backbone.out_layers or default_out_layers(n_vis)
        if not all(1 <= k <= n_vis for k in self.out_layers):
            raise ValueError(f"out_layers {self.out_layers} must lie in 1..{n_vis} for {cfg.backbone.name}")
        width, text_width = visual.transformer.width, self.clip.transformer.width
        embed_dim = visual.output_dim

        p = cfg.prompts
        if p.branch and p.depth > min(n_vis, n_txt):
            raise ValueError(f"prompt depth {p.depth} exceeds the encoder depth ({n_vis} visual, {n_txt} text)")
        self.visual_prompts = HybridPrompts(width, embed_dim, p.length, p.depth, p.static, p.dynamic) \
            if p.visual else None
        self.text_prompts = HybridPrompts(text_width, embed_dim, p.length, p.depth, p.static, p.dynamic) \
            if p.text else None
        self.patch_proj = nn.ModuleList([nn.Linear(width, embed_dim) for _ in self.out_layers])
        self.cls_proj = nn.Linear(embed_dim, embed_dim)

        self.tokenizer = open_clip.get_tokenizer(cfg.backbone.name)
        self._n_normal = len(NORMAL_STATES) * len(TEMPLATES)  # sentences 0..n-1 normal, the rest abnormal
        self._tokens: dict[str, torch.Tensor] = {}       # class name -> (S, T) token ids
        self._lengths: dict[str, int] = {}               # class name -> tokens up to its last EOT
        self._packed: dict[tuple, tuple] = {}            # (class name, L, ...) -> layer-0 output, packing
        self._packable = text_packing.supported(self.clip)
        self.frozen_text = StateEnsemble(self.clip, cfg.backbone.name, state_sentences)   # unprompted text tower

    @classmethod
    def from_config(cls, cfg: Union[AdaCLIPConfig, dict, None] = None) -> "AdaCLIP":
        if isinstance(cfg, dict):
            cfg = AdaCLIPConfig.from_dict(cfg)
        return cls(cfg)

    @classmethod
    def load(cls, path: PathLike, map_location="cpu", **backbone_overrides) -> "AdaCLIP":
        """Rebuild from a checkpoint written by `save`. ``backbone_overrides`` (e.g.
        ``pretrained="/path/ViT-L-14-336px.pt"``) replace fields of the stored backbone config."""
        model = checkpoint.load(path, map_location=map_location, **backbone_overrides)
        if not isinstance(model, cls):
            raise checkpoint.CheckpointError(f"{path} holds method {model.name!r}, not AdaCLIP: load it with "
                                             f"adaclip.methods.load('{path}')")
        return model

    @classmethod
    def tiny_config(cls, **backbone) -> AdaCLIPConfig:
        return AdaCLIPConfig.tiny(**backbone)

    @classmethod
    def official_config(cls, **overrides) -> AdaCLIPConfig:
        """The setting the official release files were trained in: the paper's defaults with exact GELU.
        ``overrides``: config sections as dicts (``backbone={"pretrained": "/path/ViT-L-14-336px.pt"}``)."""
        config = super().official_config(**overrides)
        if config.backbone.quick_gelu is None:
            config.backbone.quick_gelu = False
        return config

    def load_official_checkpoint(self, path: PathLike) -> "AdaCLIP":
        """Load a release file of the reference code (e.g. ``pretrained_all.pth``) into this model
        (which must have the file's setting; `from_official` builds it)."""
        if self.cfg.backbone.quick_gelu:
            warnings.warn(f"{path}: the official AdaCLIP files were trained on exact-GELU features (the reference "
                          f"builds open_clip's plain config); this model runs QuickGELU (quick_gelu=True), so its "
                          f"scores will differ from the paper's", UserWarning, stacklevel=2)
        checkpoint.load_state(self, map_official_keys(checkpoint.read_state_dict(path)), path)
        self.trained_on = OFFICIAL_TRAINED_ON.get(Path(path).stem)
        return self

    def few_shot_memory(self) -> PatchMemory:
        return PatchMemory(self, self.cfg.fusion.smoothing_sigma)

    @property
    def text_depends_on_image(self) -> bool:
        return self.text_prompts is not None and self.cfg.prompts.dynamic

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
                                                    checkpoint=self.checkpointing())    # (g or 1, S, D)
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
            feats = self.frozen_text(uniq)
        return feats[[uniq.index(c) for c in class_names]]

    # ---------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, class_names: Union[str, Sequence[str]],
                return_layer_maps: bool = False, return_tokens: bool = False,
                text_features: Optional[torch.Tensor] = None, return_details: bool = False,
                targets: Optional[Targets] = None) -> MethodOutput:
        """images: (B, 3, S, S) from `transform`; class_names: one per image (or one for all).
        ``text_features`` (B, D, 2): precomputed ones, valid only where no dynamic text prompt makes
        them depend on the image (an exported graph keeps them as constants). ``targets``: also the
        training loss (`adaclip_loss`)."""
        class_names = self.check_inputs(images, class_names)
        return_layer_maps = return_layer_maps or targets is not None
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
                                           self.visual_prompts.layer_prompts(dyn_v), checkpoint=self.checkpointing())
        # 4. text features (B, D, 2)
        text = self.text_features(class_names, dyn_t) if text_features is None else text_features
        # 5. projections into the joint space
        patch = [F.normalize(proj(t), dim=-1) for proj, t in zip(self.patch_proj, tokens)]    # (B, N, D) each
        image_feature = F.normalize(self.cls_proj(feature), dim=-1)                            # (B, D)
        # 6.-9. in float32 even under autocast: bf16 maps would turn pixel metrics into ties
        with full_precision(images.device):
            patch = [P.float() for P in patch]
            text, image_feature = text.float(), image_feature.float()
            # 6. per-layer patch-text logits
            logits = [100.0 * torch.einsum("bnd,bdc->bnc", P, text) for P in patch]         # (B, N, 2) each
            # 7. hybrid semantic fusion
            fc = self.cfg.fusion
            details = {"layer_logits": logits} if return_details else None
            if fc.use_hsf:
                h, chosen, clusters = hybrid_semantic_fusion(patch, logits, fc.k_clusters, fc.seed, fc.kmeans,
                                                             return_clusters=True, max_iter=fc.max_iter)
                image_feature = F.normalize(fc.alpha * h + (1 - fc.alpha) * image_feature, dim=-1)
                if details is not None:
                    details.update(hsf_patches=chosen, hsf_clusters=clusters)
            # 8. image score
            image_probs = torch.softmax(100.0 * torch.einsum("bd,bdc->bc", image_feature, text), dim=-1)
            # 9. pixel maps
            pixel, raw, maps = mean_logit_map(logits, self.image_size, fc.smoothing_sigma)
            if details is not None:
                details["raw_pixel_scores"] = raw
            layer_maps = [torch.softmax(m, dim=1) for m in maps] if return_layer_maps else None
        out = MethodOutput(image_probs[:, 1], pixel, image_probs, layer_maps, tokens if return_tokens else None, details)
        if targets is not None:
            out.loss, out.loss_parts = adaclip_loss_for(out, targets)
        return out


def adaclip_loss_for(out: MethodOutput, targets: Targets):
    """The reference's loss on a batch: focal on the image score, focal + Dice (both channels) per
    layer map; images without pixel ground truth add no segmentation loss."""
    has = targets.has_mask
    maps = [m.float()[has] for m in out.layer_maps] if bool(has.any()) else []
    return adaclip_loss(out.image_probs.float(), maps, targets.labels, targets.masks[has], targets.dice)


OFFICIAL_KEY_MAP = [
    (r"visual_prompter\.static_prompts\.(\d+)", r"visual_prompts.static.\1"),
    (r"text_prompter\.static_prompts\.(\d+)", r"text_prompts.static.\1"),
    (r"dynamic_visual_prompt_generator\.head\.(\d+)\.(weight|bias)", r"visual_prompts.dynamic.\1.\2"),
    (r"dynamic_text_prompt_generator\.head\.(\d+)\.(weight|bias)", r"text_prompts.dynamic.\1.\2"),
    (r"patch_token_layer\.head\.(\d+)\.(weight|bias)", r"patch_proj.\1.\2"),
    (r"cls_token_layer\.head\.0\.(weight|bias)", r"cls_proj.\1"),
]
# what each release file learned from (the reference's README and train.py commands)
OFFICIAL_TRAINED_ON = {"pretrained_mvtec_colondb": "mvtec+colondb", "pretrained_visa_clinicdb": "visa+clinicdb",
                       "pretrained_all": "all 14 datasets"}


def map_official_keys(state: dict) -> dict:
    """Reference key names -> ours; keys that match no rule are kept as they are (reported later)."""
    out = {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "clip_model."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        for pattern, repl in OFFICIAL_KEY_MAP:
            if re.fullmatch(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        else:
            k = key
        out[k] = value
    return out


def build_model(cfg: Union[AdaCLIPConfig, dict, None] = None) -> AdaCLIP:
    return AdaCLIP.from_config(cfg)
