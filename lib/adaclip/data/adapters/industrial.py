"""KolektorSDD and DAGM 2007 in their original layouts.

KolektorSDD (v1)::   kosNN/PartK.jpg with kosNN/PartK_label.bmp; anomalous iff the label has a defect.
DAGM 2007::          ClassN/{Train,Test}/NNNN.PNG with ClassN/{Train,Test}/Label/NNNN_label.PNG for
                     the defective images.
"""
from __future__ import annotations

from pathlib import Path

from ..images import load_mask
from .common import LayoutError, find_mask, images_in, require_dir, row


def ksdd_layout(folder: Path, root: Path, dataset: str, category: str = "SDD") -> list[dict]:
    parts = sorted(p for p in require_dir(folder, dataset, "kosNN/PartK.jpg + PartK_label.bmp").iterdir()
                   if p.is_dir())
    rows = []
    for part in parts:
        for image in images_in(part):
            if image.stem.endswith("_label"):
                continue
            mask = find_mask(part, image.stem, ("_label",))
            if mask is None:
                raise LayoutError(f"{image}: no {image.stem}_label.bmp beside it (KolektorSDD layout)")
            label = int(load_mask(mask).any())
            rows.append(row(dataset, category, "test", label, image, root, mask, "defect" if label else ""))
    if not rows:
        raise LayoutError(f"{folder}: no kosNN/PartK.jpg images (KolektorSDD layout)")
    return rows


def dagm_layout(folder: Path, root: Path, dataset: str) -> list[dict]:
    classes = sorted(p for p in require_dir(folder, dataset, "ClassN/{Train,Test}/").iterdir()
                     if p.is_dir() and p.name.lower().startswith("class"))
    if not classes:
        raise LayoutError(f"{folder}: no ClassN folders (DAGM 2007 layout ClassN/{{Train,Test}}/NNNN.PNG)")
    rows = []
    for cls in classes:
        for split_dir in sorted(p for p in cls.iterdir() if p.is_dir() and p.name.lower() in ("train", "test")):
            labels = split_dir / "Label"
            for image in images_in(split_dir):
                mask = find_mask(labels, image.stem, ("_label",))
                rows.append(row(dataset, cls.name, split_dir.name.lower(), int(mask is not None), image, root,
                                mask, "defect" if mask is not None else ""))
    return rows



