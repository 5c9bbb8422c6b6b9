"""A torch Dataset over manifest rows: image tensors at the model's size, binary masks."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ..metrics import region_weights
from .cache import ImageCache, file_key, resize_pair
from .images import ImageError, load_row
from .manifest import ManifestError, pixel_annotated


class AnomalyDataset(Dataset):
    """Items: dict(image (3, S, S), mask (S, S) uint8 {0, 1}, label, class_name, has_mask, index).

    ``has_mask`` is False for rows without pixel ground truth (image-level datasets such as
    HeadCT), so pixel metrics can skip them instead of scoring them as all-normal.
    ``aug_rate``: probability of a 2x2 mosaic (reference option, from APRIL-GAN): the item's own image
    top left and three other images of its category, each resized to the item's size, masks tiled
    alike; the mosaic is anomalous if any tile is. (The reference tiles four random images of the
    category and keeps the drawn item's label, which need not describe them.) Its draws depend on
    (seed, epoch, index) only, so any number of loader workers gives the same batches: index items
    with ``(epoch, i)`` (training's sampler does) or plain ``i`` (epoch 0).
    ``regions``: also AUPRO's `region_weights` of the mask (labelled here, in the loader workers,
    instead of in the evaluation loop; batch with `collate`). ``cache``: an `ImageCache` of decoded,
    resized images (training epochs after the first).
    """

    def __init__(self, manifest: pd.DataFrame, root: Union[str, Path], transform: Callable,
                 image_size: int, aug_rate: float = 0.0, seed: int = 0, regions: bool = False,
                 cache: Optional[ImageCache] = None):
        self.df = manifest.reset_index(drop=True)
        self.rows = self.df.to_dict("records")             # plain dicts: a pandas row lookup per item costs more
        self.root = Path(root)
        self.transform, self.size = transform, image_size
        self.aug_rate, self.seed = aug_rate, seed
        self.regions, self.cache = regions, cache
        annotated = pixel_annotated(self.df) if len(self.df) else {}
        self.has_mask = [bool(r.mask) or (r.label == 0 and annotated.get(r.dataset, False))
                         for r in self.df.itertuples()]

    def __len__(self) -> int:
        return len(self.df)

    def _load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        row = self.rows[i]
        where = f"{self.df.attrs.get('path', 'manifest')} row {i + 2}"
        try:
            return load_row(self.root, row)
        except ImageError as e:
            raise ManifestError(f"{where}: {e}") from e

    def _resized(self, i: int) -> tuple[Image.Image, Image.Image]:
        """Row i's image and mask at (S, S), from the cache when it holds them."""
        key = None
        if self.cache is not None and self.cache.mode != "off":
            try:
                key = file_key(self.root, self.rows[i], self.size)
            except OSError:
                key = None                                     # a missing file: _load names it below
            hit = self.cache.get(i, key) if key else None
            if hit is not None:
                return hit
        image, mask = resize_pair(*self._load(i), self.size)
        if key:
            self.cache.put(i, key, image, mask)
        return image, mask

    def _mosaic(self, i: int, rng: random.Random) -> tuple[Image.Image, np.ndarray, int]:
        # the item itself, then three other images of its category (drawn with replacement only
        # when the category has fewer than three others)
        others = [j for j in self.df.index[self.df["category"] == self.df.at[i, "category"]] if j != i]
        picks = [i] + (rng.sample(others, 3) if len(others) >= 3 else rng.choices(others or [i], k=3))
        tiles = [self._load(j) for j in picks]
        w, h = tiles[0][0].size
        canvas, mask = Image.new("RGB", (2 * w, 2 * h)), np.zeros((2 * h, 2 * w), np.uint8)
        for k, (im, m) in enumerate(tiles):
            x, y = (k % 2) * w, (k // 2) * h
            canvas.paste(im.resize((w, h)), (x, y))
            mask[y:y + h, x:x + w] = np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST))
        return canvas, mask, int(self.df.loc[picks, "label"].max())

    def __getitem__(self, index) -> dict:
        epoch, i = index if isinstance(index, tuple) else (0, index)
        row = self.rows[i]
        rng = random.Random(f"{self.seed}/{epoch}/{i}") if self.aug_rate > 0 else None
        if rng is not None and rng.random() < self.aug_rate:
            image, mask, label = self._mosaic(i, rng)
            image, mask = resize_pair(image, mask, self.size)
        else:
            image, mask = self._resized(i)
            label = int(row["label"])
        mask = np.asarray(mask) > 127
        item = {
            "image": self.transform(image),
            "mask": torch.from_numpy(mask.astype(np.uint8)),
            "label": label,
            "class_name": row["category"],
            "has_mask": self.has_mask[i],
            "index": i,
        }
        if self.regions:
            pixels, weights, n = region_weights(mask)
            item["regions"] = (pixels, weights, n)     # numpy: pickled with the batch, no shared-memory handle each
        return item


def collate(items: list[dict]) -> dict:
    """`default_collate`, but each item's ``regions`` (of its own length) kept in a list."""
    regions = [item.pop("regions") for item in items] if "regions" in items[0] else None
    batch = default_collate(items)
    if regions is not None:
        batch["regions"] = regions
    return batch
