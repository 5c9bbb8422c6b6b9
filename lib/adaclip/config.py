"""Configuration dataclasses shared by every method and by the harness.

`BackboneCfg` (the frozen CLIP), `TrainCfg` and `EvalCfg` live here; each method's own config
(`methods.adaclip.AdaCLIPConfig`, `methods.aprilgan.APRILGANConfig`, ...) lives with the method and
embeds a `BackboneCfg`. Configs round-trip through plain dicts (`to_dict` / `from_dict`) so they can
be stored in checkpoints (loaded with ``weights_only=True``), `config.json` files and papermill
parameters.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Optional, Tuple


class ConfigBase:
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
        kwargs, types = {}, typing.get_type_hints(cls)
        for name, value in d.items():
            sub = types.get(name)                                 # a nested config: built from its dict
            if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, ConfigBase):
                value = sub.from_dict(value)
            elif isinstance(value, list):  # json has no tuples
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)


def activation_name(quick_gelu: Optional[bool]) -> str:
    """How a recorded ``quick_gelu`` reads in tables."""
    return {True: "QuickGELU", False: "GELU"}.get(quick_gelu, "unrecorded")


@dataclass
class BackboneCfg(ConfigBase):
    name: str = "ViT-L-14-336"                     # any open_clip ViT model name
    pretrained: Optional[str] = "openai"           # open_clip tag, local file, or None (random init)
    image_size: int = 518                          # pos-embeds resized on load
    out_layers: Optional[Tuple[int, ...]] = None   # 1-based, "after block k"; None = quarter depths
    quick_gelu: Optional[bool] = None              # activation: False exact GELU, True QuickGELU; None: the
                                                   # method's default (AdaCLIP GELU as its reference ran)
    init_seed: int = 0                             # random init (pretrained=None) is seeded: reloadable
    pos_embed_interp: str = "bicubic"              # "bicubic" (AdaCLIP), "bicubic_antialias" (open_clip's own,
                                                   # the same when enlarging), "bilinear" (AnomalyCLIP, Crane)

    def __post_init__(self):
        if isinstance(self.pretrained, str) and self.pretrained.strip().lower() in ("", "none", "random"):
            self.pretrained = None
        if self.pos_embed_interp not in ("bicubic", "bicubic_antialias", "bilinear"):
            raise ValueError(f"backbone.pos_embed_interp must be 'bicubic', 'bicubic_antialias' or 'bilinear', "
                             f"got {self.pos_embed_interp!r}")
        if int(self.image_size) != self.image_size or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        self.image_size = int(self.image_size)
        if self.out_layers is not None:
            self.out_layers = tuple(int(k) for k in self.out_layers)


@dataclass
class TrainCfg(ConfigBase):
    """Training recipe. The defaults are AdaCLIP's; `methods.train_config(name, ...)` starts from the
    method's own recipe (APRIL-GAN: Adam, lr 1e-3, batch 8, 3 epochs, mosaic 0.2)."""
    epochs: int = 5
    batch_size: int = 1                 # the reference's (and the paper's); any size works here
    lr: float = 0.01
    betas: Tuple[float, float] = (0.5, 0.999)
    optimizer: str = "adamw"            # "adamw" (AdaCLIP) or "adam" (APRIL-GAN: no weight decay)
    seed: int = 111
    num_workers: Optional[int] = None   # loader worker processes; None: one per core (data/loading.py)
    image_cache: str = "memory"         # decoded, resized images for later epochs: "memory", "disk", "off"
    cache_mb: float = 2048              # the memory cache's budget (images beyond it are decoded each epoch)
    cache_dir: Optional[str] = None     # the disk cache's folder (default $ADACLIP_CACHE or ~/.cache/adaclip)
    dice: str = "per_image"             # "per_image", or "per_row" (reference quirk at batch size 1)
    aug_rate: float = 0.0               # probability of a 2x2 same-class mosaic
    selection: str = "last"             # "last", "val" (split of the training data), "test_f1" (reference leak)
    val_fraction: float = 0.1           # used when selection == "val"
    amp: bool = True                    # autocast (bf16), CUDA only
    checkpoint_activations: bool = False  # recompute frozen blocks in backward: same gradients, less memory

    def __post_init__(self):
        if self.optimizer not in ("adamw", "adam"):
            raise ValueError(f"train.optimizer must be 'adamw' or 'adam', got {self.optimizer!r}")
        if self.dice not in ("per_image", "per_row"):
            raise ValueError(f"train.dice must be 'per_image' or 'per_row', got {self.dice!r}")
        if self.selection not in ("last", "val", "test_f1"):
            raise ValueError(f"train.selection must be 'last', 'val' or 'test_f1', got {self.selection!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("train.batch_size and train.epochs must be >= 1")
        if self.image_cache not in ("memory", "disk", "off"):
            raise ValueError(f"train.image_cache must be 'memory', 'disk' or 'off', got {self.image_cache!r}")


@dataclass
class EvalCfg(ConfigBase):
    batch_size: int = 8
    num_workers: Optional[int] = None   # loader worker processes; None: one per core (data/loading.py)
    aupro: bool = True                  # region labelling costs time; off for validation during training
    aupro_fpr_limit: float = 0.3
    aupro_cflow: bool = True            # also AnomalyCLIP's / Crane's AUPRO (metrics.CflowAupro), as they publish it
    save_maps: bool = False             # compressed anomaly maps (npz) in the run folder
    pixel_metric_size: Optional[int] = None  # None: evaluate maps at the model's input size
    k_shot: int = 0                     # normal reference images per category (few-shot); 0 = zero-shot
    shot_seed: int = 0                  # which references are drawn from the normal training images
    bootstrap: int = 1000               # replicates of the 95% intervals over test images (bootstrap.py); 0: none
    bootstrap_seed: int = 0             # which images each replicate draws (the same for every run: paired tests)

    def __post_init__(self):
        if self.k_shot < 0:
            raise ValueError(f"evaluation k_shot must be >= 0, got {self.k_shot}")
        if self.bootstrap < 0:
            raise ValueError(f"evaluation bootstrap (replicates) must be >= 0 (0: no intervals), got {self.bootstrap}")
