"""AdaCLIP: zero-shot anomaly detection with hybrid learnable prompts on a frozen CLIP.

>>> from adaclip import AdaCLIP, AdaCLIPConfig
>>> model = AdaCLIP.from_config(AdaCLIPConfig())      # ViT-L-14-336 @ 518, openai weights
>>> out = model(images, ["bottle"] * len(images))   # images from model.transform
>>> out.image_scores, out.pixel_scores               # (B,), (B, 518, 518)
"""
from .config import AdaCLIPConfig, BackboneCfg, EvalCfg, FusionCfg, PromptCfg, TrainCfg
from .model import AdaCLIP, AdaCLIPOutput, CheckpointError, WeightsUnavailableError, build_model
from .predictor import AdaCLIPPredictor
from .transforms import build_transform

__all__ = [
    "AdaCLIP", "AdaCLIPConfig", "AdaCLIPPredictor", "AdaCLIPOutput", "BackboneCfg", "PromptCfg", "FusionCfg", "TrainCfg", "EvalCfg",
    "build_model", "build_transform", "CheckpointError", "WeightsUnavailableError",
]
__version__ = "0.1.0"
