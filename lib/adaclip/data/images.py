"""Reading images and masks as real datasets store them.

Images: grayscale, RGBA, palette and 16-bit files become 8-bit RGB. Masks: 0/1, 0/255, instance
ids, 3-channel and JPEG-compressed masks all become {0, 1}: any non-zero pixel is anomalous,
except in lossy (JPEG) masks, whose compression noise is cut at half the range.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

LOSSY = (".jpg", ".jpeg")


class ImageError(ValueError):
    """An image or mask file that cannot be used; names the file."""


def open_checked(path: Path, what: str, load: bool = True) -> Image.Image:
    """Open an image file, or raise ImageError naming it: missing, empty, or not decodable.
    ``load=False`` reads the header only (fast checks)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{what} {path} does not exist (is the data root right?)")
    if path.stat().st_size == 0:
        raise ImageError(f"{what} {path} is empty; re-download it or drop its manifest row")
    try:
        im = Image.open(path)
        if load:
            im.load()
        return im
    except Exception as e:
        raise ImageError(f"{what} {path} cannot be decoded ({type(e).__name__}: {e}); re-download it") from e


def load_image(path) -> Image.Image:
    """Any image file -> 8-bit RGB PIL image."""
    im = open_checked(path, "image")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max()
        a = a / hi * 255.0 if hi > 0 else a
        im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    return im if im.mode == "RGB" else im.convert("RGB")


def load_mask(path) -> np.ndarray:
    """Any mask file -> (H, W) uint8 array of {0, 1}."""
    im = open_checked(path, "mask")
    a = np.asarray(im)
    if a.ndim == 3:
        a = a.max(axis=2)                     # RGB / RGBA masks: anomalous in any channel
    if Path(path).suffix.lower() in LOSSY:
        hi = 65535 if a.dtype == np.uint16 else 255
        return (a > hi // 2).astype(np.uint8)
    return (a > 0).astype(np.uint8)


def parse_crop(crop: str) -> Optional[tuple[int, int, int, int]]:
    """A manifest ``crop`` value ``"x0,y0,x1,y1"`` (pixels, PIL box) -> tuple; ``""`` -> None."""
    if crop is None or crop != crop or crop == "":       # empty, None or NaN (concatenated manifests)
        return None
    try:
        box = tuple(int(v) for v in str(crop).split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or box[0] < 0 or box[1] < 0 or box[2] <= box[0] or box[3] <= box[1]:
        raise ImageError(f"crop {crop!r} is not 'x0,y0,x1,y1' with 0 <= x0 < x1 and 0 <= y0 < y1")
    return box


def check_crop(crop: str, size: tuple[int, int], what: str) -> None:
    box = parse_crop(crop)
    if box is not None and (box[2] > size[0] or box[3] > size[1]):
        raise ImageError(f"crop {crop} lies outside {what}, which is {size[0]}x{size[1]}")


def load_row(root: Union[str, Path], row) -> tuple[Image.Image, np.ndarray]:
    """One manifest row's (a Series or dict: ``image``, ``mask``, optional ``crop``) image, 8-bit RGB,
    and mask, (H, W) {0, 1} (zeros when ``mask`` is empty), checked to be the same size and cut to
    ``crop`` when the row has one (KolektorSDD strips)."""
    root = Path(root)
    image, mask, crop = row["image"], row.get("mask", ""), row.get("crop", "")
    im = load_image(root / image)
    if mask:
        m = load_mask(root / mask)
        if m.shape != (im.height, im.width):
            raise ImageError(f"mask {mask} is {m.shape[1]}x{m.shape[0]} but image {image} is "
                             f"{im.width}x{im.height}")
    else:
        m = np.zeros((im.height, im.width), np.uint8)
    box = parse_crop(crop)
    if box is not None:
        check_crop(crop, im.size, f"image {image}")
        im, m = im.crop(box), m[box[1]:box[3], box[0]:box[2]]
    return im, m
