"""Configuration dataclasses.

Every knob of the method is a field here, with the paper's / reference code's value as the
default. Configs round-trip through plain dicts (`to_dict` / `from_dict`) so they can be stored
in checkpoints (loaded with ``weights_only=True``), `config.json` files and papermill parameters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Tuple


class _DictMixin:
    """`to_dict` / `from_dict` for (nested) config dataclasses, with clear errors on bad keys."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict] = None, **overrides):
        d = {**(d or {}), **overrides}
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; expected some of {sorted(known)}")
        kwargs = {}
        for name, value in d.items():
            sub = _NESTED.get((cls.__name__, name))
            if sub is not None and isinstance(value, dict):
                value = sub.from_dict(value)
            elif isinstance(value, list):  # json has no tuples
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)


def activation_name(quick_gelu: Optional[bool]) -> str:
    """How a recorded ``quick_gelu`` reads in tables."""
    return {True: "QuickGELU", False: "GELU"}.get(quick_gelu, "unrecorded")


@dataclass
class BackboneCfg(_DictMixin):
    name: str = "ViT-L-14-336"                     # any open_clip ViT model name
    pretrained: Optional[str] = "openai"           # open_clip tag, local file, or None (random init)
    image_size: int = 518                          # pos-embeds resized on load
    out_layers: Optional[Tuple[int, ...]] = None   # 1-based, "after block k"; None = quarter depths
    quick_gelu: Optional[bool] = None              # activation: False exact GELU, True QuickGELU; None: the
                                                   # method's default (AdaCLIP GELU as its reference ran)
    init_seed: int = 0                             # random init (pretrained=None) is seeded: reloadable

    def __post_init__(self):
        if isinstance(self.pretrained, str) and self.pretrained.strip().lower() in ("", "none", "random"):
            self.pretrained = None
        if int(self.image_size) != self.image_size or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        self.image_size = int(self.image_size)
        if self.out_layers is not None:
            self.out_layers = tuple(int(k) for k in self.out_layers)


@dataclass
class PromptCfg(_DictMixin):
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
class FusionCfg(_DictMixin):
    use_hsf: bool = True          # Hybrid Semantic Fusion for the image score
    k_clusters: int = 20          # k-means clusters; top 5·k patches are clustered
    alpha: float = 0.2            # weight of the HSF feature against the class feature
    kmeans: str = "torch"         # "torch": seeded, batched; "sklearn": the reference (per image)
    seed: int = 0                 # k-means seed (the reference's sklearn call is unseeded)
    smoothing_sigma: float = 4.0  # Gaussian filter on the inference map; 0 disables

    def __post_init__(self):
        if self.kmeans not in ("torch", "sklearn"):
            raise ValueError(f"fusion.kmeans must be 'torch' or 'sklearn', got {self.kmeans!r}")
        if self.k_clusters < 1:
            raise ValueError(f"fusion.k_clusters must be >= 1, got {self.k_clusters}")


# "adaclip": the method. The baselines share its data, metric code and run folders:
# "clip":   training-free zero-shot CLIP (the "CLIP" row of the zero-shot papers): last-layer patch tokens
#           through CLIP's own ln_post and projection, image score from the class token; nothing learned.
# "linear": learned linear projections of the four layers' patch tokens only (what APRIL-GAN trains);
#           no prompts, no HSF, image score from CLIP's frozen class feature.
METHODS = ("adaclip", "clip", "linear")


@dataclass
class AdaCLIPConfig(_DictMixin):
    """The whole model: backbone, prompts and fusion (and which method: AdaCLIP or a baseline)."""
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    prompts: PromptCfg = field(default_factory=PromptCfg)
    fusion: FusionCfg = field(default_factory=FusionCfg)
    method: str = "adaclip"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method != "adaclip":     # baselines have no prompts and no HSF: the config says what runs
            self.prompts.branch = ""
            self.fusion.use_hsf = False

    @classmethod
    def from_params(cls, backbone: str = "ViT-L-14-336", pretrained: Optional[str] = "openai", image_size: int = 518,
                    prompt_depth: int = 4, prompt_length: int = 5, prompt_type: str = "SD", prompt_branch: str = "VL",
                    use_hsf: bool = True, k_clusters: int = 20, method: str = "adaclip",
                    quick_gelu: Optional[bool] = None) -> "AdaCLIPConfig":
        """From the flat literals of a notebook's parameters cell."""
        return cls(backbone=BackboneCfg(name=backbone, pretrained=pretrained, image_size=image_size,
                                        quick_gelu=quick_gelu),
                   prompts=PromptCfg(depth=prompt_depth, length=prompt_length, type=prompt_type, branch=prompt_branch),
                   fusion=FusionCfg(use_hsf=use_hsf, k_clusters=k_clusters), method=method)

    @classmethod
    def tiny(cls, **backbone_overrides) -> "AdaCLIPConfig":
        """A tiny randomly initialised ViT for tests, CI and smoke runs (scores are meaningless)."""
        bb = dict(name="adaclip-tiny", pretrained=None, image_size=32)
        bb.update(backbone_overrides)
        return cls(backbone=BackboneCfg(**bb), prompts=PromptCfg(depth=2, length=2),
                   fusion=FusionCfg(k_clusters=3))


@dataclass
class TrainCfg(_DictMixin):
    epochs: int = 5
    batch_size: int = 1                 # the reference's (and the paper's); any size works here
    lr: float = 0.01
    betas: Tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    num_workers: int = 0
    dice: str = "per_image"             # "per_image", or "per_row" (reference quirk at batch size 1)
    aug_rate: float = 0.0               # probability of a 2x2 same-class mosaic
    selection: str = "last"             # "last", "val" (split of the training data), "test_f1" (reference leak)
    val_fraction: float = 0.1           # used when selection == "val"
    amp: bool = True                    # autocast (bf16), CUDA only
    checkpoint_activations: bool = False  # recompute frozen blocks in backward: same gradients, less memory

    def __post_init__(self):
        if self.dice not in ("per_image", "per_row"):
            raise ValueError(f"train.dice must be 'per_image' or 'per_row', got {self.dice!r}")
        if self.selection not in ("last", "val", "test_f1"):
            raise ValueError(f"train.selection must be 'last', 'val' or 'test_f1', got {self.selection!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("train.batch_size and train.epochs must be >= 1")


@dataclass
class EvalCfg(_DictMixin):
    batch_size: int = 8
    num_workers: int = 0
    aupro: bool = True                  # region labelling costs time; off for validation during training
    aupro_fpr_limit: float = 0.3
    aupro_cflow: bool = True            # also AnomalyCLIP's / Crane's AUPRO (metrics.CflowAupro), as they publish it
    save_maps: bool = False             # compressed anomaly maps (npz) in the run folder
    pixel_metric_size: Optional[int] = None  # None: evaluate maps at the model's input size
    k_shot: int = 0                     # normal reference images per category (few-shot); 0 = zero-shot
    shot_seed: int = 0                  # which references are drawn from the normal training images

    def __post_init__(self):
        if self.k_shot < 0:
            raise ValueError(f"evaluation k_shot must be >= 0, got {self.k_shot}")


_NESTED: dict[tuple[str, str], Any] = {
    ("AdaCLIPConfig", "backbone"): BackboneCfg,
    ("AdaCLIPConfig", "prompts"): PromptCfg,
    ("AdaCLIPConfig", "fusion"): FusionCfg,
}
