"""DataLoaders that keep the model fed: worker processes by default, pinned memory on CUDA, and
training's per-epoch order through one persistent loader.

Workers decode, resize, normalise and (for evaluation) label AUPRO's regions while the model runs.
Every item depends only on its index (and training's on (seed, epoch, index)), so the number of
workers never changes a result (tested).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from .. import distributed as dist

MAX_WORKERS = 8
# below this much serial input work (seconds), starting workers costs more than they save: a small
# evaluation (the embedded sample, a test) runs in the main process
MIN_WORK_S = 1.0


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_workers(num_workers: Optional[int], batches: Optional[int] = None, work_s: Optional[float] = None) -> int:
    """``num_workers`` as configured, or when None one per core this process may use (at most
    MAX_WORKERS; none on a single core), never more than there are batches to overlap with the
    first one (a single batch gains nothing from a worker), and none when the whole input would take
    the main process less than MIN_WORK_S (``work_s``, from `input_seconds`)."""
    if num_workers is not None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or None (automatic), got {num_workers}")
        return int(num_workers)
    if work_s is not None and work_s < MIN_WORK_S:
        return 0
    cores = available_cores()
    n = 0 if cores <= 1 else min(MAX_WORKERS, cores)
    return n if batches is None else max(0, min(n, batches - 1))


def input_seconds(dataset: Dataset, index, items: int) -> float:
    """About how long the main process would take to load ``items`` items: one (``dataset[index]``)
    timed, times ``items``. A first read from disk only makes it larger, never hides work."""
    start = time.perf_counter()
    dataset[index]
    return (time.perf_counter() - start) * items


def loader_options(workers: int, device: torch.device, persistent: bool = False) -> dict:
    """DataLoader keywords: pinned memory for asynchronous copies to a GPU, prefetching workers."""
    options = {"num_workers": workers, "pin_memory": torch.device(device).type == "cuda"}
    if workers:
        options.update(persistent_workers=persistent, prefetch_factor=4)
    return options


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """torch's intra-op thread count set to ``n`` inside the block (None: left as it is).

    On the CPU, while loader workers hold the cores, the loop's own small ops (normalising, metric
    updates) run best on one thread: several threads meeting at a barrier on oversubscribed cores
    wait for each other to be scheduled. The model's forward keeps all of them."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class EpochSampler(Sampler):
    """Yields ``(epoch, index)``: the order of each epoch drawn from (seed, epoch) (under torchrun
    each rank its disjoint shard, as `DistributedSampler`), the epoch passed on to the dataset for
    its random draws. Call `set_epoch` before iterating; a persistent loader reads it each epoch.
    ``shard``: (rank, world size) of a distributed run (`training_loader` passes torchrun's)."""

    def __init__(self, size: int, seed: int, shard: Optional[tuple[int, int]] = None):
        self.seed, self.epoch = seed, 0
        if shard is not None:
            rank, world = shard
            self.inner = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        else:
            self.generator = torch.Generator()
            self.inner = RandomSampler(range(size), generator=self.generator)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.inner, DistributedSampler):
            self.inner.set_epoch(epoch)
        else:
            self.generator.manual_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def training_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: Optional[int],
                    device: torch.device, distributed: bool = False, work_s: Optional[float] = None) -> DataLoader:
    """One loader for all epochs of a stage (workers persist, with their decoded-image caches):
    ``loader.sampler.set_epoch(e)`` before each epoch. ``work_s``: as `resolve_workers`."""
    sampler = EpochSampler(len(dataset), seed, (dist.rank(), dist.world_size()) if distributed else None)
    workers = resolve_workers(num_workers, -(-len(sampler) // batch_size), work_s)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      **loader_options(workers, device, persistent=True))
