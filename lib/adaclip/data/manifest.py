"""CSV manifests: one row per image, paths relative to a data root given at run time.

Columns (see data_manifests/README.md):
    dataset, category, split, label, image, mask, defect_type [, crop]
label is 0 (normal) or 1 (anomalous); mask is empty when the image has no pixel annotation
(normal images of pixel-annotated datasets need none: their mask is all zeros). The optional
``crop`` column ("x0,y0,x1,y1") makes a row one part of its image (KolektorSDD strips).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Union

import pandas as pd

from ..io import write_csv
from .images import ImageError, check_crop, open_checked, parse_crop

COLUMNS = ["dataset", "category", "split", "label", "image", "mask", "defect_type"]
CROP = "crop"           # optional column: only written when some row uses it
DATA_ROOT_ENV = "ADACLIP_DATA_ROOT"


class ManifestError(ValueError):
    """A manifest (or a file it names) that cannot be used; the message says which and why."""


def data_root(root: Union[str, Path, None] = None) -> Path:
    """The data root: the argument, else $ADACLIP_DATA_ROOT, else ./data."""
    return Path(root or os.environ.get(DATA_ROOT_ENV) or "data").expanduser()


def make_manifest(rows: Iterable[dict]) -> pd.DataFrame:
    """Rows -> a manifest DataFrame in canonical column order, sorted for stable files."""
    rows = list(rows)
    cropped = any(r.get(CROP) for r in rows)
    df = pd.DataFrame(rows, columns=COLUMNS + ([CROP] if cropped else []))
    for column in ("mask", "defect_type") + ((CROP,) if cropped else ()):
        df[column] = df[column].fillna("")
    df["label"] = df["label"].astype(int)
    return df.sort_values(["dataset", "category", "split", "image"], kind="stable").reset_index(drop=True)


def columns(df: pd.DataFrame) -> list[str]:
    """The manifest columns of ``df``: the required ones, plus ``crop`` when any row uses it."""
    return COLUMNS + ([CROP] if CROP in df.columns and (df[CROP] != "").any() else [])


def write_manifest(df: pd.DataFrame, path: Union[str, Path]) -> Path:
    write_csv(path, df[columns(df)])
    return Path(path)


def read_manifest(path: Union[str, Path]) -> pd.DataFrame:
    """Read and check the columns and labels of a manifest CSV (files are checked by `validate`)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; build it with `adaclip manifests` "
                            f"or adaclip.data.build_manifest(...)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest {path} lacks column(s) {missing}; expected columns {COLUMNS}")
    bad = [f"row {i + 2}: label {v!r}" for i, v in enumerate(df["label"]) if v.strip() not in ("0", "1")]
    if bad:
        raise ManifestError(f"manifest {path}: labels must be 0 (normal) or 1 (anomalous); " + "; ".join(bad[:10]))
    absolute = [f"row {i + 2}: {p}" for i, p in enumerate(df["image"]) if os.path.isabs(p)]
    if absolute:
        raise ManifestError(f"manifest {path}: paths must be relative to the data root; " + "; ".join(absolute[:10]))
    if CROP in df.columns:
        bad = []
        for i, c in enumerate(df[CROP]):
            try:
                parse_crop(c)
            except ImageError as e:
                bad.append(f"row {i + 2}: {e}")
        if bad:
            raise ManifestError(f"manifest {path}: " + "; ".join(bad[:10]))
    df["label"] = df["label"].astype(int)
    df.attrs["path"] = str(path)
    df.attrs["paths"] = [str(path)]
    return df


def read_manifests(paths: Union[str, Path, Iterable[Union[str, Path]]]) -> pd.DataFrame:
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    df = pd.concat([read_manifest(p) for p in paths], ignore_index=True)
    if CROP in df.columns:
        df[CROP] = df[CROP].fillna("")
    df.attrs = {"path": ", ".join(map(str, paths)), "paths": [str(p) for p in paths]}
    return df


def pixel_annotated(df: pd.DataFrame) -> pd.Series:
    """Per dataset: True when its anomalous images come with masks (pixel metrics make sense)."""
    return df.groupby("dataset")["mask"].apply(lambda m: bool((m != "").any()))


def validate(df: pd.DataFrame, root: Union[str, Path], deep: bool = True, workers: int = 8) -> list[str]:
    """Every problem in a manifest, as readable lines (empty list: all good).

    Checks labels, that each image and mask exists, is non-empty and decodes (``deep``), that
    mask and image sizes agree, and that anomalous images of pixel-annotated datasets have masks.
    Files are checked by a thread pool (decoding releases the GIL); problems stay in row order.
    """
    root = Path(root)
    name = df.attrs.get("path", "manifest")
    annotated = pixel_annotated(df) if len(df) else {}

    def check_row(item) -> list[str]:
        i, row = item
        where, problems = f"{name} row {i + 2}", []
        if str(row.label) not in ("0", "1"):
            problems.append(f"{where}: label {row.label!r} is not 0 or 1")
        size = _check_file(root / row.image, f"{where}: image", deep, problems)
        crop = getattr(row, CROP, "")
        if size and crop:
            try:
                check_crop(crop, size, f"image {row.image}")
            except ImageError as e:
                problems.append(f"{where}: {e}")
        if row.mask:
            msize = _check_file(root / row.mask, f"{where}: mask", deep, problems)
            if size and msize and size != msize:
                problems.append(f"{where}: mask {row.mask} is {msize[0]}x{msize[1]} but image {row.image} is "
                                f"{size[0]}x{size[1]}; masks must match their image")
        elif str(row.label) == "1" and annotated.get(row.dataset, False):
            problems.append(f"{where}: anomalous image {row.image} has no mask although dataset "
                            f"{row.dataset} is pixel-annotated")
        return problems

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        per_row = pool.map(check_row, enumerate(df.itertuples(index=False)))
        return [p for problems in per_row for p in problems]


def check(df: pd.DataFrame, root: Union[str, Path], deep: bool = True) -> None:
    """Raise ManifestError listing every problem that `validate` finds."""
    problems = validate(df, root, deep)
    if problems:
        raise ManifestError(f"{len(problems)} problem(s) with the data under {root}:\n  " + "\n  ".join(problems))


def _check_file(path: Path, what: str, deep: bool, problems: list) -> Optional[tuple]:
    """The file's size, or None after adding the loader's own error to ``problems``."""
    try:
        with open_checked(path, what, load=deep) as im:
            return im.size
    except ImageError as e:
        problems.append(str(e))
        return None


def check_disjoint(train: pd.DataFrame, test: pd.DataFrame, allow_overlap: bool = False) -> None:
    """Zero-shot means unseen data: refuse train/test manifests that share an image."""
    shared = sorted(set(_row_keys(train)) & set(_row_keys(test)))
    if shared and not allow_overlap:
        raise ManifestError(f"{len(shared)} image(s) are in both the training and the test manifests "
                            f"(e.g. {shared[:3]}); zero-shot evaluation needs unseen data. Pass "
                            f"allow_overlap=True only if you mean it.")


def _row_keys(df: pd.DataFrame) -> list[str]:
    """What a row shows: its image, or the part of it that ``crop`` cuts out."""
    if CROP not in df.columns:
        return list(df["image"])
    return [f"{image}[{crop}]" if crop else image for image, crop in zip(df["image"], df[CROP])]


def counts(df: pd.DataFrame) -> pd.DataFrame:
    """Images per dataset / category / split / label, with a mask count."""
    g = df.assign(has_mask=df["mask"] != "").groupby(["dataset", "category", "split", "label"])
    return g.agg(images=("image", "size"), masks=("has_mask", "sum")).reset_index()

