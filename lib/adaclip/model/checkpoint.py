"""Checkpoints: ours (learnable parameters + config) and the official AdaCLIP release files.

Ours: ``{"format": "adaclip", "version": 2, "config": {...}, "state_dict": {...}, **extra}``
written atomically and read with ``torch.load(weights_only=True)``. Version 2 records the activation
(``backbone.quick_gelu``) as a bool; version 1 files left it None, which then meant "as the weights
were trained" (QuickGELU for OpenAI's), and they reload with that activation.

Official (github caoyunkang/AdaCLIP: ``pretrained_mvtec_colondb.pth``, ``pretrained_visa_clinicdb.pth``,
``pretrained_all.pth``): a plain state dict of the trainer, keys prefixed ``clip_model.``. They were
trained with ViT-L-14-336 at 518 px, prompt depth 4, length 5, type SD, branch VL (the defaults), on
exact-GELU features: the reference builds open_clip's plain ``ViT-L-14-336`` config, which has no
``quick_gelu``, around the OpenAI weights (ADACLIP_SPEC.md, Backbone). `official_config` is that
setting; loading a release file into a QuickGELU model warns.
Key mapping (reference -> ours):

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

import logging
import re
import warnings
from pathlib import Path
from typing import Union

import open_clip
import torch

from ..config import AdaCLIPConfig, BackboneCfg
from ..io import atomic_path

log = logging.getLogger(__name__)
FORMAT, VERSION = "adaclip", 2

OFFICIAL_KEY_MAP = [
    (r"visual_prompter\.static_prompts\.(\d+)", r"visual_prompts.static.\1"),
    (r"text_prompter\.static_prompts\.(\d+)", r"text_prompts.static.\1"),
    (r"dynamic_visual_prompt_generator\.head\.(\d+)\.(weight|bias)", r"visual_prompts.dynamic.\1.\2"),
    (r"dynamic_text_prompt_generator\.head\.(\d+)\.(weight|bias)", r"text_prompts.dynamic.\1.\2"),
    (r"patch_token_layer\.head\.(\d+)\.(weight|bias)", r"patch_proj.\1.\2"),
    (r"cls_token_layer\.head\.0\.(weight|bias)", r"cls_proj.\1"),
]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists what differs."""


def save(path: Union[str, Path], model, **extra) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.learnable_state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(), "state_dict": state,
               "trained_on": model.trained_on, **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read(path: Union[str, Path], map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); it may be "
                              f"truncated or not a torch file: re-download or re-train it") from e
    return obj


def load(cls, path, map_location="cpu", **backbone_overrides):
    obj = read(path, map_location)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        raise CheckpointError(f"{path} is not an adaclip checkpoint (no 'format': 'adaclip'); for the official "
                              f"release files use model.load_official_checkpoint('{path}')")
    config = obj["config"]
    if obj.get("version", 1) < 2 and (config.get("backbone") or {}).get("quick_gelu") is None:
        config = {**config, "backbone": {**config.get("backbone", {}),
                                         "quick_gelu": _version1_quick_gelu(config.get("backbone", {}))}}
        log.info("%s: a version-1 checkpoint; it runs the activation it was trained with (quick_gelu=%s)",
                 path, config["backbone"]["quick_gelu"])
    cfg = AdaCLIPConfig.from_dict(config)
    for k, v in backbone_overrides.items():
        if not hasattr(cfg.backbone, k):
            raise ValueError(f"unknown backbone field {k!r}")
        setattr(cfg.backbone, k, v)
    cfg.backbone.__post_init__()
    model = cls(cfg)
    load_state(model, obj["state_dict"], path)
    model.trained_on = obj.get("trained_on")
    return model.to(map_location) if map_location else model


def _version1_quick_gelu(backbone: dict) -> bool:
    """What version 1 built for ``quick_gelu=None``: the activation of the model's `openai` weights
    (or of its tag), QuickGELU for the ViTs OpenAI released, else open_clip's GELU."""
    cfg = BackboneCfg.from_dict(backbone)
    tags = open_clip.list_pretrained_tags_by_model(cfg.name)
    tag = str(cfg.pretrained).lower().replace("-", "_")
    tag = tag if tag in tags else "openai"
    return bool(open_clip.get_pretrained_cfg(cfg.name, tag).get("quick_gelu", False))


def load_state(model, state: dict, path) -> None:
    """Strict load of the learnable parameters, with a readable error on any mismatch."""
    own = model.learnable_state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model.\n  missing keys: {missing}\n  unexpected keys: "
            f"{unexpected}\n  shape mismatches: {shapes}\n  the model expects config {model.cfg.to_dict()}")
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in state:
                v.copy_(state[k].to(v.dtype))


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


# what each release file learned from (the reference's README and train.py commands)
OFFICIAL_TRAINED_ON = {"pretrained_mvtec_colondb": "mvtec+colondb", "pretrained_visa_clinicdb": "visa+clinicdb",
                       "pretrained_all": "all 14 datasets"}


def official_config(**overrides) -> AdaCLIPConfig:
    """The setting the official release files were trained in: the paper's defaults with exact GELU.
    ``overrides``: config sections as dicts (``backbone={"pretrained": "/path/ViT-L-14-336px.pt"}``)."""
    config = AdaCLIPConfig().to_dict()
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    if config["backbone"].get("quick_gelu") is None:
        config["backbone"]["quick_gelu"] = False
    return AdaCLIPConfig.from_dict(config)


def load_official(model, path) -> None:
    if model.cfg.backbone.quick_gelu:
        warnings.warn(f"{path}: the official AdaCLIP files were trained on exact-GELU features (the reference "
                      f"builds open_clip's plain config); this model runs QuickGELU (quick_gelu=True), so its "
                      f"scores will differ from the paper's", UserWarning, stacklevel=3)
    obj = read(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    load_state(model, map_official_keys(obj), path)
    model.trained_on = OFFICIAL_TRAINED_ON.get(Path(path).stem)
