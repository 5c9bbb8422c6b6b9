"""Data: manifests, dataset adapters, loading, the embedded sample and synthetic data."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import pandas as pd

from .adapters import ADAPTERS
from .images import ImageError, load_image, load_mask, load_row
from .manifest import (COLUMNS, DATA_ROOT_ENV, ManifestError, check, check_disjoint, counts, data_root,
                       make_manifest, pixel_annotated, read_manifest, read_manifests, validate, write_manifest)


def build_manifest(dataset: str, root: Union[str, Path, None] = None, folder: Optional[str] = None,
                   name: Optional[str] = None, **adapter_kwargs) -> pd.DataFrame:
    """Read dataset ``dataset`` in its official layout under ``root/folder`` into a manifest.

    ``folder`` defaults to the adapter's usual folder name (``mvtec``, ``visa``, ...); ``name`` is
    the value of the manifest's ``dataset`` column (default: ``dataset``). For your own data use
    ``dataset="folder"`` with ``folder=`` the folder (see adapters/folder.py).
    """
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown dataset {dataset!r}; adapters exist for {sorted(ADAPTERS)}")
    fn, default_folder = ADAPTERS[dataset]
    if folder is None and default_folder is None:
        raise ValueError(f"dataset {dataset!r} needs folder=<path relative to the data root>")
    root = data_root(root)
    rows = fn(root / (folder or default_folder), root, name or (dataset if dataset != "folder" else Path(folder).name),
              **adapter_kwargs)
    return make_manifest(rows)


def __getattr__(name: str):
    # the torch Dataset on first use: manifests and adapters need no torch
    if name == "AnomalyDataset":
        from .dataset import AnomalyDataset

        return AnomalyDataset
    raise AttributeError(f"module 'adaclip.data' has no attribute {name!r}")


__all__ = ["ADAPTERS", "AnomalyDataset", "COLUMNS", "DATA_ROOT_ENV", "ImageError", "ManifestError", "build_manifest",
           "check", "check_disjoint", "counts", "data_root", "load_image", "load_mask", "load_row", "make_manifest",
           "pixel_annotated", "read_manifest", "read_manifests", "validate", "write_manifest"]
