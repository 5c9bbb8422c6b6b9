"""The embedded sample: a few real images per dataset, downscaled, in the official layouts.

It lives in ``lib/adaclip/data/sample/`` (see its README for provenance and licences) and is the
data root of ``make run``. ``build_sample`` regenerates it from the shared development subsets.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Union

from PIL import Image

SAMPLE_ROOT = Path(__file__).parent / "sample"
MAX_SIDE = 256

# images taken from MVTec-layout folders; their masks follow the layout (VisA, HeadCT and
# Kvasir are picked from their split / label files below)
_PICKS = {
    "mvtec": [f"bottle/test/good/{i:03d}.png" for i in range(6)]
             + [f"bottle/test/{t}/{i:03d}.png" for t in ("broken_large", "broken_small", "contamination")
                for i in range(3)],
    "glass": [f"test/good/{i:03d}.png" for i in range(4)] + [f"test/{t}/{i:03d}.png" for t in ("angle", "edge")
                                                            for i in range(3)],
}


def _downscale(src: Path, dst: Path, mask: bool = False) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        scale = MAX_SIDE / max(im.size)
        if scale < 1:
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(size, Image.NEAREST if mask else Image.BICUBIC)
        kwargs = {"quality": 90} if dst.suffix.lower() in (".jpg", ".jpeg") else {}
        im.save(dst, **kwargs)


def _mvtec_mask(rel: str) -> str:
    """[<category>/]test/<type>/<id>.png -> [<category>/]ground_truth/<type>/<id>_mask.png"""
    *prefix, _, kind, name = rel.split("/")
    return "/".join([*prefix, "ground_truth", kind, name.replace(".png", "_mask.png")])


def build_sample(shared_root: Union[str, Path], dest: Union[str, Path] = SAMPLE_ROOT, per_class: int = 5,
                 train_normals: int = 2) -> Path:
    """Copy a handful of images per dataset from ``shared_root`` into ``dest``, downscaled (VisA also
    ``train_normals`` normal training images per object: few-shot references)."""
    src, dest = Path(shared_root), Path(dest)
    for sub in ("mvtec", "visa", "glass", "headct", "kvasir"):
        shutil.rmtree(dest / sub, ignore_errors=True)
    # MVTec AD bottle and the MVTec-layout GLASS set
    for folder, picks in _PICKS.items():
        for rel in picks:
            _downscale(src / folder / rel, dest / folder / rel)
            if "/good/" not in rel:
                _downscale(src / folder / _mvtec_mask(rel), dest / folder / _mvtec_mask(rel), mask=True)
    shutil.copy(src / "mvtec/bottle/license.txt", dest / "mvtec/bottle/license.txt")
    # VisA: first test rows per object and label of the official split file, and a few train normals
    with open(src / "visa/split_csv/1cls.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keep, seen = [], {}
    for r in rows:
        key = (r["object"], r["split"], r["label"])
        if seen.get(key, 0) < (per_class if r["split"] == "test" else train_normals):
            seen[key] = seen.get(key, 0) + 1
            keep.append(r)
            _downscale(src / "visa" / r["image"], dest / "visa" / r["image"])
            if r["mask"]:
                _downscale(src / "visa" / r["mask"], dest / "visa" / r["mask"], mask=True)
    (dest / "visa/split_csv").mkdir(parents=True, exist_ok=True)
    with open(dest / "visa/split_csv/1cls.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    # HeadCT: first normal and first hemorrhage scans, labels.csv filtered to them
    with open(src / "headct/Dataset/labels.csv", newline="") as f:
        lines = list(csv.reader(f))
    header, body = lines[0], [r for r in lines[1:] if r]
    picked = [r for lab in ("0", "1") for r in [r for r in body if r[1].strip() == lab][:per_class]]
    for r in picked:
        name = f"{int(r[0]):03d}.png"
        _downscale(src / "headct/Dataset/head_ct" / name, dest / "headct/Dataset/head_ct" / name)
    with open(dest / "headct/Dataset/labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + sorted(picked, key=lambda r: int(r[0])))
    # Kvasir-SEG: every image is a polyp; JPEG masks
    for image in sorted((src / "kvasir_mini/images").iterdir())[:per_class]:
        _downscale(image, dest / "kvasir/images" / image.name)
        _downscale(src / "kvasir_mini/masks" / image.name, dest / "kvasir/masks" / image.name, mask=True)
    return dest
