"""Your own data: a folder of normal images, folders of anomalous ones, optional masks::

    <folder>/good/*.png                   normal (name set by `normal`)
    <folder>/<defect>/*.png               anomalous, one folder per defect type
    <folder>/ground_truth/<defect>/<name>[_mask].png   optional masks, matched by file name
                                          (a flat ground_truth/<name>[_mask].png works too)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .common import LayoutError, find_mask, images_in, require_dir, row


def folder_layout(folder: Path, root: Path, dataset: str, category: Optional[str] = None,
                  normal: str = "good", masks: str = "ground_truth", split: str = "test") -> list[dict]:
    require_dir(folder, dataset, f"{normal}/ plus one folder per defect type, optional {masks}/")
    category = category or folder.name
    if not (folder / normal).is_dir():
        raise LayoutError(f"{folder}: no {normal}/ folder of normal images; pass normal='<name>' if it is "
                          f"called otherwise")
    rows = [row(dataset, category, split, 0, p, root, None, "") for p in images_in(folder / normal)]
    for defect in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in (normal, masks)):
        for image in images_in(defect):
            mask = find_mask(folder / masks / defect.name, image.stem) or find_mask(folder / masks, image.stem)
            rows.append(row(dataset, category, split, 1, image, root, mask, defect.name))
    if len(rows) == 0:
        raise LayoutError(f"{folder}: no images found")
    return rows
