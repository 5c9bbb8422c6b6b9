"""WinCLIP (Jeong et al., CVPR 2023, arXiv 2303.14814): window-level zero-/few-shot anomaly detection.

No official code exists; APRILGAN_WINCLIP_SPEC.md Part 2 describes what both re-implementations
(zqhang/Accurate-WinCLIP-pytorch, MIT; open-edge-platform/anomalib's ``winclip``, Apache-2.0) compute,
followed here:

- open_clip ViT-B-16-plus-240 with ``laion400m_e31`` weights at 240 px (grid 15), its own activation;
- text: 7 normal and 4 anomalous states in 21 templates; sentence features averaged **without**
  normalising each (both re-implementations); ``templates="reference"`` keeps their duplicated
  template, the default replaces it by the missing one;
- a class score is softmax(cos(feature, T) / 0.07)[anomalous]; the image score z0 is the full
  image's class token's;
- windows of 2x2 and 3x3 patches, stride 1: each window's feature is the class token of an encoder
  pass over [class token, the window's patch tokens] with their positional embeddings (no pixel or
  attention mask in the image: the tokens are dropped, MAE-style). All windows of all images of a
  batch run in one packed pass: the 2x2 windows are padded to the 3x3 length and their padding is
  masked out of attention;
- per scale the window scores are aggregated harmonically onto the patches they cover,
  H(p) = n(p) / sum_{w covers p} 1/s_w (an incidence-matrix product, not a loop); the map is the harmonic
  mean of z0 and the scales' H, upsampled bilinearly (``align_corners=False``), unsmoothed;
- WinCLIP+ (few-shot): per category a memory of the references' window features per scale and patch
  tokens (with ``ln_post`` as anomalib; ``few_shot_patch_tokens="raw"`` as zqhang); each query item
  scores v = 0.5 · min(1 - cos); the few-shot map F is the mean of the patch scores and the scales'
  harmonic aggregations; the map is (Z + F) / 2 (anomalib; zqhang's Z + F ranks the same), the image
  score 0.5 · (z0 + max F).

Training-free. Cost: `adaclip benchmark --method winclip` sets it beside a bare forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..backbone import config_quick_gelu, embed_image, pool, run_block, weights_quick_gelu
from ..config import BackboneCfg, ConfigBase
from .base import Method, MethodOutput, Targets, full_precision, replace
from .ensembles import NORMAL_STATES, WINCLIP_ABNORMAL_STATES, class_text, sentences, winclip_templates
from .registry import register
from .shared import StateEnsemble


@dataclass
class WinCLIPConfig(ConfigBase):
    backbone: BackboneCfg = field(default_factory=lambda: BackboneCfg(
        name="ViT-B-16-plus-240", pretrained="laion400m_e31", image_size=240))
    scales: Tuple[int, ...] = (2, 3)       # window sides in patches, stride 1
    temperature: float = 0.07              # both re-implementations (CLIP's initial one)
    text_norm: str = "mean"                # "mean": the raw sentence features averaged; "per_sentence": CLIP-style
    templates: str = "distinct"            # "distinct" or "reference" (keeps the duplicated template)
    class_names: str = "readable"          # "readable" or "verbatim" (the references)
    few_shot_patch_tokens: str = "ln_post"  # "ln_post" (anomalib) or "raw" (zqhang)

    def __post_init__(self):
        self.scales = tuple(int(k) for k in self.scales)
        winclip_templates(self.templates)
        class_text("x", self.class_names)
        if self.text_norm not in ("mean", "per_sentence"):
            raise ValueError(f"text_norm must be 'mean' or 'per_sentence', got {self.text_norm!r}")
        if self.few_shot_patch_tokens not in ("ln_post", "raw"):
            raise ValueError(f"few_shot_patch_tokens must be 'ln_post' or 'raw', got {self.few_shot_patch_tokens!r}")
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"scales must be window sides >= 1, got {self.scales}")


def window_indices(grid: int, k: int) -> torch.Tensor:
    """(n_win, k²) 0-based patch indices of every k x k window at stride 1 on a grid x grid patch grid."""
    g = torch.arange(grid * grid).reshape(1, 1, grid, grid).float()
    return F.unfold(g, kernel_size=k, stride=1)[0].T.long()           # (n_win, k²)


@register
class WinCLIP(Method):
    name = "winclip"
    config_class = WinCLIPConfig
    published_name = "WinCLIP"
    paper = "Jeong et al., WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation, CVPR 2023"
    reference = ("no official code; zqhang/Accurate-WinCLIP-pytorch (MIT) and "
                 "open-edge-platform/anomalib models/image/winclip (Apache-2.0)")
    learns = "nothing"
    supports_few_shot = True

    def __init__(self, cfg: Optional[WinCLIPConfig] = None, clip=None, device: Optional[str] = None):
        super().__init__(cfg if cfg is not None else WinCLIPConfig(), clip, device)
        cfg = self.cfg
        if max(cfg.scales) > self.grid:
            raise ValueError(f"window scales {cfg.scales} exceed the {self.grid}x{self.grid} patch grid")
        windows = [window_indices(self.grid, k) for k in cfg.scales]
        self.length = 1 + max(k * k for k in cfg.scales)                 # the packed sequence length
        # every window of every scale as one padded row of patch indices (-1: padding), and its mask
        rows = torch.full((sum(len(w) for w in windows), self.length - 1), -1, dtype=torch.long)
        start, self.spans = 0, []
        for w in windows:
            rows[start:start + len(w), :w.shape[1]] = w
            self.spans.append((start, start + len(w)))
            start += len(w)
        self.register_buffer("window_rows", rows, persistent=False)
        # incidence per scale (N, n_win): 1 where the patch lies in the window
        for i, w in enumerate(windows):
            self.register_buffer(f"incidence_{i}", torch.zeros(self.grid ** 2, len(w)).scatter_(0, w.T, 1.0),
                                 persistent=False)
        mode, normal = cfg.class_names, NORMAL_STATES
        templates = winclip_templates(cfg.templates)
        self.text = StateEnsemble(self.clip, cfg.backbone.name, lambda c: sentences(
            class_text(c, mode), normal, WINCLIP_ABNORMAL_STATES, templates), normalize_each=cfg.text_norm != "mean")

    @classmethod
    def default_quick_gelu(cls, cfg) -> bool:
        return weights_quick_gelu(cfg.backbone, default=config_quick_gelu(cfg.backbone.name))

    def _incidence(self, i: int) -> torch.Tensor:
        return getattr(self, f"incidence_{i}")

    # ---------------------------------------------------------------- passes
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The full image's pooled feature (B, D) and last-block tokens (B, 1+N, W), and per scale the
        window features (B, n_win, D)."""
        visual = self.clip.visual
        x = visual.ln_pre(visual.patch_dropout(embed_image(visual, images)))     # (B, 1+N, W); ln_pre is per token
        full = x
        for block in visual.transformer.resblocks:
            full = run_block(block, full)
        B, W = x.shape[0], x.shape[-1]
        rows = self.window_rows                                                   # (R, L-1), -1 = padding
        valid = rows >= 0
        gathered = x[:, 1:][:, rows.clamp(min=0)] * valid[None, :, :, None]       # (B, R, L-1, W)
        seq = torch.cat([x[:, :1, None].expand(B, rows.shape[0], 1, W), gathered], dim=2)   # (B, R, L, W)
        seq = seq.reshape(-1, self.length, W)
        # padded keys are masked out of every window's attention
        keep = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)          # (R, L)
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, float("-inf"))
        heads = visual.transformer.resblocks[0].attn.num_heads
        mask = mask[None, :, None, :].expand(B, -1, self.length, -1).reshape(-1, self.length, self.length)
        mask = mask.repeat_interleave(heads, dim=0)                               # (B·R·heads, L, L)
        for block in visual.transformer.resblocks:
            seq = run_block(block, seq, attn_mask=mask)
        windows = pool(visual, seq).reshape(B, rows.shape[0], -1)                 # (B, R, D)
        return pool(visual, full), full, [windows[:, a:b] for a, b in self.spans]

    def class_scores(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """softmax(cos / τ)[anomalous]: features (B, ..., D), text (B, D, 2) -> (B, ...)."""
        f = F.normalize(features.float(), dim=-1)
        t = F.normalize(text.float(), dim=1)
        logits = torch.einsum("b...d,bdc->b...c", f, t) / self.cfg.temperature
        return torch.softmax(logits, dim=-1)[..., 1]

    def harmonic(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale: window scores (B, n_win) -> patch scores (B, N), n(p) / Σ_{w ∋ p} 1 / s_w. Only the
        windows covering p enter the sum, so a score of exactly 0 (a query window equal to a memory
        window) gives 0 at its patches, as both references' loops do, not 0 · inf = NaN elsewhere."""
        out = []
        for i, s in enumerate(scores):
            covers = self._incidence(i) > 0                                       # (N, n_win)
            inverse = torch.where(covers, 1.0 / s[:, None, :], torch.zeros((), dtype=s.dtype, device=s.device))
            out.append(covers.sum(1) / inverse.sum(-1))                           # (B, N)
        return out

    def upsample(self, grid_map: torch.Tensor) -> torch.Tensor:
        """(B, N) patch scores -> (B, S, S), bilinear with align_corners=False (both references)."""
        B = grid_map.shape[0]
        x = grid_map.reshape(B, 1, self.grid, self.grid)
        return F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)[:, 0]

    def forward(self, images: torch.Tensor, class_names: Union[str, Sequence[str]], return_tokens: bool = False,
                text_features: Optional[torch.Tensor] = None, return_details: bool = False,
                return_layer_maps: bool = False, targets: Optional[Targets] = None) -> MethodOutput:
        class_names = self.check_inputs(images, class_names)
        if targets is not None:
            raise ValueError("WinCLIP is training-free: it has no training loss")
        with torch.no_grad():
            image_feature, full, windows = self.encode(images)
        text = self.text(class_names) if text_features is None else text_features            # (B, D, 2)
        with full_precision(images.device):
            z0 = self.class_scores(image_feature, text)                                       # (B,)
            scales = self.harmonic([self.class_scores(w, text) for w in windows])             # per scale (B, N)
            terms = torch.stack([z0[:, None].expand_as(scales[0]), *scales])                  # (1 + scales, B, N)
            zero_shot = terms.shape[0] / (1.0 / terms).sum(0)                                 # harmonic mean (B, N)
            pixel = self.upsample(zero_shot)
        out = MethodOutput(z0, pixel, torch.stack([1 - z0, z0], dim=1))
        if return_tokens or return_details:
            tokens = full[:, 1:]
            if self.cfg.few_shot_patch_tokens == "ln_post":
                tokens = self.clip.visual.ln_post(tokens)
            out.patch_tokens = [tokens]                                                       # (B, N, W)
            out.details = {"window_features": windows, "zero_shot_grid": zero_shot,
                           "scale_maps": [self.upsample(s) for s in scales]}
        return out

    def few_shot_memory(self) -> "WinCLIPMemory":
        return WinCLIPMemory(self)


class WinCLIPMemory:
    """WinCLIP+'s reference memory per category: window features per scale and patch tokens."""

    def __init__(self, model: WinCLIP):
        self.model = model
        self.banks: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}   # key -> (per scale (k·n, D), (k·N, W))

    @torch.no_grad()
    def add(self, key: str, images: torch.Tensor, class_name: str) -> None:
        out = self.model(images.to(self.model.device), class_name, return_tokens=True)
        windows = [F.normalize(w.float(), dim=-1).reshape(-1, w.shape[-1]) for w in out.details["window_features"]]
        patches = F.normalize(out.patch_tokens[0].float(), dim=-1).reshape(-1, out.patch_tokens[0].shape[-1])
        self.banks[key] = (windows, patches)

    @staticmethod
    def association(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """v = 0.5 · min over the memory of (1 - cos): queries (n, C) -> (n,); clipped at 0, since a
        query equal to a memory item gives 1 - cos a hair below 0 in float32, and the harmonic sums
        of ±tiny inverses would cancel to n / 0."""
        return (0.5 * (1 - (F.normalize(queries.float(), dim=-1) @ bank.T).max(dim=-1).values)).clamp(min=0)

    def apply(self, out: MethodOutput, keys: Sequence[str]) -> MethodOutput:
        if out.details is None or out.patch_tokens is None:
            raise ValueError("few-shot scoring needs the window features: call the model with return_tokens=True")
        model, few = self.model, []
        for b, key in enumerate(keys):
            if key not in self.banks:
                raise KeyError(f"no few-shot references for {key!r}; add them first")
            windows, patches = self.banks[key]
            v_patch = self.association(out.patch_tokens[0][b], patches)                     # (N,)
            v_scales = model.harmonic([self.association(w[b], bank)[None]
                                       for w, bank in zip(out.details["window_features"], windows)])
            few.append(torch.stack([v_patch, *[v[0] for v in v_scales]]).mean(0))           # (N,)
        few = torch.stack(few)                                                               # (B, N)
        grid = (out.details["zero_shot_grid"] + few) / 2
        score = 0.5 * (out.image_scores + few.max(dim=1).values)
        return replace(out, image_scores=score, pixel_scores=model.upsample(grid))
