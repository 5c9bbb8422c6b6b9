"""GlocalCLIP (Ham, Jung, Baek, arXiv 2411.06071): AnomalyCLIP with a global and a local prompt pair.

Reference code: github YUL-git/GlocalCLIP (MIT, "Copyright (c) 2025 Jiyul Ham"); what it computes,
quirk by quirk, is GLOCALCLIP_SPEC.md, followed here on AnomalyCLIP's machinery (`anomalyclip.py`:
QuickGELU, bilinear positional embedding, the V-V side path beside layers 6..24, the image feature
without ``ln_post``):

- four learned sentences without a class name: global normal "G x n object.", global abnormal
  "G x n G x m damaged object.", and the same two with "L" (local); each abnormal sentence carries its
  branch's n normal contexts (shared, positions 1..n) plus m of its own (n+1..n+m); one set of deep
  text prompts (``deep``, positions 1..t overwritten before text blocks 1..depth-1) serves all four;
- the **global** pair scores the image: softmax(<g, T_g> / 0.07)[abnormal];
- the **local** pair makes the map: per layer softmax(P T_l / 0.07) at patch resolution, the
  probabilities upsampled bilinearly, p_abnormal, Gaussian sigma 8 (``train.sh``);
- training: CE on the global score + seg_weight x [focal + Dice(abnormal) + Dice(normal)] on the local
  maps + glocal_weight x the "glocal contrastive" term, ‖g_n - l_n + ε‖² + ‖g_a - l_a + ε‖² (ε = 1e-6,
  `torch.pairwise_distance`) plus, with a positive ``margin``, clamp(margin - d(g_n, l_a), 0)² +
  clamp(margin - d(g_a, l_n), 0)²; Adam lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs on the
  auxiliary dataset's annotated test split.

Lengths per auxiliary dataset (spec §8; ``prompt_setting``, recorded, the MVTec AD one by default, and
read from the shapes when a release-layout file is loaded): VisA-trained n 13, m 13, depth 9, t 4;
MVTec-trained 12, 13, 10, 2; CVC-ColonDB-trained 12, 12, 12, 4; CVC-ClinicDB-trained 12, 12, 9, 4.

Decisions (spec §11), the reference's computation first where its published numbers depend on it:

| reference | here (default) | option |
|---|---|---|
| ``--features_list 6 12 18 24`` read without ``.clone()``: four aliased copies of layer 24, map 4·p_abn, segmentation loss counted 4 times | ``layers=(24,)``, ``seg_weight`` 4 (the four entries), the map divided by its bound | ``layers=(6, 12, 18, 24)``: the four real layers (``seg_weight`` then 1 per layer, as the reference weights each entry); ``alias_layers=True`` reproduces the literal aliasing |
| margin 0: the triplet's push term is identically zero | ``margin=0`` | ``margin > 0`` activates the push away from the other state |
| α chosen among a sweep trained on the auxiliary set and tested on the target sets (not recorded) | ``glocal_weight=1.0`` (``train.py``'s default, first of every sweep) | any α |
| deep prompts rounded with ``.half()`` | the model's dtype | ``round_prompts_fp16=True`` |
| image score of the first image of a batch only (test batch size 1) | per image, batch-invariant | — |
| unused Linear(768→896) "compound_prompt_projections" saved and given to Adam | not created; the loader skips their keys | — |
| ``test.py``'s sigma default 4, ``train.sh`` 8 | 8 | ``smoothing_sigma`` |

No weights are released: ``load_official_checkpoint`` reads files in the reference's layout
(``{"prompt_learner": {ctx_global_pos, ..., compound_prompts_text.i, ...}}``), as its ``train.py``
writes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..config import BackboneCfg
from . import checkpoint
from .anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from .base import PathLike, Targets
from .registry import register

# train.sh's lengths per auxiliary dataset: (n_ctx, ab_ctx, deep_depth, deep_length)
PROMPT_SETTINGS = {"visa": (13, 13, 9, 4), "mvtec": (12, 13, 10, 2), "colondb": (12, 12, 12, 4),
                   "clinicdb": (12, 12, 9, 4)}
SIDES = ("G", "L")          # the placeholders of the global and the local sentences (tokens 326, 331)


@dataclass
class GlocalCLIPConfig(AnomalyCLIPConfig):
    backbone: BackboneCfg = field(default_factory=lambda: BackboneCfg(pos_embed_interp="bilinear"))
    prompt_setting: str = "mvtec"           # whose train.sh lengths (the auxiliary dataset): visa, mvtec, colondb, clinicdb
    # None below: the prompt_setting's value, fixed when the config is made
    n_ctx: Optional[int] = None             # normal contexts of each branch (shared by its abnormal sentence)
    ab_ctx: Optional[int] = None            # the abnormal sentence's own extra contexts
    deep_length: Optional[int] = None       # deep text prompt tokens
    deep_depth: Optional[int] = None        # deep prompts before text blocks 1..depth-1
    seg_weight: Optional[float] = None      # None: 4 for one layer (the reference's four aliased entries), else 1 each
    smoothing_sigma: float = 8.0
    glocal_weight: float = 1.0              # α of the glocal contrastive term
    margin: float = 0.0                     # the triplet's margin (0: the reference; > 0 adds the push term)

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_setting not in PROMPT_SETTINGS:
            raise ValueError(f"prompt_setting must be one of {sorted(PROMPT_SETTINGS)}, got {self.prompt_setting!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")

    def resolve_lengths(self) -> None:
        """Fill the lengths left None from ``prompt_setting`` (when the model is built: recorded)."""
        n, m, depth, length = PROMPT_SETTINGS[self.prompt_setting]
        self.n_ctx = n if self.n_ctx is None else self.n_ctx
        self.ab_ctx = m if self.ab_ctx is None else self.ab_ctx
        self.deep_depth = depth if self.deep_depth is None else self.deep_depth
        self.deep_length = length if self.deep_length is None else self.deep_length
        if self.deep_length > self.n_ctx:
            raise ValueError(f"deep_length {self.deep_length} exceeds n_ctx {self.n_ctx}: the deep prompts overwrite "
                             f"normal-context positions only")


@register
class GlocalCLIP(AnomalyCLIP):
    name = "glocalclip"
    config_class = GlocalCLIPConfig
    published_name = "GlocalCLIP"
    paper = ("Ham, Jung, Baek, GlocalCLIP: Object-agnostic Global-Local Prompt Learning for Zero-shot Anomaly "
             "Detection, arXiv 2411.06071")
    reference = "github.com/YUL-git/GlocalCLIP (MIT)"
    learns = "global and local object-agnostic contexts (normal + extra abnormal) and shared deep text prompts"
    train_defaults = dict(epochs=15, batch_size=8, lr=1e-3, betas=(0.5, 0.999), optimizer="adam", aug_rate=0.0)
    loss_part_names = ("image_focal", "segmentation", "glocal")

    def __init__(self, cfg: Optional[GlocalCLIPConfig] = None, clip=None, device: Optional[str] = None):
        cfg = cfg if cfg is not None else GlocalCLIPConfig()
        cfg.resolve_lengths()
        super().__init__(cfg, clip, device)
        if self.cfg.seg_weight is None:       # recorded: layers=(24,) stands for the four aliased entries
            self.cfg.seg_weight = 4.0 if len(self.cfg.layers) == 1 else 1.0

    @classmethod
    def tiny_config(cls, **backbone) -> GlocalCLIPConfig:
        cfg = super().tiny_config(**backbone)
        cfg.deep_depth, cfg.n_ctx, cfg.ab_ctx = 2, 4, 3          # the tiny text tower has 2 blocks
        return cfg

    # ---------------------------------------------------------------- text
    def sentences(self) -> tuple[str, ...]:
        """[global normal, global abnormal, local normal, local abnormal], as the reference words them."""
        n, m = self.cfg.n_ctx, self.cfg.ab_ctx
        out = []
        for side in SIDES:
            out += [" ".join([side] * n) + " object.", " ".join([side] * (n + m)) + " damaged object."]
        return tuple(out)

    def build_text_prompts(self, width: int) -> None:
        cfg = self.cfg
        new = lambda k: nn.Parameter(torch.empty(k, width).normal_(std=0.02))  # noqa: E731
        self.ctx_global_pos, self.ctx_global_neg = new(cfg.n_ctx), new(cfg.ab_ctx)
        self.ctx_local_pos, self.ctx_local_neg = new(cfg.n_ctx), new(cfg.ab_ctx)
        self.deep = nn.ParameterList([new(cfg.deep_length) for _ in range(cfg.deep_depth - 1)])
        tokens = open_clip.get_tokenizer(cfg.backbone.name)(list(self.sentences()))
        self.register_buffer("tokens", tokens, persistent=False)                          # (4, T)

    def prompt_embeddings(self, image_tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 4, T, Wt) and (1, 4, T): SOT, the branch's normal contexts, for an abnormal sentence its
        own contexts, then the frozen embeddings of the rest of the placeholder sentence."""
        emb = self.clip.token_embedding(self.tokens)                                      # (4, T, Wt)
        n, m = self.cfg.n_ctx, self.cfg.ab_ctx
        rows = []
        for k, (pos, neg) in enumerate(((self.ctx_global_pos, self.ctx_global_neg),
                                        (self.ctx_local_pos, self.ctx_local_neg))):
            normal, abnormal = emb[2 * k], emb[2 * k + 1]
            rows.append(torch.cat([normal[:1], pos.to(emb.dtype), normal[1 + n:]]))
            rows.append(torch.cat([abnormal[:1], pos.to(emb.dtype), neg.to(emb.dtype), abnormal[1 + n + m:]]))
        return torch.stack(rows)[None], self.tokens[None]

    def split_text(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The local pair makes the map, the global pair scores the image: (G, D, 4) -> two (G, D, 2)."""
        return text[..., 2:], text[..., :2]

    # ---------------------------------------------------------------- training
    def loss(self, feature, patches, probs, text, targets: Targets):
        """AnomalyCLIP's loss with the global pair scoring and the local pair segmenting, plus
        glocal_weight x the glocal contrastive term between the two pairs."""
        loss, parts = super().loss(feature, patches, probs, text, targets)
        t = text[0].T                                                                     # (4, D): g_n, g_a, l_n, l_a
        g_n, g_a, l_n, l_a = (row[None] for row in t)
        glocal = self.glocal_term(g_n, l_n, l_a) + self.glocal_term(g_a, l_a, l_n)
        return loss + self.cfg.glocal_weight * glocal, {**parts, "glocal": float(glocal.detach())}

    def glocal_term(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """The reference's TripletLoss: mean(d(a, p)² + clamp(margin - d(a, n), 0)²), d = ‖x - y + 1e-6‖."""
        pos = torch.pairwise_distance(anchor, positive, keepdim=True)
        neg = torch.pairwise_distance(anchor, negative, keepdim=True)
        return torch.mean(pos ** 2 + torch.clamp(self.cfg.margin - neg, min=0.0) ** 2)

    # ---------------------------------------------------------------- release-layout files
    @classmethod
    def from_official(cls, path: PathLike, **overrides) -> "GlocalCLIP":
        """A file in the reference's layout, in the setting its shapes give (the four lengths, and the
        auxiliary dataset where they are one of train.sh's settings)."""
        n, m, depth, length = file_lengths(_prompt_learner(path), path)
        setting = next((k for k, v in PROMPT_SETTINGS.items() if v == (n, m, depth, length)), "mvtec")
        fields = dict(prompt_setting=setting, n_ctx=n, ab_ctx=m, deep_depth=depth, deep_length=length)
        return cls(cls.official_config(**{**fields, **overrides})).load_official_checkpoint(path)

    def load_official_checkpoint(self, path: PathLike) -> "GlocalCLIP":
        """``{"prompt_learner": {...}}`` as the reference's train.py saves it: the four contexts
        (1, 1, k, D) and ``compound_prompts_text.i``; the frozen token buffers are checked against ours
        (the same sentences), the unused ``compound_prompt_projections`` skipped."""
        state = _prompt_learner(path)
        lengths = file_lengths(state, path)
        ours = (self.cfg.n_ctx, self.cfg.ab_ctx, self.cfg.deep_depth, self.cfg.deep_length)
        if lengths != ours:
            raise checkpoint.CheckpointError(
                f"{path} holds prompts of lengths (n_ctx, ab_ctx, depth, deep_length) = {lengths}, this model has "
                f"{ours}: build it with GlocalCLIP.from_official('{path}') or those lengths")
        names = [f"tokenized_prompts_{b}_{s}" for b in ("global", "local") for s in ("pos", "neg")]
        for key, mine in zip(names, self.tokens):
            if key in state and not torch.equal(state[key].reshape(-1)[:mine.numel()].long().cpu(), mine.long().cpu()):
                raise checkpoint.CheckpointError(f"{path}: {key} holds other sentences than ours ({self.sentences()})")
        mapped = {k: state[k].reshape(state[k].shape[-2], -1) for k in
                  ("ctx_global_pos", "ctx_global_neg", "ctx_local_pos", "ctx_local_neg")}
        mapped.update({k.replace("compound_prompts_text.", "deep."): v for k, v in state.items()
                       if k.startswith("compound_prompts_text.")})
        checkpoint.load_state(self, {k: v.float().cpu() for k, v in mapped.items()}, path)
        self.trained_on = self.official_trained_on(Path(path))
        return self

    @staticmethod
    def official_trained_on(path: Path) -> Optional[str]:
        """No files are released: the auxiliary dataset is the train.sh setting the file's lengths
        match, or unknown (None)."""
        try:
            lengths = file_lengths(_prompt_learner(path), path)
        except (OSError, checkpoint.CheckpointError):
            return None
        return next((k for k, v in PROMPT_SETTINGS.items() if v == lengths), None)


def _prompt_learner(path: PathLike) -> dict:
    obj = checkpoint.read(path)
    state = obj.get("prompt_learner") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "ctx_global_pos" not in state:
        raise checkpoint.CheckpointError(f"{path} is not a GlocalCLIP-layout file: no 'prompt_learner' with "
                                         f"'ctx_global_pos' (the reference's train.py saves {{'prompt_learner': ...}})")
    return state


def file_lengths(state: dict, path) -> Tuple[int, int, int, int]:
    """(n_ctx, ab_ctx, deep_depth, deep_length) from a release-layout state's shapes."""
    try:
        deep = sorted(int(k.rsplit(".", 1)[1]) for k in state if k.startswith("compound_prompts_text."))
        length = int(state["compound_prompts_text.0"].shape[0]) if deep else 0
        return (int(state["ctx_global_pos"].shape[-2]), int(state["ctx_global_neg"].shape[-2]), len(deep) + 1, length)
    except (KeyError, IndexError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{path}: cannot read the prompt lengths from its shapes ({e})") from e
