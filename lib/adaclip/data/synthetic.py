"""Synthetic anomalies with exact masks: procedural textures with drawn-in defects (seeded).

For tests, CI and users without data. ``make_synthetic`` writes the MVTec AD layout, so the
normal adapter reads it (``build_manifest("synthetic", root)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

TEXTURES = ("stripes", "checker", "dots")
DEFECTS = ("blob", "scratch", "stain")


def texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8 normal texture with random phase, frequency and colours."""
    y, x = np.mgrid[0:size, 0:size] / size
    freq, phase = rng.uniform(4, 7), rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x + 0.3 * y) + phase)
    elif kind == "checker":
        t = ((np.floor(freq * x + phase) + np.floor(freq * y)) % 2).astype(float)
    elif kind == "dots":
        t = 0.5 + 0.25 * (np.sin(2 * np.pi * freq * x + phase) + np.sin(2 * np.pi * freq * y))
    else:
        raise ValueError(f"unknown texture {kind!r}; choose from {TEXTURES}")
    c0, c1 = rng.uniform(0.3, 0.5, 3), rng.uniform(0.55, 0.75, 3)   # muted, so defects stand out
    img = c0 + t[..., None] * (c1 - c0) + rng.normal(0, 0.02, (size, size, 3))
    return (img.clip(0, 1) * 255).astype(np.uint8)


def add_defect(rng: np.random.Generator, image: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect; returns the image and its exact (H, W) {0, 1} mask."""
    size = image.shape[0]
    pil, mask = Image.fromarray(image), Image.new("L", (size, size), 0)
    draw, mdraw = ImageDraw.Draw(pil), ImageDraw.Draw(mask)
    colour = tuple(int(v) for v in rng.choice([rng.integers(0, 40, 3), rng.integers(215, 256, 3)]))
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    r = rng.uniform(0.08, 0.16) * size
    if kind == "blob":
        box = [cx - r, cy - r * rng.uniform(0.6, 1.0), cx + r, cy + r * rng.uniform(0.6, 1.0)]
        draw.ellipse(box, fill=colour)
        mdraw.ellipse(box, fill=1)
    elif kind == "scratch":
        angle = rng.uniform(0, np.pi)
        dx, dy = np.cos(angle) * 2 * r, np.sin(angle) * 2 * r
        line = [(cx - dx, cy - dy), (cx + dx, cy + dy)]
        width = max(2, int(size * 0.05))
        draw.line(line, fill=colour, width=width)
        mdraw.line(line, fill=1, width=width)
    elif kind == "stain":
        pts = [(cx + r * rng.uniform(0.5, 1.2) * np.cos(a), cy + r * rng.uniform(0.5, 1.2) * np.sin(a))
               for a in np.linspace(0, 2 * np.pi, 7, endpoint=False)]
        draw.polygon(pts, fill=colour)
        mdraw.polygon(pts, fill=1)
    else:
        raise ValueError(f"unknown defect {kind!r}; choose from {DEFECTS}")
    return np.asarray(pil), np.asarray(mask, dtype=np.uint8)


def make_synthetic(folder: Union[str, Path], categories: Sequence[str] = ("stripes", "checker"),
                   n_train: int = 4, n_good: int = 8, n_defect: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write an MVTec-layout synthetic dataset; defect types cycle through DEFECTS."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for cat in categories:
        for split, n in (("train", n_train), ("test", n_good)):
            d = folder / cat / split / "good"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(texture(rng, cat, size)).save(d / f"{i:03d}.png")
        for i in range(n_defect):
            kind = DEFECTS[i % len(DEFECTS)]
            img, mask = add_defect(rng, texture(rng, cat, size), kind)
            (folder / cat / "test" / kind).mkdir(parents=True, exist_ok=True)
            (folder / cat / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / cat / "test" / kind / f"{i:03d}.png")
            Image.fromarray(mask * 255).save(folder / cat / "ground_truth" / kind / f"{i:03d}_mask.png")
    return folder
