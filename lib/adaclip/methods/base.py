"""What every method is: a frozen CLIP plus, perhaps, learnable parts, behind one interface.

A method module holds a config dataclass whose defaults are its paper's setting (with a
`BackboneCfg` inside) and a `Method` subclass with its forward, its loss (or none), its
official-checkpoint loader and, where it has one, its few-shot memory. The harness (training,
evaluation, prediction, export, the notebooks, the CLI) uses only what this module defines, and
`methods/__init__.py` registers the methods by name.

The contract of ``method(images, class_names)``: ``images`` (B, 3, S, S) from ``method.transform``,
one class name per image (or one for all); it returns a `MethodOutput` whose ``image_scores`` (B,)
and ``pixel_scores`` (B, S, S) lie in [0, 1] (a method whose reference map has another range is
divided by its upper bound: every metric is unchanged, as they only rank). With ``targets`` (a
`Targets`) it also returns the training loss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence, Union

import torch
from torch import nn

from ..backbone import build_clip, build_transform, config_quick_gelu, patch_size
from ..backbone.clip import Normalizer
from ..precision import full_precision  # noqa: F401  (the methods' name for it)

PathLike = Union[str, Path]


@dataclass
class MethodOutput:
    image_scores: torch.Tensor                        # (B,) in [0, 1]
    pixel_scores: torch.Tensor                        # (B, S, S) in [0, 1]
    image_probs: Optional[torch.Tensor] = None        # (B, 2) [normal, abnormal], where the method has them
    layer_maps: Optional[list] = None                 # per tapped layer (B, 2, S, S) softmax (training, explorer)
    patch_tokens: Optional[list] = None               # what the few-shot memory compares (``return_tokens``)
    details: Optional[dict] = None                    # ``return_details``: intermediate results (explorer)
    loss: Optional[torch.Tensor] = None               # with ``targets``: the training loss
    loss_parts: Optional[dict] = None                 # its named parts, for the training log
    score_parts: Optional[torch.Tensor] = None        # (B, P): what a transductive image score needs
                                                      # from every test image (`Method.finalize_scores`)


@dataclass
class Targets:
    """What a training batch knows: image labels (B,), masks (B, S, S) in {0, 1}, which images have
    pixel ground truth (B,) bool, the Dice variant (`TrainCfg.dice`) and the training stage."""
    labels: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    dice: str = "per_image"
    stage: str = "train"


@dataclass
class Stage:
    """One stage of a method's training (most have one; AA-CLIP trains its text adapters, then its
    image adapters): what it trains and with which recipe."""
    name: str
    parameters: list                 # the parameters this stage updates
    epochs: int
    batch_size: int
    lr: float
    betas: tuple
    optimizer: str = "adam"          # "adam" or "adamw"
    milestones: tuple = ()           # MultiStepLR milestones, in iterations
    gamma: float = 0.5


class Method(nn.Module):
    """A frozen CLIP (``self.clip``) plus the method's learnable parts (everything outside ``clip``)."""

    name: ClassVar[str] = ""                  # registry name, e.g. "aprilgan"
    config_class: ClassVar[type]
    published_name: ClassVar[Optional[str]] = None   # its name in published/results.csv (None: no numbers)
    paper: ClassVar[str] = ""
    reference: ClassVar[str] = ""             # reference code and licence
    learns: ClassVar[str] = "nothing"
    supports_few_shot: ClassVar[bool] = False
    # its training recipe, over TrainCfg's defaults (AdaCLIP's); empty for a training-free method
    train_defaults: ClassVar[dict] = {}
    # notebook parameters of its own (flat name -> dotted config field), beside the backbone's
    notebook_params: ClassVar[dict] = {}
    # the named parts of its loss (MethodOutput.loss_parts), each a column of train_log.csv
    loss_part_names: ClassVar[tuple] = ("image_focal", "segmentation")

    def __init__(self, cfg, clip: Optional[nn.Module] = None, device: Optional[str] = None):
        super().__init__()
        if cfg.backbone.quick_gelu is None:      # resolved here, so that every config written records it
            cfg.backbone.quick_gelu = self.default_quick_gelu(cfg)
        self.cfg = cfg
        self.clip = clip if clip is not None else build_clip(cfg.backbone, device)
        self.clip.eval().requires_grad_(False)
        self.image_size, self.patch_size = cfg.backbone.image_size, patch_size(self.clip.visual)
        self.grid = self.image_size // self.patch_size
        self.random_weights = cfg.backbone.pretrained is None
        self.checkpoint_activations = False      # recompute frozen blocks in backward (training memory)
        self._trained_on: Optional[str] = None

    @classmethod
    def tiny_config(cls, **backbone):
        """The method at test scale: a tiny randomly initialised backbone (``adaclip-tiny``, 32 px) and
        whatever must shrink with it; what the tests, CI's sweeps and the contract test build. A method
        whose defaults do not fit a 4-layer ViT with a 2-layer text tower overrides it."""
        own = cls.config_class().backbone.to_dict()                  # the method's own activation, interpolation
        return cls.config_class.from_dict({"backbone": {**own, "name": "adaclip-tiny", "pretrained": None,
                                                        "image_size": 32, "out_layers": None, **backbone}})

    @classmethod
    def default_quick_gelu(cls, cfg) -> bool:
        """The activation the method's reference ran: by default what open_clip's config for the
        backbone builds (exact GELU for the plain ViT configs), as references that build
        ``CLIP(**cfg)`` around the weights do (ADACLIP_SPEC.md, Backbone)."""
        return config_quick_gelu(cfg.backbone.name)

    # ---------------------------------------------------------------- properties
    @property
    def method(self) -> str:
        return self.name

    @property
    def transform(self):
        """PIL image -> normalised (3, S, S) tensor, as the method expects."""
        return build_transform(self.cfg.backbone)

    @property
    def loader_transform(self):
        """What the loader workers run: `transform` without its last step, uint8 out; `normalize`
        finishes it on the device (evaluation and training)."""
        return build_transform(self.cfg.backbone, normalize=False)

    @property
    def normalize(self) -> Normalizer:
        return Normalizer(self.cfg.backbone)

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    @property
    def trained_on(self) -> Optional[str]:
        """The auxiliary datasets it learned from ("mvtec+colondb"), "" when it learns nothing, None unknown."""
        if self._trained_on is None and not self.learnable_parameters():
            return ""
        return self._trained_on

    @trained_on.setter
    def trained_on(self, value: Optional[str]) -> None:
        self._trained_on = value

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("clip.")]

    def learnable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    # ---------------------------------------------------------------- io
    def save(self, path: PathLike, **extra) -> None:
        """Learnable parameters plus the method and its config, written atomically."""
        from . import checkpoint

        checkpoint.save(path, self, **extra)

    def load_official_checkpoint(self, path: PathLike) -> "Method":
        """Load a release file of the method's reference code into this model."""
        raise ValueError(f"method {self.name!r} has no official checkpoint format"
                         + ("" if self.learnable_parameters() else ": it learns nothing"))

    @classmethod
    def official_config(cls, **overrides):
        """The setting the reference's release files were trained in (the config's defaults), with
        ``overrides`` merged in: a section given as a dict replaces only the fields it names
        (``backbone={"pretrained": ...}`` keeps the method's own backbone otherwise)."""
        config = cls.config_class().to_dict()
        for section, values in overrides.items():
            if isinstance(values, dict) and isinstance(config.get(section), dict):
                config[section] = {**config[section], **values}
            else:
                config[section] = values
        return cls.config_class.from_dict(config)

    @classmethod
    def from_official(cls, path: PathLike, **overrides) -> "Method":
        """A release file of the reference in the setting it was trained in (`official_config`);
        ``overrides``: config sections as dicts, e.g. ``backbone={"pretrained": "/path/weights.pt"}``."""
        return cls(cls.official_config(**overrides)).load_official_checkpoint(path)

    def training_stages(self, cfg) -> list[Stage]:
        """The stages `train` runs, in order; by default one: every learnable parameter with ``cfg``'s
        (`TrainCfg`) recipe."""
        return [Stage("train", self.learnable_parameters(), cfg.epochs, cfg.batch_size, cfg.lr, tuple(cfg.betas),
                      cfg.optimizer)]

    @property
    def text_depends_on_image(self) -> bool:
        """True when the text features change with the image (AdaCLIP's dynamic text prompts); else
        they are constants per class name, and an exported graph keeps them as such."""
        return False

    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, D, 2) normal / abnormal text features of the class names (``self.text``'s ensemble)."""
        return self.text(list(class_names))

    def few_shot_memory(self):
        """An empty few-shot memory of this method (``add`` normal references, ``apply`` to outputs)."""
        raise ValueError(f"method {self.name!r} has no few-shot mode; use k_shot=0")

    @property
    def transductive(self) -> bool:
        """True when an image score needs the other test images of its category (a reference's
        faithful option, flagged wherever it is reported): evaluation then collects ``score_parts``
        and replaces the scores by `finalize_scores` per category."""
        return False

    def finalize_scores(self, parts):
        """(n,) image scores of one category's n test images from their ``score_parts`` (n, P)."""
        raise ValueError(f"method {self.name!r} has no transductive image score")

    # ---------------------------------------------------------------- helpers
    def check_inputs(self, images, class_names) -> list[str]:
        """The class names as one string per image; a clear ValueError for malformed inputs."""
        S, P = self.image_size, self.patch_size
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor of shape (B, 3, {S}, {S}), got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, {S}, {S}) (RGB), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point, normalised by the method's transform; got {images.dtype}")
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
        empty = [i for i, c in enumerate(class_names) if not c.strip()]
        if empty:
            raise ValueError(f"empty class name for image(s) {empty}: name each image's category (e.g. 'bottle')")
        return class_names

    def checkpointing(self) -> bool:
        return self.checkpoint_activations and self.training and torch.is_grad_enabled()

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen: dropout / patch dropout stay off
        return self

    def extra_repr(self) -> str:
        return f"method={self.name!r}"


def replace(out: MethodOutput, **changes) -> MethodOutput:
    return dataclasses.replace(out, **changes)


def as_list(names: Union[str, Sequence[str]], n: int) -> list[str]:
    return [names] * n if isinstance(names, str) else list(names)
