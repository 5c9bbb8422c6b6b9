"""SAM-style predictor for any method: numpy / PIL images in, scores and anomaly maps out.

>>> predictor = Predictor(methods.load("results/default/model.pt"))
>>> scores, maps = predictor.predict([np.asarray(Image.open("x.png"))], "bottle")   # (B,), list of (H, W)
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .methods import Method

ImageLike = Union[np.ndarray, Image.Image]


class Predictor:
    def __init__(self, model: Method, batch_size: int = 8):
        self.model = model.eval()
        self.transform = model.transform
        self.batch_size = batch_size

    @staticmethod
    def _to_pil(image: ImageLike) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        a = np.asarray(image)
        if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
            raise ValueError(f"expected an HxW or HxWxC (C in 1, 3, 4) uint8 image, got {a.dtype} {a.shape}")
        return Image.fromarray(a.squeeze()).convert("RGB")

    @torch.no_grad()
    def predict(self, images: Sequence[ImageLike], class_names: Union[str, Sequence[str]],
                original_size: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores (B,) and anomaly maps in [0, 1], each at its image's own size (or the model's)."""
        pil = [self._to_pil(im) for im in images]
        names = [class_names] * len(pil) if isinstance(class_names, str) else list(class_names)
        if len(names) != len(pil):
            raise ValueError(f"got {len(pil)} images but {len(names)} class names")
        scores, maps = [], []
        for i in range(0, len(pil), self.batch_size):
            chunk = pil[i:i + self.batch_size]
            x = torch.stack([self.transform(im) for im in chunk]).to(self.model.device)
            out = self.model(x, names[i:i + self.batch_size])
            scores.append(out.image_scores.cpu().numpy())
            for im, m in zip(chunk, out.pixel_scores):
                if original_size:
                    m = F.interpolate(m[None, None], size=(im.height, im.width), mode="bilinear", align_corners=False)[0, 0]
                maps.append(m.clamp(0, 1).cpu().numpy())
        return np.concatenate(scores), maps


AdaCLIPPredictor = Predictor     # its name when AdaCLIP was the only method
