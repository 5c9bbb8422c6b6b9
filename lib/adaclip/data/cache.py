"""Decoded, resized training images kept between epochs, so that epoch 2 onwards does not decode again.

An entry is the image after `load_row` (crop included) and the first step of the transform, the
bicubic resize to the model's (S, S), as 8-bit RGB, with its mask resized the same way (nearest).
The transform's own resize then leaves it unchanged (torchvision returns an image already at the
target size as it is), so an item read from the cache equals a fresh decode exactly (tested).
Entries are keyed by the files' paths and modification times, the crop and the size: a file changed
during a run is decoded again.

- ``"memory"``: one block of ``budget_mb`` for the first images of the dataset that fit, allocated
  up front in shared memory when loader workers will fill it (every worker and every epoch sees
  what any worker cached); images beyond the budget are decoded each time.
- ``"disk"``: one ``.npz`` file per entry in ``directory`` (default ``$ADACLIP_CACHE`` or
  ``~/.cache/adaclip/images``), shared by workers, runs and processes; written atomically.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from ..io import atomic_path

MODES = ("off", "memory", "disk")


def default_directory() -> Path:
    return Path(os.environ.get("ADACLIP_CACHE") or Path.home() / ".cache" / "adaclip") / "images"


def resize_pair(image: Image.Image, mask: np.ndarray, size: int) -> tuple[Image.Image, Image.Image]:
    """The image resized as the transform resizes it (bicubic to (S, S)), the mask as the dataset
    does (nearest, 0/255)."""
    image = image.resize((size, size), Image.BICUBIC) if image.size != (size, size) else image
    if not mask.any():                                          # a normal image: nothing to resize
        return image, Image.new("L", (size, size))
    return image, Image.fromarray(mask * 255).resize((size, size), Image.NEAREST)


def file_key(root: Path, row, size: int) -> str:
    """What an entry depends on: the image and mask files (path, modification time), crop, size."""
    parts = [str(size), str(row.get("crop", "") or "")]
    for name in (row["image"], row.get("mask", "") or ""):
        if name:
            path = Path(root) / name
            parts += [str(path.resolve()), str(path.stat().st_mtime_ns)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


class ImageCache:
    """Resized (image, mask) pairs by dataset index; `get` returns None on a miss, `put` stores."""

    def __init__(self, mode: str, items: int, size: int, budget_mb: float = 2048,
                 directory: Optional[Union[str, Path]] = None, shared: bool = False):
        if mode not in MODES:
            raise ValueError(f"image cache must be one of {MODES}, got {mode!r}")
        self.mode, self.size = mode, size
        self.directory = Path(directory) if directory else default_directory()
        self.slots = 0
        if mode == "memory":
            per_item = size * size * 4                         # RGB + mask bytes
            self.slots = int(min(items, budget_mb * 2 ** 20 // per_item))
            if shared and self.slots and not _shared_memory_fits(self.slots * per_item):
                warnings.warn(f"image cache: {self.slots * per_item / 2 ** 20:.0f} MiB do not fit in /dev/shm; "
                              f"caching off (lower train.cache_mb, use image_cache='disk' or num_workers=0)")
                self.slots = 0
            self.pixels = torch.empty((self.slots, size, size, 4), dtype=torch.uint8)
            self.keys = torch.zeros((self.slots, 20), dtype=torch.uint8)          # sha1 of the entry's key
            self.filled = torch.zeros(self.slots, dtype=torch.bool)
            if shared and self.slots:
                for t in (self.pixels, self.keys, self.filled):
                    t.share_memory_()
        elif mode == "disk":
            self.directory.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        return self.directory / str(self.size) / key[:2] / f"{key}.npz"

    def get(self, index: int, key: str) -> Optional[tuple[Image.Image, Image.Image]]:
        if self.mode == "memory":
            if index >= self.slots or not bool(self.filled[index]) or \
                    bytes(self.keys[index].numpy()) != bytes.fromhex(key):
                return None
            a = self.pixels[index].numpy()
            return Image.fromarray(np.ascontiguousarray(a[..., :3])), Image.fromarray(np.ascontiguousarray(a[..., 3]))
        if self.mode == "disk":
            path = self._file(key)
            if not path.is_file():
                return None
            try:
                with np.load(path) as f:
                    return Image.fromarray(f["image"]), Image.fromarray(f["mask"])
            except Exception:                                  # a damaged entry: decode again
                return None
        return None

    def put(self, index: int, key: str, image: Image.Image, mask: Image.Image) -> None:
        if self.mode == "memory" and index < self.slots:
            self.filled[index] = False
            self.pixels[index, ..., :3] = torch.from_numpy(np.array(image))
            self.pixels[index, ..., 3] = torch.from_numpy(np.array(mask))
            self.keys[index] = torch.frombuffer(bytearray.fromhex(key), dtype=torch.uint8)
            self.filled[index] = True                          # last: readers see whole entries only
        elif self.mode == "disk":
            path = self._file(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, image=np.asarray(image), mask=np.asarray(mask))


def _shared_memory_fits(nbytes: int) -> bool:
    try:
        return shutil.disk_usage("/dev/shm").free > nbytes * 1.1
    except OSError:
        return True                                            # no /dev/shm (not Linux): torch uses its own
