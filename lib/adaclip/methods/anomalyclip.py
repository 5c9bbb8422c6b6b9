"""AnomalyCLIP (Zhou et al., ICLR 2024, arXiv 2310.18961): object-agnostic prompts and a V-V side path.

Reference code: github zqhang/AnomalyCLIP (MIT, "Copyright (c) 2024 Qihang Zhou"); what it computes,
quirk by quirk, is ANOMALYCLIP_CRANE_AACLIP_SPEC.md section 1, followed here:

- the frozen OpenAI ViT-L-14-336 at 518 px with **QuickGELU** (it vendors OpenAI's CLIP code) and its
  positional embedding resized **bilinearly** (``pos_embed_interp="bilinear"``);
- text: two sentences without a class name, "X x12 object." and "X x12 damaged object.", whose 12 "X"
  embeddings are learned per sentence (``ctx``), and deep text prompts of length 4 that overwrite
  positions 1..4 before text blocks 1..8 (``deep``); 43,008 learned values;
- vision: the CLIP stream is unchanged; beside blocks 6..24 runs the "DPAM" side path
  v_k = v_{k-1} + VV_k(ln_1(h_{k-1})), v_5 = h_5, where VV is softmax(V Vᵀ / 8) V from the block's own
  weights and output projection (no MLP); the map comes from the layer-24 side tokens (the released
  prompts and every published number: ``layers=(24,)``; ``layers=(6, 12, 18, 24)`` is the true
  multi-layer variant, ``alias_layers=True`` the historical one where all four equal layer 24);
- per layer: ln_post, projection, normalise, logits / 0.07, softmax at patch resolution, the
  probabilities upsampled bilinearly (``align_corners=False``), p_abnormal summed over the layers (divided
  by their number here, so the map stays in [0, 1]), Gaussian sigma 4;
- image score: softmax(<g, T> / 0.07)[abnormal] with g the layer-24 class token through the projection
  **without** ``ln_post`` as the reference computes it (``global_ln_post=False``; True is standard CLIP);
- training: CE on the image score + 4 x [focal + Dice (abnormal) + Dice (normal)] on the map, Adam
  lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, on the auxiliary dataset's annotated test split.

Release files (``checkpoints/9_12_4_multiscale/epoch_15.pth``, trained on VisA; ``..._visa/`` on MVTec
AD): ``{"prompt_learner": {...}}``; ``ctx_pos``/``ctx_neg`` -> ``ctx[0]``/``ctx[1]``,
``compound_prompts_text.i`` -> ``deep.i``; the unused ``compound_prompt_projections`` and the frozen
token buffers are not learned here and are skipped (the token ids are checked against ours).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import encode_image, encode_text, side_attention
from ..config import BackboneCfg, ConfigBase
from . import checkpoint
from .base import Method, MethodOutput, PathLike, Targets, full_precision
from .losses import dice_loss, focal_loss
from .registry import register
from .shared import gaussian_blur

SENTENCES = ("X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object.")   # normal, abnormal


@dataclass
class AnomalyCLIPConfig(ConfigBase):
    backbone: BackboneCfg = field(default_factory=lambda: BackboneCfg(pos_embed_interp="bilinear"))
    n_ctx: int = 12                       # learned context vectors per sentence
    deep_length: int = 4                  # deep text prompt tokens
    # None below: the reference's choice for ViT-L-14 scaled to the backbone, fixed when the model is built
    deep_depth: Optional[int] = None      # deep prompts before text blocks 1..depth-1 (9 of 12 text blocks)
    side_from: Optional[int] = None       # the side path beside layers side_from..last (6 of 24: a quarter)
    layers: Optional[Tuple[int, ...]] = None  # side-path layers the map uses (the last: 24; released prompts)
    alias_layers: bool = False            # the historical bug: every listed layer reads the last one
    global_ln_post: bool = False          # False: the image feature skips ln_post, as the reference
    temperature: float = 0.07
    seg_weight: float = 4.0               # the segmentation loss' weight (the authors' lam = 4)
    smoothing_sigma: float = 4.0
    round_prompts_fp16: bool = False      # the reference casts its deep prompts with .half()

    def __post_init__(self):
        if self.layers is not None:
            self.layers = tuple(int(k) for k in self.layers)
            if not self.layers:
                raise ValueError("AnomalyCLIP needs at least one side-path layer")


@register
class AnomalyCLIP(Method):
    name = "anomalyclip"
    config_class = AnomalyCLIPConfig
    published_name = "AnomalyCLIP"
    paper = "Zhou et al., AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection, ICLR 2024"
    reference = "github.com/zqhang/AnomalyCLIP (MIT)"
    learns = "two object-agnostic context sentences (12 x 768 each) and deep text prompts (8 x 4 x 768)"
    train_defaults = dict(epochs=15, batch_size=8, lr=1e-3, betas=(0.5, 0.999), optimizer="adam", aug_rate=0.0)
    side_kinds: Tuple[str, ...] = ("vv",)         # the side path's self-correlation (Crane: qq + kk + vv)

    def __init__(self, cfg: Optional[AnomalyCLIPConfig] = None, clip=None, device: Optional[str] = None):
        super().__init__(cfg if cfg is not None else self.config_class(), clip, device)
        cfg = self.cfg
        n_vis, n_txt = len(self.clip.visual.transformer.resblocks), len(self.clip.transformer.resblocks)
        # resolved here, so that every config written records them: 24 / 6 / 9 for ViT-L-14
        cfg.layers = cfg.layers or (n_vis,)
        cfg.side_from = cfg.side_from or max(1, n_vis // 4)
        cfg.deep_depth = cfg.deep_depth or min(9, n_txt)
        if not all(cfg.side_from <= k <= n_vis for k in cfg.layers):
            raise ValueError(f"layers {cfg.layers} must lie in {cfg.side_from}..{n_vis} (the side path)")
        if cfg.deep_depth > n_txt:
            raise ValueError(f"deep prompt depth {cfg.deep_depth} exceeds the text tower's {n_txt} blocks")
        self.build_text_prompts(self.clip.transformer.width)

    def build_text_prompts(self, width: int) -> None:
        """The learned contexts (``ctx``), the deep text prompts (``deep``) and the sentences' token ids."""
        cfg = self.cfg
        self.ctx = nn.Parameter(torch.empty(2, cfg.n_ctx, width).normal_(std=0.02))   # [normal, abnormal]
        self.deep = nn.ParameterList([nn.Parameter(torch.empty(cfg.deep_length, width).normal_(std=0.02))
                                      for _ in range(cfg.deep_depth - 1)])
        tokens = open_clip.get_tokenizer(cfg.backbone.name)(list(self.sentences()))
        self.register_buffer("tokens", tokens, persistent=False)                          # (sentences, T)

    @classmethod
    def default_quick_gelu(cls, cfg) -> bool:
        return True                                       # it vendors OpenAI's CLIP code

    def sentences(self) -> tuple[str, str]:
        n = self.cfg.n_ctx
        return tuple(s.replace("X X X X X X X X X X X X", " ".join(["X"] * n)) for s in SENTENCES)

    # ---------------------------------------------------------------- text
    def prompt_embeddings(self, image_tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings (G, 2, T, Wt) and token ids (G, 2, T): SOT, the learned contexts, the frozen
        rest; G = 1 (Crane inserts a per-image token and shifts the rest, `image_tokens`)."""
        emb = self.clip.token_embedding(self.tokens)                                      # (2, T, Wt)
        n = self.cfg.n_ctx
        emb = torch.cat([emb[:, :1], self.ctx.to(emb.dtype), emb[:, 1 + n:]], dim=1)
        return emb[None], self.tokens[None]

    def deep_prompts(self) -> list[torch.Tensor]:
        """Per text block 0..depth-1 the prompt overwriting positions 1..L (block 0: none, a placeholder)."""
        deep = [p.half().to(p.dtype) if self.cfg.round_prompts_fp16 else p for p in self.deep]
        return [torch.zeros_like(deep[0]), *deep] if deep else []

    def text_features(self, class_names: Sequence[str] = (), image_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(G, D, 2) normalised [normal, abnormal] features (one column per sentence); no class name
        enters the sentences."""
        emb, tokens = self.prompt_embeddings(image_tokens)
        prompts = [p[None] for p in self.deep_prompts()] or None
        feats = encode_text(self.clip, tokens, prompts, embeddings=emb, length=int(tokens.argmax(-1).max()) + 1)
        return F.normalize(feats, dim=-1).transpose(1, 2)                                # (G, D, 2)

    # ---------------------------------------------------------------- vision
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The image feature (B, D) and the side path's patch features per used layer (B, N, D),
        normalised."""
        visual, cfg = self.clip.visual, self.cfg
        side: dict = {}
        taps: dict = {}

        def hook(i: int, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
            if i + 1 >= cfg.side_from:                    # layers side_from..: v_k = v_{k-1} + side(ln_1(h_{k-1}))
                v = side.get("v", x_in)
                side["v"] = v + side_attention(block_of(i), block_of(i).ln_1(x_in), self.side_kinds)
                if i + 1 in cfg.layers:
                    taps[i + 1] = side["v"]
            if i + 1 == len(visual.transformer.resblocks):
                side["h"] = x_out
            return x_out

        block_of = visual.transformer.resblocks.__getitem__
        with torch.no_grad():
            encode_image(visual, images, (), block_hook=hook)
            h = side["h"]
            g = visual.ln_post(h[:, 0]) if cfg.global_ln_post else h[:, 0]
            g = g @ visual.proj                                                           # (B, D)
            last = max(cfg.layers)
            tokens = [taps[last] if cfg.alias_layers else taps[k] for k in cfg.layers]     # (B, 1+N, W) each
            patches = [F.normalize(visual.ln_post(t[:, 1:]) @ visual.proj, dim=-1) for t in tokens]
        return F.normalize(g, dim=-1), patches

    def layer_probs(self, patches: Sequence[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """Per layer: softmax over [normal, abnormal] at patch resolution, (B, 2, G, G)."""
        B, N, _ = patches[0].shape
        g = int(round(N ** 0.5))
        return [torch.softmax(torch.einsum("bnd,bdc->bnc", P.float(), text) / self.cfg.temperature, dim=-1)
                .transpose(1, 2).reshape(B, 2, g, g) for P in patches]

    def upsample(self, probs: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        size = (self.image_size, self.image_size)
        if mode == "nearest":
            return F.interpolate(probs, size=size, mode="nearest")
        return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)

    def image_probs(self, feature: torch.Tensor, patches, probs, text: torch.Tensor, temperature: float) -> torch.Tensor:
        """(B, 2) from the image feature against the text (Crane pools patches into it first)."""
        return torch.softmax(torch.einsum("bd,bdc->bc", feature.float(), text) / temperature, dim=-1)

    def forward(self, images: torch.Tensor, class_names: Union[str, Sequence[str]], return_tokens: bool = False,
                text_features: Optional[torch.Tensor] = None, return_details: bool = False,
                return_layer_maps: bool = False, targets: Optional[Targets] = None) -> MethodOutput:
        self.check_inputs(images, class_names)
        feature, patches = self.encode(images)
        text = self.forward_text(feature, targets) if text_features is None else text_features
        text = text.expand(images.shape[0], -1, -1) if text.shape[0] == 1 else text
        with full_precision(images.device):
            text = text.float()
            map_text, score_text = self.split_text(text)
            probs = self.layer_probs(patches, map_text)                                  # (B, 2, G, G) each
            maps = [self.upsample(p) for p in probs]                                     # (B, 2, S, S) each
            raw = torch.stack([m[:, 1] for m in maps]).mean(0)                           # (B, S, S)
            pixel = gaussian_blur(raw, self.cfg.smoothing_sigma)
            image = self.image_probs(feature, patches, probs, score_text, self.cfg.temperature)
        out = MethodOutput(image[:, 1], pixel, image, maps if return_layer_maps else None,
                           patches if return_tokens else None,
                           {"raw_pixel_scores": raw} if return_details else None)
        if targets is not None:
            out.loss, out.loss_parts = self.loss(feature, patches, probs, text, targets)
        return out

    def forward_text(self, feature: torch.Tensor, targets: Optional[Targets]) -> torch.Tensor:
        """The text features a forward uses: static for AnomalyCLIP (one pair for every image)."""
        return self.text_features()

    def split_text(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the [normal, abnormal] pair that makes the map, the pair that scores the image): one pair
        for both here (GlocalCLIP has a local and a global one)."""
        return text, text

    def loss(self, feature, patches, probs, text, targets: Targets):
        """CE(<g, T> / 0.07, y) + seg_weight x Σ layers [focal + Dice(abnormal, m) + Dice(normal, 1 - m)]."""
        logits = torch.einsum("bd,bdc->bc", feature.float(), self.split_text(text)[1]) / self.cfg.temperature
        image = F.cross_entropy(logits, targets.labels.long())
        has = targets.has_mask
        seg = torch.zeros((), device=image.device)
        if bool(has.any()):
            m = targets.masks[has]
            for p in probs:
                M = self.upsample(p[has])
                seg = seg + focal_loss(M, m) + dice_loss(M[:, 1], m, targets.dice) + dice_loss(M[:, 0], 1 - m, targets.dice)
        loss = image + self.cfg.seg_weight * seg
        return loss, {"image_focal": float(image.detach()), "segmentation": float(seg.detach())}

    # ---------------------------------------------------------------- official files
    def load_official_checkpoint(self, path: PathLike) -> "AnomalyCLIP":
        """``{"prompt_learner": {ctx_pos, ctx_neg, compound_prompts_text.i, ...}}``; buffers and the unused
        projection layers are skipped, the frozen token ids checked against ours."""
        obj = checkpoint.read(path)
        state = obj.get("prompt_learner") if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise checkpoint.CheckpointError(f"{path} is not an AnomalyCLIP-style release file: no 'prompt_learner'")
        for key, ours in (("tokenized_prompts_pos", self.tokens[0]), ("tokenized_prompts_neg", self.tokens[1])):
            if key in state and not torch.equal(state[key].reshape(-1)[:ours.numel()].long().cpu(), ours.long().cpu()):
                raise checkpoint.CheckpointError(f"{path}: {key} holds other sentences than ours ({self.sentences()})")
        mapped = {}
        for key, value in state.items():
            if key in ("ctx_pos", "ctx_neg"):
                continue
            if key.startswith("compound_prompts_text."):
                mapped[key.replace("compound_prompts_text.", "deep.")] = value
        if "ctx_pos" in state and "ctx_neg" in state:
            mapped["ctx"] = torch.cat([state["ctx_pos"].reshape(1, self.cfg.n_ctx, -1),
                                       state["ctx_neg"].reshape(1, self.cfg.n_ctx, -1)])
        checkpoint.load_state(self, {k: v.float().cpu() for k, v in mapped.items()}, path)
        self.trained_on = self.official_trained_on(Path(path))
        return self

    @staticmethod
    def official_trained_on(path: Path) -> Optional[str]:
        """The release folders are named the other way round (9_12_4_multiscale: trained on VisA)."""
        return {"9_12_4_multiscale": "visa", "9_12_4_multiscale_visa": "mvtec"}.get(path.parent.name)
