"""AA-CLIP (Ma et al., CVPR 2025, arXiv 2503.06661): anomaly-aware residual adapters in both towers.

Reference code: github Mwxinnn/AA-CLIP (Apache-2.0); what it computes, quirk by quirk, is
ANOMALYCLIP_CRANE_AACLIP_SPEC.md section 3, followed here:

- OpenAI ViT-L-14-336 at 518 px with exact GELU (it builds open_clip's plain config) and open_clip's
  bicubic (antialiased) positional-embedding resize;
- residual adapters after text blocks 1..3 and vision blocks 1..6 on every token: a = LeakyReLU(W x)
  (bias-free), rescaled to the token's own norm, x <- 0.1 a + 0.9 x;
- new projections instead of CLIP's: text Linear + LeakyReLU on ln_final(EOT); per tapped layer
  (6, 12, 18, 24) a segmentation projection of ln_post(patches), a detection projection of ln_post of
  the layer-24 patches averaged after normalising (a mean of unit vectors); bias-free, Xavier init;
- text: 3 normal and 5 abnormal states in 2 templates (6 + 10 sentences) per class name (plain names
  by default; the reference's hand-written descriptions with ``class_names="aaclip_real_names"``);
- two training stages in one run (`train_log.csv` says which): **text** adapters and projection against a
  V-V "surgery" teacher (blocks 6..24 run with V-V attention in the stream, MLP kept; targets
  normalise(ln_post(patches) @ proj) + normalise(CLIP's class feature), not renormalised), loss focal +
  Dice x 2 per layer + 0.1 x (mean <t_normal, t_abnormal>)²; the reference overwrites the loss in its layer
  loop so only layer 24 trains it (``stage1_last_layer_only=True``), the sum over the four layers is the
  default; the reference's V-V module reads its sequence-first (L, B, C) stream as (B, N, C), so its
  softmax runs over the *images of the batch* at each token position (CLIP Surgery, which it copies,
  transposes first): ours attends over an image's tokens, ``teacher_vv_axis="batch"`` is the literal
  code (the published numbers were trained that way; no weights were released); Adam lr 1e-5, batch 16,
  5 epochs (a quarter of the image stage's epochs); then **image**
  adapters and projections with the text anchors fixed: CE(<det, T>, y) without temperature + Σ layers
  focal + Dice x 2, Adam lr 5e-4, batch 2, 20 epochs, MultiStepLR at iterations 16000 and 32000;
  gradients through the whole frozen tower (`TrainCfg.checkpoint_activations` saves memory);
- map: per layer (100 · seg · T)[abnormal] + 1 - [normal], halved, **on the raw scores**, blurred on
  the patch grid (kernel 7, sigma 1 industrial; 9 and 1.5 medical; reflect borders as kornia), upsampled
  bilinearly (``align_corners=True``), summed over the layers; ours is that sum mapped linearly from its
  bounds to [0, 1] (metrics rank, so none changes);
- image score: the reference min-max normalises the maps' maximum and the score (<det, t_abn> + 1) / 2
  over each category's **test set** and averages them (medical: the map alone); that transductive score
  is ``image_score="aaclip_minmax_fusion"`` (flagged wherever reported); the default is per image:
  0.5 · max of the map's mean-logit probability + 0.5 · (<det, t_abn> + 1) / 2 (medical: the first).

The reference releases no weights; `load_official_checkpoint` reads the files its training writes (a
folder with ``text_adapter.pth`` and ``image_adapter.pth``). Augmentations of its training (rotation,
affine, flips, colour jitter) are not reproduced: the harness trains every method on the same images.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import (default_out_layers, embed_image, encode_image, encode_text, run_block,
                        run_block_with_attention, side_attention)
from ..config import BackboneCfg, ConfigBase
from . import checkpoint
from .base import Method, MethodOutput, PathLike, Stage, Targets, full_precision
from .ensembles import class_text, sentences
from .losses import dice_loss, focal_loss
from .registry import register

NORMAL = ("{}", "a {}", "the {}")
ABNORMAL = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage")
TEMPLATES = ("{}.", "a photo of {}.")
# the reference's hand-written descriptions (dataset/constants.py REAL_NAMES), by category folder name
REAL_NAMES = {
    "bottle": "dark bottle", "cable": "top view of three cables", "capsule": "black and orange capsule",
    "carpet": "gray carpet", "grid": "metal or plastic mesh", "hazelnut": "single brown hazelnut",
    "leather": "brown leather", "metal_nut": "metal nut which has four notched edges",
    "pill": "oval white pill with small red speckles and the letters 'FF' engraved", "screw": "screw",
    "tile": "speckled tile surface", "transistor": "a three-legged transistor placed vertically",
    "toothbrush": "toothbrush head", "wood": "wood surface", "zipper": "a black zipper",
    "candle": "candle", "pcb3": "infrared sensor pcb module", "capsules": "capsules",
    "pipe_fryum": "pipe-shaped fryum", "pcb4": "battery charging pcb module", "macaroni2": "scattered yellow macaroni",
    "pcb2": "integrated circuits board", "chewinggum": "chewing gum", "macaroni1": "orange macaroni",
    "cashew": "cashew nut", "fryum": "wheel-shaped fryum snack", "pcb1": "dual ultrasonic distance sensor pcb module",
    "01": "Bright concentric rings in neon yellow and blue tones against a dark blue background, resembling a "
          "stylized wave or energy field radiating outward.",
    "02": "vertical fabric lines in warm, dusty pink and beige tones",
    "03": "oval concentric circular rings in gradient shades of blue and white",
    "brain": "scan", "liver": "scan", "retina": "scan", "colondb": "colon endoscopy image",
    "clinicdb": "colon endoscopy image", "kvasir": "colon endoscopy image",
}
BLUR = {"industrial": (7, 1.0), "medical": (9, 1.5)}           # kernel, sigma on the patch grid


@dataclass
class AACLIPConfig(ConfigBase):
    backbone: BackboneCfg = field(default_factory=lambda: BackboneCfg(pos_embed_interp="bicubic_antialias"))
    levels: Optional[Tuple[int, ...]] = None   # tapped layers; None: quarter depths (6, 12, 18, 24)
    # None below: the reference's choice for ViT-L-14 scaled to the backbone, fixed when the model is built
    text_adapt_until: Optional[int] = None     # adapters after text blocks 1..3 (of 12)
    image_adapt_until: Optional[int] = None    # adapters after vision blocks 1..6 (of 24: a quarter)
    adapt_weight: float = 0.1                  # x <- w · adapted + (1 - w) · x
    seg_relu: bool = False                     # LeakyReLU after the vision projections (the scripts: off)
    surgery_from: Optional[int] = None         # the stage-1 teacher's V-V attention from this layer on (6 of 24)
    teacher_vv_axis: str = "tokens"            # "tokens" (an image's tokens) or "batch" (the reference's literal code)
    class_names: str = "readable"              # "readable" or "aaclip_real_names" (the reference's descriptions)
    domain: str = "industrial"                 # "industrial" or "medical": the blur and the image score
    image_score: str = "fixed"                 # "fixed" (per image) or "aaclip_minmax_fusion" (transductive)
    text_norm_weight: float = 0.1
    stage1_last_layer_only: bool = False       # the reference's overwritten loss: only layer 24 trains the text
    text_lr: float = 1e-5
    text_batch_size: int = 16
    text_epoch_fraction: float = 0.25          # the text stage runs this share of the image stage's epochs (5/20)
    milestones: Tuple[int, ...] = (16000, 32000)
    gamma: float = 0.5

    def __post_init__(self):
        if self.levels is not None:
            self.levels = tuple(int(k) for k in self.levels)
        self.milestones = tuple(int(m) for m in self.milestones)
        if self.teacher_vv_axis not in ("tokens", "batch"):
            raise ValueError(f"teacher_vv_axis must be 'tokens' or 'batch', got {self.teacher_vv_axis!r}")
        if self.class_names not in ("readable", "aaclip_real_names"):
            raise ValueError(f"class_names must be 'readable' or 'aaclip_real_names', got {self.class_names!r}")
        if self.domain not in BLUR:
            raise ValueError(f"domain must be 'industrial' or 'medical', got {self.domain!r}")
        if self.image_score not in ("fixed", "aaclip_minmax_fusion"):
            raise ValueError(f"image_score must be 'fixed' or 'aaclip_minmax_fusion', got {self.image_score!r}")


class Adapter(nn.Module):
    """A bias-free Linear + LeakyReLU whose output is rescaled to each token's norm and mixed in."""

    def __init__(self, width: int, weight: float):
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.leaky_relu(self.fc(x))
        a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
        return self.weight * a + (1 - self.weight) * x


