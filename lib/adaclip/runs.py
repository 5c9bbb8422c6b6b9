"""Run folders: ``results/<run>/`` with a ``config.json`` that says exactly what was run."""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Union

from .io import write_json

BASELINE_DIR = "baselines"     # results/<run>/baselines/<method>/: the baselines the pipeline runs beside a run
RANDOM_WEIGHTS = "random backbone weights: these numbers say nothing about detection quality"
PACKAGES = ("adaclip", "torch", "torchvision", "open_clip_torch", "numpy", "scikit-learn", "scipy", "pandas", "papermill")


def environment() -> dict:
    """Python, package versions and device: enough to reproduce or to explain a difference."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch                     # here: the pipeline and sweep runners import this module without torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"python": platform.python_version(), "platform": platform.platform(), "device": device, "packages": versions}


def update_config(run_dir: Union[str, Path], **sections) -> Path:
    """Merge ``sections`` into ``run_dir/config.json`` (atomically), adding the environment."""
    path = Path(run_dir) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.update(sections)
    config["environment"] = environment()
    write_json(path, config)
    return path


def weights_note(model) -> dict:
    return {"backbone_weights": "random" if model.random_weights else str(model.cfg.backbone.pretrained),
            "warning": RANDOM_WEIGHTS if model.random_weights else ""}
