"""Helpers shared by the dataset adapters."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}   # compared lower-case: .JPG, .PNG too


class LayoutError(FileNotFoundError):
    """A dataset folder that is not in the expected official layout."""


def images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; extensions matched case-insensitively."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


def find_mask(folder: Path, stem: str, suffixes: Iterable[str] = ("_mask", "", "_label", "_segmentation",
                                                                    "_Segmentation")) -> Optional[Path]:
    """The mask for image ``stem`` in ``folder``: ``<stem><suffix>.<any image ext>``."""
    if not folder.is_dir():
        return None
    by_stem = {p.stem: p for p in images_in(folder)}
    for suffix in suffixes:
        if stem + suffix in by_stem:
            return by_stem[stem + suffix]
    return None


def require_dir(path: Path, dataset: str, expected: str) -> Path:
    if not path.is_dir():
        raise LayoutError(f"{dataset}: {path} is not a folder; expected the official layout: {expected}. "
                          f"See `adaclip sources` for where to get the data and where to put it.")
    return path


def row(dataset, category, split, label, image: Path, root: Path, mask: Optional[Path] = None,
        defect_type: str = "") -> dict:
    """A manifest row with paths relative to the data root."""
    return dict(dataset=dataset, category=category, split=split, label=int(label),
                image=image.relative_to(root).as_posix(),
                mask=mask.relative_to(root).as_posix() if mask is not None else "",
                defect_type=defect_type)
