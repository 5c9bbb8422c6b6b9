"""Medical datasets in their original layouts.

Image-level only (no masks; pixel metrics skip them):
    HeadCT     head_ct/NNN.png + labels.csv (id, hemorrhage)          (Kaggle "Head CT - hemorrhage";
               its zip nests the images once more: head_ct/head_ct/NNN.png beside labels.csv)
    BrainMRI   {no,yes}/*.jpg                                         (Kaggle "Brain MRI Images for Brain Tumor Detection")
    Br35H      {no,yes}/*.jpg                                         (Kaggle "Br35H :: Brain Tumor Detection 2020")
Segmentation sets (every image anomalous; image-level metrics are undefined there):
    ISIC 2016  ISBI2016_ISIC_Part1_{Test,Training}_Data/ISIC_n.jpg + ..._GroundTruth/ISIC_n_Segmentation.png
    CVC-ColonDB, Kvasir-SEG   images/ + masks/ (same file names)
    CVC-ClinicDB  Original/ + "Ground Truth"/ (.tif; the PNG/ sub-folder of the Kaggle copy too)
    TN3K       {trainval,test}-image/ + {trainval,test}-mask/
Category names follow the reference code (they fill the text prompts).
"""
from __future__ import annotations

import csv
from pathlib import Path

from .common import LayoutError, find_mask, images_in, row


def _find(folder: Path, pattern: str, what: str) -> Path:
    hits = sorted(folder.rglob(pattern)) if folder.is_dir() else []
    if not hits:
        raise LayoutError(f"{folder}: no {pattern} found; expected {what}")
    return hits[0]


def headct_layout(folder: Path, root: Path, dataset: str, category: str = "headct") -> list[dict]:
    labels = _find(folder, "labels.csv", "head_ct/NNN.png with labels.csv (id, hemorrhage)")
    images_dir = labels.parent / "head_ct"
    if not images_in(images_dir) and images_in(images_dir / "head_ct"):
        images_dir = images_dir / "head_ct"          # as the Kaggle download unpacks
    rows = []
    with open(labels, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader)]
        if header[:2] != ["id", "hemorrhage"]:
            raise LayoutError(f"{labels}: header {header} is not 'id, hemorrhage'")
        for i, (ident, hem) in enumerate((r[0], r[1]) for r in reader if r):
            image = images_dir / f"{int(ident):03d}.png"
            if not image.is_file():
                continue  # subsets keep labels.csv whole; rows without a file are skipped
            label = int(hem.strip())
            rows.append(row(dataset, category, "test", label, image, root, None, "hemorrhage" if label else ""))
    if not rows:
        raise LayoutError(f"{images_dir}: none of the images listed in {labels} exist")
    return rows


def no_yes_layout(folder: Path, root: Path, dataset: str, category: str) -> list[dict]:
    no = _find(folder, "no", "no/ and yes/ folders of images")
    yes = no.parent / "yes"
    if not yes.is_dir():
        raise LayoutError(f"{yes} missing; expected no/ and yes/ side by side")
    return [row(dataset, category, "test", label, image, root, None, "tumor" if label else "")
            for label, d in ((0, no), (1, yes)) for image in images_in(d)]


def paired_layout(folder: Path, root: Path, dataset: str, category: str, pairs, mask_suffixes=("",)) -> list[dict]:
    """Every image anomalous, its mask in a parallel folder. pairs: [(image dir, mask dir, split)]."""
    rows = []
    for image_dir, mask_dir, split in pairs:
        for image in images_in(folder / image_dir):
            mask = find_mask(folder / mask_dir, image.stem, mask_suffixes)
            if mask is None:
                raise LayoutError(f"{image}: no mask named like it in {folder / mask_dir}")
            rows.append(row(dataset, category, split, 1, image, root, mask, category))
    if not rows:
        raise LayoutError(f"{folder}: no images in {[p[0] for p in pairs]}")
    return rows


def isic_layout(folder, root, dataset):
    pairs = [(d.relative_to(folder), Path(str(d.relative_to(folder)).replace("_Data", "_GroundTruth")),
              "test" if "Test" in d.name else "train")
             for d in sorted(folder.glob("ISBI2016_ISIC_Part1_*_Data"))]
    if not pairs:
        raise LayoutError(f"{folder}: no ISBI2016_ISIC_Part1_{{Test,Training}}_Data folders (ISIC 2016 layout)")
    return paired_layout(folder, root, dataset, "isic", pairs, ("_Segmentation", ""))


def colondb_layout(folder, root, dataset):
    return paired_layout(folder, root, dataset, "ColonDB", [("images", "masks", "test")])


def kvasir_layout(folder, root, dataset):
    return paired_layout(folder, root, dataset, "kvasir", [("images", "masks", "test")])


def clinicdb_layout(folder, root, dataset):
    base = folder / "PNG" if (folder / "PNG" / "Original").is_dir() else folder
    return paired_layout(base, root, dataset, "ClinicDB", [("Original", "Ground Truth", "test")])


def tn3k_layout(folder, root, dataset):
    pairs = [(f"{s}-image", f"{s}-mask", "train" if s == "trainval" else "test") for s in ("trainval", "test")
             if (folder / f"{s}-image").is_dir()]
    return paired_layout(folder, root, dataset, "tn3k", pairs)
