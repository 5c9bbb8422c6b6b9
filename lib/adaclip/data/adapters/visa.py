"""VisA, original layout, split by the official ``split_csv/1cls.csv``::

    <object>/Data/Images/{Normal,Anomaly}/*.JPG
    <object>/Data/Masks/Anomaly/*.png
    split_csv/1cls.csv   (object, split, label, image, mask; paths relative to the VisA folder)

Defect descriptions come from ``<object>/image_anno.csv`` when present. Masks hold 0/1 or instance
ids (the loader binarises them).
"""
from __future__ import annotations

import csv
from pathlib import Path

from .common import LayoutError, row


def visa_layout(folder: Path, root: Path, dataset: str) -> list[dict]:
    split_file = folder / "split_csv" / "1cls.csv"
    if not split_file.is_file():
        raise LayoutError(f"{split_file} not found; VisA needs the official split file split_csv/1cls.csv "
                          f"(from the VisA release / amazon-science/spot-diff) beside the object folders")
    descriptions = {}
    for anno in folder.glob("*/image_anno.csv"):
        with open(anno, newline="") as f:
            for r in csv.DictReader(f):
                descriptions[r.get("image", "")] = r.get("label", "")
    rows = []
    with open(split_file, newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            label = {"normal": 0, "anomaly": 1}.get(r["label"].strip().lower())
            if label is None:
                raise LayoutError(f"{split_file} row {i + 2}: label {r['label']!r} is not normal/anomaly")
            image = folder / r["image"]
            mask = folder / r["mask"] if r.get("mask") else None
            defect = descriptions.get(r["image"], "anomaly") if label else ""
            rows.append(row(dataset, r["object"], r["split"], label, image, root, mask, defect))
    return rows
