"""Checkpoints of every method: the method's name, its config and its learnable parameters.

``{"format": "adaclip", "version": 3, "method": "aprilgan", "config": {...}, "state_dict": {...},
"trained_on": "mvtec", **extra}``, written atomically and read with ``torch.load(weights_only=True)``;
`load` builds the method the file names. Older files were AdaCLIP's alone: version 2 named the
method inside the config (``"method": "adaclip" | "clip" | "linear"``) and version 1 left the
activation unrecorded (None, which then meant "as the weights were trained": QuickGELU for OpenAI's);
both reload as what they ran. A method's official release files are read by its own
``load_official_checkpoint`` (`read_state_dict` + `load_state`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

import open_clip
import torch

from ..config import BackboneCfg
from ..io import atomic_path
from .registry import get

log = logging.getLogger(__name__)
FORMAT, VERSION = "adaclip", 3


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists what differs."""


def save(path: Union[str, Path], model, **extra) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.learnable_state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "method": model.name, "config": model.cfg.to_dict(),
               "state_dict": state, "trained_on": model.trained_on, **extra}
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


def read_state_dict(path: Union[str, Path]) -> dict:
    """A release file's tensors (a plain state dict, or one under "state_dict"), on the CPU."""
    obj = read(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return obj


def method_and_config(obj: dict, path) -> tuple[str, dict]:
    """The method a checkpoint holds and its config as the current version writes it."""
    config = dict(obj["config"])
    version = obj.get("version", 1)
    if version < 2 and (config.get("backbone") or {}).get("quick_gelu") is None:
        config["backbone"] = {**config.get("backbone", {}), "quick_gelu": _version1_quick_gelu(config.get("backbone", {}))}
        log.info("%s: a version-1 checkpoint; it runs the activation it was trained with (quick_gelu=%s)",
                 path, config["backbone"]["quick_gelu"])
    if version < 3:                          # AdaCLIPConfig with a `method` field (adaclip, clip, linear)
        method = config.pop("method", "adaclip")
        if method != "adaclip":
            config = {"backbone": config["backbone"],
                      "smoothing_sigma": (config.get("fusion") or {}).get("smoothing_sigma", 4.0)}
        return method, config
    return obj["method"], config


def load(path, map_location="cpu", **backbone_overrides):
    """The method a checkpoint of ours holds, with its parameters; ``backbone_overrides`` (e.g.
    ``pretrained="/path/ViT-L-14-336px.pt"``) replace fields of the stored backbone config."""
    obj = read(path, map_location)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        raise CheckpointError(f"{path} is not an adaclip checkpoint (no 'format': 'adaclip'); for a method's "
                              f"official release files use its from_official / load_official_checkpoint('{path}')")
    name, config = method_and_config(obj, path)
    cls = get(name)
    cfg = cls.config_class.from_dict(config)
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
            f"checkpoint {path} does not fit this model ({model.name}).\n  missing keys: {missing}\n  unexpected "
            f"keys: {unexpected}\n  shape mismatches: {shapes}\n  the model expects config {model.cfg.to_dict()}")
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
