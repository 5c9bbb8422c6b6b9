"""Shared fixtures: tiny randomly initialised backbones built through the normal open_clip path."""
import os

# before torch / huggingface_hub are imported: CPU only, never touch the network
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from adaclip import AdaCLIP, AdaCLIPConfig  # noqa: E402

torch.set_num_threads(2)


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
