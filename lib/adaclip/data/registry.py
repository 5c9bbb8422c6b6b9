"""The manifests committed in ``data_manifests/`` and the data roots they are relative to.

``regenerate()`` rebuilds them all from the adapters (``make manifests``); a test checks that the
committed files equal what the adapters produce. Installed from a wheel (no repository around the
package), the embedded sample's manifests are built from the adapters when first named
(``"sample/visa.csv"``), and run folders go to ``./results``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .manifest import data_root
from .sample import SAMPLE_ROOT

REPO_ROOT = Path(__file__).resolve().parents[3]
# a source checkout (an editable install) has the package in lib/ beside data_manifests/ and results/
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "lib" / "adaclip").is_dir()
MANIFEST_DIR = REPO_ROOT / "data_manifests"
RESULTS_DIR = REPO_ROOT / "results" if IN_CHECKOUT else Path("results")
RESULTS_ENV = "ADACLIP_RESULTS_DIR"          # where run folders go instead (the tests use a temporary one)
SHARED_ENV = "ADACLIP_SHARED_DATA"

# manifest file (under data_manifests/) -> (adapter, named data root, folder under that root)
COMMITTED = {
    f"{root}/{name}.csv": (name, root, folder)
    for root, folders in {
        "sample": {"mvtec": "mvtec", "visa": "visa", "glass": "glass", "headct": "headct", "kvasir": "kvasir"},
        "shared": {"mvtec": "mvtec", "visa": "visa", "glass": "glass", "headct": "headct", "kvasir": "kvasir_mini"},
    }.items()
    for name, folder in folders.items()
}


def resolve_root(root: Union[str, Path, None]) -> Path:
    """Named roots: ``"sample"`` (embedded), ``"shared"`` (../shared/datasets beside the repo,
    or $ADACLIP_SHARED_DATA); anything else is a path (default $ADACLIP_DATA_ROOT or ./data)."""
    if root == "sample":
        return SAMPLE_ROOT
    if root == "shared":
        return Path(os.environ.get(SHARED_ENV) or REPO_ROOT.parent / "shared" / "datasets")
    return data_root(root)


def results_root() -> Path:
    """The folder that holds run folders: $ADACLIP_RESULTS_DIR, else the repository's results/."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS_DIR)


def resolve_manifest(path: Union[str, Path]) -> Path:
    """A manifest path as given, or relative to data_manifests/ (e.g. ``"sample/mvtec.csv"``). Outside
    a checkout a committed sample manifest is built from its adapter into a cache folder."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    if (MANIFEST_DIR / p).is_file() or p.as_posix() not in COMMITTED:
        return MANIFEST_DIR / p
    return _built(p.as_posix())


def _built(rel: str) -> Path:
    """A committed manifest rebuilt from its adapter (installed without the repository's data_manifests/)."""
    from . import build_manifest, write_manifest

    adapter, root_name, folder = COMMITTED[rel]
    out = Path(os.environ.get("ADACLIP_CACHE") or Path.home() / ".cache" / "adaclip") / "manifests" / rel
    if not out.is_file():
        write_manifest(build_manifest(adapter, resolve_root(root_name), folder=folder), out)
    return out


def regenerate(out_dir: Union[str, Path] = MANIFEST_DIR, skip_missing: bool = True) -> list[Path]:
    """Rebuild every committed manifest whose data root exists; returns the files written."""
    from . import build_manifest, write_manifest

    written = []
    for rel, (adapter, root_name, folder) in COMMITTED.items():
        root = resolve_root(root_name)
        if skip_missing and not (root / folder).exists():
            continue
        written.append(write_manifest(build_manifest(adapter, root, folder=folder), Path(out_dir) / rel))
    return written
