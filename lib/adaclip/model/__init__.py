"""The AdaCLIP model: frozen CLIP backbone, hybrid prompts, fusion."""
from .adaclip import AdaCLIP, AdaCLIPOutput, build_model
from .backbone import WeightsUnavailableError, build_clip
from .checkpoint import CheckpointError

__all__ = ["AdaCLIP", "AdaCLIPOutput", "build_model", "build_clip", "WeightsUnavailableError", "CheckpointError"]
