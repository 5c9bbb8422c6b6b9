"""KolektorSDD and DAGM 2007 in their original layouts.

KolektorSDD (v1)::   kosNN/PartK.jpg with kosNN/PartK_label.bmp; anomalous iff the label has a defect.
                     ``strips=3`` cuts every image into three parts along its height, as the
                     reference's data_preprocess/sdd-pre.py does before evaluation (see ksdd_layout).
DAGM 2007::          ClassN/{Train,Test}/NNNN.PNG with ClassN/{Train,Test}/Label/NNNN_label.PNG for
                     the defective images.
"""
from __future__ import annotations

from pathlib import Path

from ..images import load_mask
from .common import LayoutError, find_mask, images_in, require_dir, row


def ksdd_layout(folder: Path, root: Path, dataset: str, category: str = "SDD", strips: int = 1) -> list[dict]:
    """Whole images by default (all in the test split). ``strips=n`` makes one row per part of
    rows ``[k·H//n, (k+1)·H//n)`` (a ``crop`` column; no files are written), labelled by that
    part of the mask; with n = 3 this is the reference's cut, and so are its splits: every
    defective part is a test image and the normal parts are divided 75 / 25 into train / test by
    scikit-learn's ``train_test_split(test_size=0.25, random_state=42)``. The reference listed the
    files in ``os.listdir`` order, which differs between machines; here they are sorted, so the
    same fraction, but not necessarily the same parts, lands in train."""
    if int(strips) != strips or strips < 1:
        raise ValueError(f"ksdd strips must be a positive integer, got {strips!r}")
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
            m = load_mask(mask)
            if strips == 1:
                label = int(m.any())
                rows.append(row(dataset, category, "test", label, image, root, mask, "defect" if label else ""))
                continue
            height, width = m.shape
            for k in range(strips):
                top, bottom = k * height // strips, (k + 1) * height // strips
                label = int(m[top:bottom].any())
                rows.append({**row(dataset, category, "test", label, image, root, mask, "defect" if label else ""),
                             "crop": f"0,{top},{width},{bottom}"})
    if not rows:
        raise LayoutError(f"{folder}: no kosNN/PartK.jpg images (KolektorSDD layout)")
    if strips > 1:
        from sklearn.model_selection import train_test_split

        normal = [r for r in rows if r["label"] == 0]
        if len(normal) >= 2:
            train_part, _ = train_test_split(normal, test_size=0.25, random_state=42)
            for r in train_part:
                r["split"] = "train"
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