def reflect_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """kornia's ``gaussian_blur2d`` with reflect borders: (B, 1, H, W), a separable normalised kernel."""
    t = torch.arange(kernel, dtype=torch.float64) - kernel // 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype).to(x.device)
    r = kernel // 2
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))
    return F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))


@register
class AACLIP(Method):
    name = "aaclip"
    config_class = AACLIPConfig
    published_name = "AA-CLIP"
    paper = "Ma et al., AA-CLIP: Enhancing Zero-shot Anomaly Detection via Anomaly-Aware CLIP, CVPR 2025"
    reference = "github.com/Mwxinnn/AA-CLIP (Apache-2.0)"
    learns = "residual adapters (text blocks 1-3, vision blocks 1-6) and new text and vision projections"
    train_defaults = dict(epochs=20, batch_size=2, lr=5e-4, betas=(0.5, 0.999), optimizer="adam", aug_rate=0.0)

    def __init__(self, cfg: Optional[AACLIPConfig] = None, clip=None, device: Optional[str] = None):
        super().__init__(cfg if cfg is not None else AACLIPConfig(), clip, device)
        cfg, visual = self.cfg, self.clip.visual
        n_vis, n_txt = len(visual.transformer.resblocks), len(self.clip.transformer.resblocks)
        cfg.text_adapt_until = cfg.text_adapt_until or min(3, n_txt)          # recorded: 3 / 6 / 6 for ViT-L-14
        cfg.image_adapt_until = cfg.image_adapt_until or max(1, n_vis // 4)
        cfg.surgery_from = cfg.surgery_from or max(1, n_vis // 4)
        if cfg.text_adapt_until > n_txt or cfg.image_adapt_until > n_vis:
            raise ValueError(f"adapters after text blocks 1..{cfg.text_adapt_until} and vision blocks "
                             f"1..{cfg.image_adapt_until} do not fit {cfg.backbone.name} ({n_txt} text, {n_vis} vision blocks)")
        self.levels = cfg.levels or default_out_layers(n_vis)
        width, text_width = visual.transformer.width, self.clip.transformer.width
        w = cfg.adapt_weight
        self.text_adapters = nn.ModuleList([Adapter(text_width, w) for _ in range(cfg.text_adapt_until)])
        self.text_proj = nn.Linear(text_width, text_width, bias=False)
        self.image_adapters = nn.ModuleList([Adapter(width, w) for _ in range(cfg.image_adapt_until)])
        self.seg_proj = nn.ModuleList([nn.Linear(width, text_width, bias=False) for _ in self.levels])
        self.det_proj = nn.Linear(width, text_width, bias=False)
        for p in self.learnable_parameters():
            nn.init.xavier_uniform_(p)
        self.tokenizer = open_clip.get_tokenizer(cfg.backbone.name)

    # ---------------------------------------------------------------- text
    def class_words(self, name: str) -> str:
        if self.cfg.class_names == "aaclip_real_names":
            return REAL_NAMES.get(name.lower(), class_text(name, "readable"))
        return class_text(name, "readable")

    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, D, 2): each sentence through the adapted text tower and the new projection, normalised,
        averaged per state, normalised again; computed once per distinct class name of the batch."""
        uniq = list(dict.fromkeys(class_names))
        feats = torch.stack([self._class_text(n) for n in uniq])                     # (G, D, 2)
        return feats[[uniq.index(c) for c in class_names]]

    def _class_text(self, name: str) -> torch.Tensor:
        normal, abnormal = sentences(self.class_words(name), NORMAL, ABNORMAL, TEMPLATES)
        tokens = self.tokenizer(normal + abnormal).to(self.device)                   # (S, T)

        def hook(i, x_in, x_out):
            return self.text_adapters[i](x_out) if i < len(self.text_adapters) else x_out

        x = encode_text(self.clip, tokens[None], block_hook=hook, project=False,
                        length=int(tokens.argmax(-1).max()) + 1)[0]                   # (S, Wt) after ln_final
        x = F.normalize(F.leaky_relu(self.text_proj(x)), dim=-1)
        pooled = [F.normalize(x[:len(normal)].mean(0), dim=-1), F.normalize(x[len(normal):].mean(0), dim=-1)]
        return torch.stack(pooled, dim=-1)                                            # (D, 2)

    # ---------------------------------------------------------------- vision
    def encode(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per tapped layer the normalised segmentation features (B, N, D), and the detection feature
        (B, D): a mean of unit vectors, not renormalised."""
        visual = self.clip.visual

        def hook(i, x_in, x_out):
            return self.image_adapters[i](x_out) if i < len(self.image_adapters) else x_out

        _, tokens = encode_image(visual, images, self.levels, block_hook=hook, checkpoint=self.checkpointing())
        tokens = [visual.ln_post(t) for t in tokens]                                  # (B, N, W) each
        act = F.leaky_relu if self.cfg.seg_relu else (lambda t: t)
        seg = [F.normalize(act(proj(t)), dim=-1) for proj, t in zip(self.seg_proj, tokens)]
        det = F.normalize(act(self.det_proj(tokens[-1])), dim=-1).mean(1)
        return seg, det

    @torch.no_grad()
    def teacher(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The stage-1 targets per tapped layer (B, N, D): the V-V "surgery" tower's patches through
        ln_post and CLIP's projection, normalised, plus CLIP's normalised class feature."""
        visual = self.clip.visual
        g = F.normalize(encode_image(visual, images, ())[0], dim=-1)                  # plain CLIP, (B, D)
        x = visual.ln_pre(visual.patch_dropout(embed_image(visual, images)))
        taps = []
        across_batch = self.cfg.teacher_vv_axis == "batch"
        for i, block in enumerate(visual.transformer.resblocks):
            if i + 1 >= self.cfg.surgery_from:                                       # in-stream V-V, MLP kept
                x = run_block_with_attention(block, x, lambda h, b=block: (
                    side_attention(b, h.transpose(0, 1), ("vv",)).transpose(0, 1) if across_batch
                    else side_attention(b, h, ("vv",))))
            else:
                x = run_block(block, x)
            if i + 1 in self.levels:
                taps.append(x[:, 1:])
        return [F.normalize(visual.ln_post(t) @ visual.proj, dim=-1) + g[:, None] for t in taps]

    # ---------------------------------------------------------------- maps and scores
    def layer_maps_raw(self, seg: Sequence[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """Per layer the reference's test map (B, S, S): ((100 s)_abn + 1 - (100 s)_norm) / 2 on the raw
        scores, blurred on the patch grid, upsampled bilinearly with align_corners=True."""
        kernel, sigma = BLUR[self.cfg.domain]
        out = []
        for f in seg:
            s = 100.0 * torch.einsum("bnd,bdc->bnc", f.float(), text)                # (B, N, 2)
            B, N, _ = s.shape
            g = int(round(N ** 0.5))
            m = ((s[..., 1] + 1 - s[..., 0]) / 2).reshape(B, 1, g, g)
            m = reflect_blur(m, kernel, sigma)
            out.append(F.interpolate(m, size=(self.image_size,) * 2, mode="bilinear", align_corners=True)[:, 0])
        return out

    def forward(self, images: torch.Tensor, class_names: Union[str, Sequence[str]], return_tokens: bool = False,
                text_features: Optional[torch.Tensor] = None, return_details: bool = False,
                return_layer_maps: bool = False, targets: Optional[Targets] = None) -> MethodOutput:
        class_names = self.check_inputs(images, class_names)
        if targets is not None and targets.stage == "text":
            return self._text_stage(images, class_names, targets)
        with torch.no_grad() if targets is not None else contextlib.nullcontext():   # image stage: anchors fixed
            text = self.text_features(class_names) if text_features is None else text_features
        seg, det = self.encode(images)
        L = len(seg)
        with full_precision(images.device):
            text = text.float()
            raw = torch.stack(self.layer_maps_raw(seg, text)).sum(0)                # (B, S, S), the reference's map
            pixel = (raw + 99.5 * L) / (200.0 * L)                                   # its bounds -> [0, 1]
            det_score = (torch.einsum("bd,bd->b", det.float(), text[..., 1]) + 1) / 2
            prob = torch.sigmoid((2 * raw - L) / L)                                  # mean-logit probability
            top = prob.flatten(1).max(dim=1).values
            score = top if self.cfg.domain == "medical" else 0.5 * top + 0.5 * det_score
        out = MethodOutput(score, pixel, torch.stack([1 - det_score, det_score], dim=1))
        if self.transductive:
            out.score_parts = torch.stack([det_score, raw.flatten(1).max(1).values, raw.flatten(1).min(1).values], 1)
        if return_details:
            out.details = {"raw_pixel_scores": pixel}
        if targets is not None:
            out.loss, out.loss_parts = self._image_stage_loss(seg, det, text, targets)
        return out

    def _image_stage_loss(self, seg, det, text, targets: Targets):
        """CE(<det, T>, y) without temperature + Σ layers focal + Dice(normal, 1 - m) + Dice(abnormal, m)."""
        image = F.cross_entropy(torch.einsum("bd,bdc->bc", det.float(), text), targets.labels.long())
        segmentation = self._seg_loss(seg, text, targets)
        return image + segmentation, {"image_focal": float(image.detach()), "segmentation": float(segmentation.detach())}

    def _seg_loss(self, features, text, targets: Targets, layers: Optional[Sequence[int]] = None) -> torch.Tensor:
        has = targets.has_mask
        total = torch.zeros((), device=text.device)
        if bool(has.any()):
            m = targets.masks[has]
            for k, f in enumerate(features):
                if layers is not None and k not in layers:
                    continue
                logits = 100.0 * torch.einsum("bnd,bdc->bnc", f[has].float(), text[has])
                B, N, _ = logits.shape
                g = int(round(N ** 0.5))
                up = F.interpolate(logits.transpose(1, 2).reshape(B, 2, g, g), size=(self.image_size,) * 2,
                                   mode="bilinear", align_corners=True)
                P = torch.softmax(up, dim=1)
                total = total + focal_loss(P, m) + dice_loss(P[:, 0], 1 - m, targets.dice) + dice_loss(P[:, 1], m, targets.dice)
        return total

    def _text_stage(self, images, class_names, targets: Targets) -> MethodOutput:
        """Stage 1: the text adapters against the surgery teacher's features."""
        text = self.text_features(class_names).float()                               # (B, D, 2), with grad
        features = self.teacher(images)
        layers = [len(features) - 1] if self.cfg.stage1_last_layer_only else None
        seg = self._seg_loss(features, text, targets, layers)
        orthogonal = (text[:, :, 0] * text[:, :, 1]).sum(1).mean() ** 2
        loss = seg + self.cfg.text_norm_weight * orthogonal
        zeros = torch.zeros(images.shape[0], device=images.device)
        return MethodOutput(zeros, torch.zeros(images.shape[0], self.image_size, self.image_size, device=images.device),
                            loss=loss, loss_parts={"image_focal": float(orthogonal.detach()), "segmentation": float(seg.detach())})

    def training_stages(self, cfg) -> list[Stage]:
        """The text stage (adapters and projection of the text tower), then the image stage."""
        text = [*self.text_adapters.parameters(), *self.text_proj.parameters()]
        image = [*self.image_adapters.parameters(), *self.seg_proj.parameters(), *self.det_proj.parameters()]
        c = self.cfg
        text_epochs = max(1, math.ceil(cfg.epochs * c.text_epoch_fraction))
        return [Stage("text", text, text_epochs, c.text_batch_size, c.text_lr, tuple(cfg.betas), cfg.optimizer),
                Stage("image", image, cfg.epochs, cfg.batch_size, cfg.lr, tuple(cfg.betas), cfg.optimizer,
                      c.milestones, c.gamma)]

    # ---------------------------------------------------------------- transductive score
    @property
    def transductive(self) -> bool:
        return self.cfg.image_score == "aaclip_minmax_fusion"

    def finalize_scores(self, parts: np.ndarray) -> np.ndarray:
        """The reference's score over a category's test images: the maps' maxima min-max normalised by
        all the maps' range, the detection scores min-max normalised, averaged (medical: the maps')."""
        s, top, low = parts[:, 0], parts[:, 1], parts[:, 2]
        span = top.max() - low.min()
        m = (top - low.min()) / span if span > 0 else np.zeros_like(top)
        if self.cfg.domain == "medical":
            return m
        s_span = s.max() - s.min()
        return 0.5 * m + 0.5 * ((s - s.min()) / s_span if s_span > 0 else np.zeros_like(s))

    # ---------------------------------------------------------------- files its training writes
    def load_official_checkpoint(self, path: PathLike) -> "AACLIP":
        """A folder with the reference's ``text_adapter.pth`` and ``image_adapter.pth`` (or one
        ``image_adapter_<epoch>.pth``); the reference releases none."""
        folder = Path(path)
        images = sorted(folder.glob("image_adapter*.pth")) if folder.is_dir() else []
        if not folder.is_dir() or not (folder / "text_adapter.pth").is_file() or not images:
            raise checkpoint.CheckpointError(f"{path}: expected a folder with text_adapter.pth and image_adapter.pth "
                                             f"(what AA-CLIP's train.py writes)")
        image_file = folder / "image_adapter.pth" if (folder / "image_adapter.pth").is_file() else images[-1]
        text = checkpoint.read(folder / "text_adapter.pth")["text_adapter"]
        image = checkpoint.read(image_file)["image_adapter"]
        state = {}
        for i in range(len(self.text_adapters)):
            state[f"text_adapters.{i}.fc.weight"] = text[f"{i}.fc.0.weight"]
        state["text_proj.weight"] = text[f"{len(self.text_adapters)}.fc.0.weight"]
        for i in range(len(self.image_adapters)):
            state[f"image_adapters.{i}.fc.weight"] = image[f"layer_adapters.{i}.fc.0.weight"]
        for key, value in image.items():
            for prefix, ours in (("seg_proj.", "seg_proj."), ("det_proj.", "det_proj.")):
                if key.startswith(prefix):
                    rest = key[len(prefix):].replace("fc.0.", "fc.").replace("fc.", "")
                    state[ours + rest] = value
        checkpoint.load_state(self, {k: v.float().cpu() for k, v in state.items()}, path)
        return self

