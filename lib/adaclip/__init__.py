"""Zero-shot anomaly detection on a frozen CLIP: AdaCLIP (Cao et al., ECCV 2024) and the methods it is
compared with, side by side on the same data, metric code and harness.

>>> from adaclip import methods
>>> methods.available()                                # ['adaclip', 'aprilgan', 'clip', 'linear', 'winclip']
>>> model = methods.create("adaclip")                  # ViT-L-14-336 @ 518, openai weights, the paper's setting
>>> out = model(images, ["bottle"] * len(images))      # images from model.transform
>>> out.image_scores, out.pixel_scores                 # (B,), (B, 518, 518)

Layout: `methods/` (one module per method), `backbone/` (the frozen CLIP and the block loops the
methods hook into), `data/` (manifests, adapters, loading), and the harness at the top level
(`train`, `evaluate`, `metrics`, `analysis`, `viz`, `predict`, `export`, `explore`, `pipeline`, `sweep`,
`benchmark`, `cli`).
"""
from . import methods
from .backbone import WeightsUnavailableError, build_transform
from .config import BackboneCfg, EvalCfg, TrainCfg
from .methods import AdaCLIP, AdaCLIPConfig, CheckpointError, FusionCfg, Method, MethodOutput, PromptCfg
from .methods.adaclip import AdaCLIPOutput, build_model
from .predictor import AdaCLIPPredictor, Predictor

__all__ = [
    "methods", "Method", "MethodOutput", "AdaCLIP", "AdaCLIPConfig", "AdaCLIPPredictor", "Predictor", "AdaCLIPOutput",
    "BackboneCfg", "PromptCfg", "FusionCfg", "TrainCfg", "EvalCfg", "build_model", "build_transform", "CheckpointError",
    "WeightsUnavailableError",
]
__version__ = "0.2.0"
