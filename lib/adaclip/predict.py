"""Scoring your own images from the command line: ``adaclip predict``.

    adaclip predict photos/ --checkpoint results/default/model.pt --class-name bottle --out predictions/

For each image: a heat-map overlay PNG (and, with ``--masks``, a binary mask PNG) at the image's own
size, and one row of ``predictions.csv``: path, image score, decision, maximum pixel score, the
files written. The decision threshold defaults to the F1-optimal one that evaluation stored beside
the checkpoint (``thresholds.json``): the class name's own category if evaluation saw it, else the
threshold pooled over everything it evaluated. A file that cannot be read is reported and skipped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from .data.adapters.common import IMAGE_EXTS
from .data.images import ImageError, load_image
from .evaluate import THRESHOLDS
from .io import atomic_path, write_csv
from .predictor import Predictor

PathLike = Union[str, Path]


@dataclass
class Thresholds:
    image: float
    pixel: float
    source: str           # where they came from, for the log


def collect_images(inputs: Iterable[PathLike]) -> list[Path]:
    """Image files named directly, or found (recursively, sorted) in the folders named."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                           and not p.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"{item} holds no image files ({', '.join(sorted(IMAGE_EXTS))})")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist; give image files or folders of images")
    return files


def stored_thresholds(checkpoint: PathLike, class_name: str) -> Optional[Thresholds]:
    """The thresholds evaluation wrote beside ``checkpoint`` for ``class_name``, or None."""
    path = Path(checkpoint).parent / THRESHOLDS
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    for key, image in stored.get("image", {}).items():
        if key.split("/", 1)[-1] == class_name:
            pixel = stored.get("pixel", {}).get(key, stored.get("pixel_pooled"))
            return Thresholds(image, pixel if pixel is not None else image, f"{path} ({key})")
    if stored.get("image_pooled") is not None:
        pixel = stored.get("pixel_pooled")
        return Thresholds(stored["image_pooled"], pixel if pixel is not None else stored["image_pooled"],
                          f"{path} (pooled over every evaluated category; {class_name!r} was not evaluated)")
    return None


def overlay_image(image: Image.Image, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image with the anomaly map (H, W) in [0, 1] blended over it as a jet colour map."""
    colours = (matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.float32)
    blended = (1 - alpha) * np.asarray(image, np.float32) + alpha * colours
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _unique_names(files: Sequence[Path]) -> list[str]:
    """Output names: each file's path below the files' common folder, '/' as '_' (broken_large_000),
    numbered where two still collide."""
    common = Path(os.path.commonpath([str(f.resolve().parent) for f in files])) if files else Path()
    names, seen = [], {}
    for f in files:
        stem = "_".join(f.resolve().relative_to(common).with_suffix("").parts)
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def predict_files(predictor: Predictor, files: Sequence[Path], class_name: str, out_dir: PathLike,
                  thresholds: Thresholds, masks: bool = False, progress: bool = True) -> tuple[pd.DataFrame, list[str]]:
    """Score ``files`` in batches; write overlays (and masks) and ``predictions.csv`` into ``out_dir``.

    Returns the predictions table and one message per file that could not be read (skipped).
    """
    out_dir = Path(out_dir)
    rows, failures = [], []
    names = _unique_names(files)
    batch = predictor.batch_size
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress)
    for start in range(0, len(files), batch):
        chunk, images = [], []
        for f, name in zip(files[start:start + batch], names[start:start + batch]):
            try:
                images.append(load_image(f))
                chunk.append((f, name))
            except ImageError as e:
                failures.append(str(e))
        if images:
            scores, maps = predictor.predict(images, class_name)
            for (f, name), image, score, heat in zip(chunk, images, scores, maps):
                overlay = out_dir / "overlays" / f"{name}.png"
                _save_png(overlay_image(image, heat), overlay)
                mask = ""
                if masks:
                    mask = out_dir / "masks" / f"{name}.png"
                    _save_png(Image.fromarray(((heat >= thresholds.pixel) * 255).astype(np.uint8)), mask)
                rows.append({"path": str(f), "image_score": float(score), "decision": int(score >= thresholds.image),
                             "threshold": thresholds.image, "max_pixel_score": float(heat.max()),
                             "overlay": str(overlay), "mask": str(mask)})
        bar.update(len(files[start:start + batch]))
    bar.close()
    table = pd.DataFrame(rows, columns=["path", "image_score", "decision", "threshold", "max_pixel_score",
                                        "overlay", "mask"])
    write_csv(out_dir / "predictions.csv", table)
    return table, failures
