"""Image and mask transforms (ADACLIP_SPEC.md, "Backbone")."""
from __future__ import annotations

from torchvision import transforms as T

from .config import BackboneCfg


def build_transform(cfg: BackboneCfg) -> T.Compose:
    """PIL RGB image -> (3, S, S) float tensor: resize to (S, S) bicubic (no aspect-preserving crop),
    to tensor, normalise with the weights' mean/std (OpenAI's for the `openai` tag)."""
    from .model.backbone import normalization

    mean, std = normalization(cfg)
    size = cfg.image_size
    return T.Compose([
        T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
