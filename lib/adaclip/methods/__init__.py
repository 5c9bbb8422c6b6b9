"""The zero-shot anomaly detection methods, one module each, behind one interface (`base.Method`).

>>> from adaclip import methods
>>> methods.available()
['aaclip', 'adaclip', ...]
>>> m = methods.create("aprilgan", pretrained="/path/ViT-L-14-336px.pt", image_size=518)   # any config field
>>> m.load_official_checkpoint("mvtec_pretrained.pth")                # the reference's own release file
>>> out = m(images, class_names)                                      # out.image_scores (B,), out.pixel_scores (B, S, S)

A method is a module with a config dataclass and a `Method` subclass decorated with `register`
(here, or in another installed package that declares it under the ``adaclip.methods`` entry point:
`registry.py`); the harness (training, evaluation, few-shot, prediction, export, sweeps, the
notebooks) needs nothing else. ``tests/test_method_contract.py`` checks every registered method.
"""
from __future__ import annotations

import dataclasses

from ..config import BackboneCfg, TrainCfg
from .aaclip import AACLIP, AACLIPConfig
from .adaclip import AdaCLIP, AdaCLIPConfig, FusionCfg, PromptCfg
from .anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from .aprilgan import APRILGAN, APRILGANConfig
from .base import Method, MethodOutput, Targets
from .checkpoint import CheckpointError, load
from .clip import CLIPBaseline, CLIPConfig
from .crane import Crane, CraneConfig
from .glocalclip import GlocalCLIP, GlocalCLIPConfig
from .linear import LinearBaseline, LinearConfig
from .registry import REGISTRY, available, get, name_of, register
from .winclip import WinCLIP, WinCLIPConfig

# notebook parameters that are fields of every method's backbone
BACKBONE_PARAMS = {"backbone": "name", "pretrained": "pretrained", "image_size": "image_size", "quick_gelu": "quick_gelu"}


def config(method: str, cfg=None, **fields):
    """The method's config at its paper's setting (or ``cfg``) with ``fields`` replaced: any field of
    the config (a dict for a nested section), any backbone field (``pretrained=``, ``image_size=``),
    or a dotted path (``"fusion.k_clusters"``)."""
    cls, name = get(method), method
    data = (cfg if cfg is not None else cls.config_class()).to_dict()
    backbone_fields = {f.name for f in dataclasses.fields(BackboneCfg)}
    for key, value in fields.items():
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in data or not isinstance(data[section], dict) or sub not in data[section]:
                raise ValueError(f"{name}: no config field {key!r}; the config is {data}")
            data[section][sub] = value
        elif key == "backbone" and isinstance(value, str):               # a backbone name
            data["backbone"]["name"] = value
        elif key in data:
            data[key] = {**data[key], **value} if isinstance(data[key], dict) and isinstance(value, dict) else value
        elif key in backbone_fields:
            data["backbone"][key] = value
        else:
            raise ValueError(f"{name}: no config field {key!r}; fields: {sorted(data)} and the backbone's "
                             f"{sorted(backbone_fields)}")
    return cls.config_class.from_dict(data)


def create(method: str, **fields) -> Method:
    """Build a method at its paper's setting with ``fields`` replaced (see `config`)."""
    return get(method)(config(method, **fields))


def from_official(name: str, path, **overrides) -> Method:
    """A method's own release file in the setting it was trained in."""
    return get(name).from_official(path, **overrides)


def config_from_params(method: str, **params) -> tuple:
    """A notebook's flat parameters -> (config, names that do not apply to this method). ``None``
    keeps the method's own value (its paper's setting)."""
    mapping = {**BACKBONE_PARAMS, **get(method).notebook_params}
    fields, unused = {}, []
    for key, value in params.items():
        if key not in mapping:
            unused.append(key)
        elif value is not None:
            fields[mapping[key]] = value
    return config(method, **fields), unused


def train_config(name: str, **overrides) -> TrainCfg:
    """The method's training recipe (its paper's) with the non-None ``overrides`` replaced."""
    recipe = {**get(name).train_defaults, **{k: v for k, v in overrides.items() if v is not None}}
    return TrainCfg.from_dict(recipe)


__all__ = ["available", "get", "register", "name_of", "config", "create", "load", "from_official", "config_from_params",
           "train_config",
           "Method", "MethodOutput", "Targets", "CheckpointError", "REGISTRY", "AdaCLIP", "AdaCLIPConfig", "PromptCfg",
           "FusionCfg", "APRILGAN", "APRILGANConfig", "CLIPBaseline", "CLIPConfig", "LinearBaseline", "LinearConfig",
           "WinCLIP", "WinCLIPConfig", "AnomalyCLIP", "AnomalyCLIPConfig", "Crane", "CraneConfig", "AACLIP", "AACLIPConfig",
           "GlocalCLIP", "GlocalCLIPConfig"]
