"""Several processes through torch.distributed, as torchrun starts them.

    torchrun --nproc-per-node 4 -m adaclip.cli train ...      # or evaluate, or the library functions

`init_from_env` joins the process group torchrun describes (``nccl`` on GPUs, ``gloo`` on CPU) with
a timeout, so a rank that dies makes the others fail instead of waiting forever. Training wraps the
model in DistributedDataParallel (only the learnable parameters take part: CLIP is frozen) and gives
each rank a disjoint shard; evaluation shards the manifest and sums the results. Rank 0 alone writes
files. Without torchrun (one process) every helper here is a no-op.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

TIMEOUT_ENV = "ADACLIP_DIST_TIMEOUT"     # seconds a collective may wait for the slowest rank


def init_from_env(timeout_s: Optional[float] = None) -> bool:
    """Join the process group that torchrun's environment describes; True when running distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    seconds = timeout_s or float(os.environ.get(TIMEOUT_ENV, "900"))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=seconds))
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def default_device() -> torch.device:
    """This rank's GPU under torchrun, else the first GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if active() else 0)
    return torch.device("cpu")


def sum_array(a: np.ndarray) -> np.ndarray:
    """Element-wise sum of ``a`` over the ranks (int64 sums are exact)."""
    return _all_reduce(a, dist.ReduceOp.SUM if active() else None)


def min_array(a: np.ndarray) -> np.ndarray:
    """Element-wise minimum of ``a`` over the ranks."""
    return _all_reduce(a, dist.ReduceOp.MIN if active() else None)


def _all_reduce(a: np.ndarray, op) -> np.ndarray:
    if not active():
        return a
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dist.get_backend() == "nccl":
        t = t.to(default_device())
    dist.all_reduce(t, op=op)
    return t.cpu().numpy()


def mean_scalar(x: float) -> float:
    """The mean of ``x`` over the ranks (for logging)."""
    if not active():
        return x
    return float(sum_array(np.array([x], np.float64))[0]) / world_size()


def shard(n: int) -> list[int]:
    """This rank's rows of ``n``: every world_size-th, starting at its rank (disjoint, all covered)."""
    return list(range(rank(), n, world_size()))
