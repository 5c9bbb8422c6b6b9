"""MVTec AD and the datasets that share its layout (MPDD, BTAD, DTD-Synthetic, GLASS, synthetic)::

    <category>/train/<normal>/*.png
    <category>/test/<normal>/*.png
    <category>/test/<defect>/<id>.png
    <category>/ground_truth/<defect>/<id>_mask.png   (BTAD, DTD: <id>.png / .bmp)

``<normal>`` is ``good`` (BTAD: ``ok``). The folder may hold many categories or be one itself.
"""
from __future__ import annotations

from pathlib import Path

from .common import LayoutError, find_mask, images_in, row

NORMAL_NAMES = ("good", "ok")


def _category_dirs(folder: Path) -> list[Path]:
    if (folder / "test").is_dir():
        return [folder]
    cats = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "test").is_dir()) if folder.is_dir() else []
    if not cats:
        raise LayoutError(f"{folder}: no <category>/test/ folders; expected the MVTec AD layout "
                          f"<category>/{{train,test}}/<type>/ with ground_truth/<type>/<id>_mask.png")
    return cats


def mvtec_layout(folder: Path, root: Path, dataset: str) -> list[dict]:
    rows = []
    for cat in _category_dirs(folder):
        for split in ("train", "test"):
            split_dir = cat / split
            if not split_dir.is_dir():
                continue
            for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                normal = type_dir.name.lower() in NORMAL_NAMES
                for image in images_in(type_dir):
                    mask = None if normal else find_mask(cat / "ground_truth" / type_dir.name, image.stem)
                    rows.append(row(dataset, cat.name, split, 0 if normal else 1, image, root, mask,
                                    "" if normal else type_dir.name))
    return rows
