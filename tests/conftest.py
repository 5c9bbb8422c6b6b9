"""Shared fixtures: tiny randomly initialised backbones built through the normal open_clip path."""
import os

# before torch / huggingface_hub are imported: CPU only, never touch the network (test_gpu.py runs
# its checks in a subprocess that sees the GPUs this process was given)
CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from adaclip import AdaCLIP, AdaCLIPConfig  # noqa: E402
from adaclip.data.registry import RESULTS_DIR, RESULTS_ENV  # noqa: E402

torch.set_num_threads(2)


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.is_dir() else []


@pytest.fixture(scope="session", autouse=True)
def results_in_tmp(tmp_path_factory):
    """Run folders go to a temporary folder; the repository's results/ must come out untouched."""
    before = _listing(RESULTS_DIR)
    path = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RESULTS_ENV, str(path))
        yield path
    written = sorted(set(_listing(RESULTS_DIR)) - set(before))
    assert not written, f"tests wrote into the repository's results/: {written[:5]}"


@pytest.fixture(scope="session")
def tiny_cfg() -> AdaCLIPConfig:
    return AdaCLIPConfig.tiny()


@pytest.fixture()
def tiny_model(tiny_cfg) -> AdaCLIP:
    torch.manual_seed(0)
    return AdaCLIP.from_config(AdaCLIPConfig.from_dict(tiny_cfg.to_dict())).eval()


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
