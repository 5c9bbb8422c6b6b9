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

# the cores shared out between pytest-xdist's workers (one thread each on 2 cores with -n 2); the results
# must not depend on it (tolerances are set by what float reordering can do, never by one thread count)
# (ADACLIP_TEST_THREADS=N forces N, to check exactly that)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
torch.set_num_threads(int(os.environ.get("ADACLIP_TEST_THREADS") or max(1, _CORES // _WORKERS)))


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


def pytest_collection_modifyitems(items):
    """The slow tests (papermill, torchrun, the wheel) first: pytest-xdist's workers start them at once
    and fill the rest of the time with the short ones, instead of ending on a long tail."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than the cores this process may use (kernels and subprocesses start
    and wait; on 2 cores 3 workers took 6.9 min, 2 took 7.6), at most 4 (each holds torch and models)."""
    return max(1, min(_CORES + 1, 4))
