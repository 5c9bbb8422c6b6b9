"""Bootstrap confidence intervals over the test images, for every metric of an evaluation.

Stratified: each replicate draws, per category, as many normal images as the category has (with
replacement, among its normal ones) and as many anomalous ones, so every replicate keeps the
category's class counts. A replicate is a vector of per-image counts (`resample_counts`), seeded by
the run's seed and the category's name alone: two runs on the same images draw the same replicates
(what `compare`'s paired test needs), and so does every rank under torchrun.

- Image metrics: exact. The counts weight the scores (`weighted_metrics`), which equals recomputing
  the metric on the resampled list of images.
- Pixel metrics resample whole images, never pixels, and stream: each image's map is folded into
  per-replicate histograms at a coarse resolution (`PixelReplicates`, ``bins`` thresholds; the state is
  replicates x 3 x bins whatever the number of images), weighted by that image's counts. The cflow AUPRO's
  per-image counts at its 200 thresholds are weighted the same way (`metrics.CflowAupro`).

Every replicate set carries row 0 = every image once (the full test set at the replicates'
resolution), and an interval is the point estimate plus the 2.5% and 97.5% quantiles of the
replicates' deviations from that row (a percentile interval, re-centred on the exact estimate, so the
coarse bins' rounding cancels). Dataset means average their categories' deviations replicate by
replicate (categories are resampled independently). ``bootstrap.npz`` in a run folder keeps the
deviations, so that any later comparison pairs the same replicates.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .metric_keys import METRIC_KEYS

LEVEL = 0.95
PIXEL_BINS = 1024                     # the replicates' histograms: thresholds every 1/1024 of [0, 1]
FILE = "bootstrap.npz"
METHOD = ("stratified bootstrap over test images (normal and anomalous counts kept per category); pixel "
          f"metrics resample whole images, streamed into per-replicate histograms of {PIXEL_BINS} bins; "
          f"{LEVEL:.0%} percentile interval of the replicates' deviations, added to the exact estimate")
IMAGE_KEYS, PIXEL_KEYS = METRIC_KEYS[:3], METRIC_KEYS[3:7]
PathLike = Union[str, Path]


def resample_counts(labels: Sequence[int], replicates: int, seed: int, dataset: str, category: str) -> np.ndarray:
    """(replicates + 1, images) int32: how often each image of a category is drawn in each replicate,
    row 0 every image once. Normal and anomalous images are drawn separately (stratified); the draw
    depends only on ``seed``, the category's name and its images' order and labels."""
    labels = np.asarray(labels).astype(int)
    rng = np.random.default_rng([seed, zlib.crc32(f"{dataset}/{category}".encode())])
    counts = np.ones((replicates + 1, len(labels)), np.int32)
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        if len(idx):
            counts[1:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=replicates)
    return counts


def curve_metrics(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROC (trapezoidal), AP (step-wise, as scikit-learn) and F1-max per row, from cumulative true /
    false positive counts at thresholds from high to low (rows: replicates). NaN where a row has no
    positives or no negatives."""
    P, N = tp[:, -1:], fp[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.c_[np.zeros(len(tp)), tp / P]
        fpr = np.c_[np.zeros(len(fp)), fp / N]
        precision = np.nan_to_num(tp / (tp + fp))                     # 0/0 only where recall does not move
        auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
        ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
        f1 = np.max(2 * tp / (tp + fp + P), axis=1)
    undefined = (P[:, 0] == 0) | (N[:, 0] == 0)
    for v in (auroc, ap, f1):
        v[undefined] = np.nan
    return auroc, ap, f1


def weighted_metrics(labels, scores, counts: np.ndarray) -> dict:
    """{image_auroc, image_ap, image_f1}: one value per row of ``counts`` (replicates x images), each
    the metric of the images drawn that often (ties between scores merged as scikit-learn does)."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], labels[order], counts[:, order].astype(np.float64)
    if not len(s):
        return {k: np.full(len(counts), np.nan) for k in IMAGE_KEYS}
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]                # groups of tied scores
    tp = np.cumsum(np.add.reduceat(w * y, starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(w * (1 - y), starts, axis=1), axis=1)
    return dict(zip(IMAGE_KEYS, curve_metrics(tp, fp)))


class PixelReplicates:
    """One category's pixel histograms in every replicate: (rows, 3 x bins + 1) = normal pixels,
    anomalous pixels and AUPRO's region weights per bin, then the regions' count; row r adds each
    image's histogram times the image's count in replicate r (`resample_counts`). A fixed state,
    however many images; on the device of the maps."""

    FLUSH = 64            # images whose histograms wait to be added together (one matrix product, not 64)

    def __init__(self, counts: np.ndarray, bins: int = PIXEL_BINS, device: Union[str, torch.device] = "cpu"):
        self.bins, self.device = bins, torch.device(device)
        self.width = 3 * bins + 1
        self.counts = torch.as_tensor(counts, dtype=torch.float64, device=self.device)   # (rows, images)
        self._state = torch.zeros(len(counts), self.width, dtype=torch.float64, device=self.device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def state(self) -> torch.Tensor:
        """(rows, 3 x bins + 1), every update added."""
        if self._pending:
            cols = torch.cat([c for c, _ in self._pending])
            hist = torch.cat([h for _, h in self._pending])
            self._pending = []
            self._state.addmm_(self.counts[:, cols], hist)
        return self._state

    @state.setter
    def state(self, value: torch.Tensor) -> None:
        self._pending, self._state = [], value

    def update(self, bins: torch.Tensor, anomalous: torch.Tensor, region_pixels: torch.Tensor,
               region_weights: torch.Tensor, regions: Sequence[int], images: Sequence[int], area: int,
               host: bool = True) -> None:
        """A batch of this category's maps: ``bins`` each pixel's coarse bin (the flattened batch of
        ``len(images)`` maps of ``area`` pixels), ``anomalous`` the flat indices of its anomalous pixels,
        ``region_pixels`` / ``region_weights`` AUPRO's region pixels (flat indices) and their weights,
        ``regions`` each mask's number of regions, ``images`` each map's column in the counts. ``host``:
        count with numpy (CPU tensors; several times faster than torch's bincount there), else torch
        where the tensors are (an accelerator: nothing read back)."""
        n, width = len(images), self.width
        if host:
            key = bins.numpy().astype(np.int64).reshape(n, area) + (np.arange(n, dtype=np.int64) * width)[:, None]
            key = key.reshape(-1)
            counted = np.bincount(key, minlength=n * width).astype(np.float64)          # all as normal
            if len(anomalous):
                moved = np.bincount(key[anomalous.numpy()], minlength=n * width)
                counted -= moved
                counted[self.bins:] += moved[:-self.bins]              # to the anomalous half, same bin
            if len(region_pixels):
                counted += np.bincount(key[region_pixels.numpy()] + 2 * self.bins, weights=region_weights.numpy(),
                                       minlength=n * width)
            hist = torch.from_numpy(counted)
        else:
            offset = torch.arange(n, device=bins.device).repeat_interleave(area) * width
            key = bins.long() + offset
            hist = torch.bincount(key, minlength=n * width).double()                       # all as normal
            if len(anomalous):
                moved = key[anomalous]
                hist -= torch.bincount(moved, minlength=n * width).double()
                hist += torch.bincount(moved + self.bins, minlength=n * width).double()
            if len(region_pixels):
                hist += torch.bincount(key[region_pixels] + 2 * self.bins, weights=region_weights.double(),
                                       minlength=n * width)
        hist = hist.view(n, width)
        hist[:, -1] = torch.as_tensor(list(regions), dtype=torch.float64, device=hist.device)
        cols = torch.as_tensor(list(images), dtype=torch.long, device=self.device)
        self._pending.append((cols, hist.to(self.device)))
        if sum(len(c) for c, _ in self._pending) >= self.FLUSH:
            self.state                                                            # noqa: B018  adds them

    def metrics(self, fpr_limit: float, aupro: bool = True) -> dict:
        """{pixel_auroc, pixel_ap, pixel_f1, pixel_aupro}: one value per row."""
        state = self.state.cpu().numpy()
        b = self.bins
        neg, pos, pro, regions = state[:, :b], state[:, b:2 * b], state[:, 2 * b:3 * b], state[:, -1]
        keep = (neg[0] + pos[0]) > 0                                   # bins that hold pixels at all
        if not keep.any():
            return {k: np.full(len(state), np.nan) for k in PIXEL_KEYS}
        desc = lambda a: np.cumsum(a[:, ::-1][:, keep[::-1]], axis=1)  # noqa: E731  thresholds high to low
        tp, fp = desc(pos), desc(neg)
        auroc, ap, f1 = curve_metrics(tp, fp)
        out = dict(zip(PIXEL_KEYS[:3], (auroc, ap, f1)))
        if aupro:
            with np.errstate(divide="ignore", invalid="ignore"):
                out["pixel_aupro"] = partial_areas(fp / fp[:, -1:], desc(pro) / regions[:, None], fpr_limit) / fpr_limit
        else:
            out["pixel_aupro"] = np.full(len(state), np.nan)
        return out


def partial_areas(fpr: np.ndarray, pro: np.ndarray, limit: float) -> np.ndarray:
    """Per row, the trapezoidal area under pro(fpr) from 0 to ``limit``, interpolated at ``limit``
    (`metrics._partial_area` row by row; fpr ascending along each row, the curve starting at (0, 0))."""
    x, y = np.c_[np.zeros(len(fpr)), fpr], np.c_[np.zeros(len(pro)), pro]
    seg = np.diff(x, axis=1) * (y[:, 1:] + y[:, :-1]) / 2
    area = np.c_[np.zeros(len(x)), np.cumsum(seg, axis=1)]
    rows = np.arange(len(x))
    last = np.minimum((x <= limit).sum(axis=1), x.shape[1]) - 1        # last point inside
    out = area[rows, last]
    beyond = last + 1 < x.shape[1]
    j = np.minimum(last + 1, x.shape[1] - 1)
    x0, y0, x1, y1 = x[rows, last], y[rows, last], x[rows, j], y[rows, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
    extra = np.where(beyond & (x0 < limit), (limit - x0) * (y0 + y_at) / 2, 0.0)
    return out + extra


def deviations(values: np.ndarray) -> np.ndarray:
    """Replicates' deviations from row 0 (the full test set at the replicates' resolution)."""
    return values[1:] - values[0]


def interval(estimate: float, deviation: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """``estimate`` plus the (1 - level) / 2 and (1 + level) / 2 quantiles of the deviations, within
    [0, 1] where every metric lies and never excluding the estimate; NaN when the estimate is
    undefined or no replicate defines it."""
    deviation = deviation[np.isfinite(deviation)]
    if not np.isfinite(estimate) or not len(deviation):
        return np.nan, np.nan
    lo, hi = np.clip(estimate + np.quantile(deviation, [(1 - level) / 2, (1 + level) / 2]), 0.0, 1.0)
    # widened to hold the estimate: at a boundary (an AUROC of 0 or 1, where resamples only add ties)
    # every replicate can lie on one side of it
    return float(min(lo, estimate)), float(max(hi, estimate))


def mean_deviation(parts: list[np.ndarray]) -> np.ndarray:
    """The deviations of an unweighted mean over categories, replicate by replicate (a replicate where
    a category's metric is undefined averages the others, as the mean rows leave undefined values out)."""
    if not parts:
        return np.zeros(0)
    with np.errstate(invalid="ignore"), np.testing.suppress_warnings() as sup:
        sup.filter(RuntimeWarning)
        return np.nanmean(np.stack(parts), axis=0)


def save(path: PathLike, keys: list[tuple[str, str]], table: np.ndarray, replicates: int, seed: int) -> None:
    """``bootstrap.npz``: per category (``keys``) and metric (`METRIC_KEYS`) the replicates' deviations
    (categories x metrics x replicates), with the replicates' number and seed."""
    from .io import atomic_path

    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, keys=np.array(keys, dtype=str).reshape(-1, 2), metrics=np.array(METRIC_KEYS),
                                deviations=table, replicates=replicates, seed=seed)


def load(path: PathLike) -> dict:
    """``bootstrap.npz`` as {(dataset, category): {metric: deviations}} plus its replicates and seed."""
    path = Path(path)
    try:
        with np.load(path) as f:
            keys, metrics, table = f["keys"], list(f["metrics"]), f["deviations"]
            replicates, seed = int(f["replicates"]), int(f["seed"])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable bootstrap file ({e}); evaluate the run again to write it") from e
    per = {(str(d), str(c)): {m: table[i, j] for j, m in enumerate(metrics)} for i, (d, c) in enumerate(keys)}
    return {"categories": per, "replicates": replicates, "seed": seed}


def settings(replicates: int, seed: int) -> dict:
    """What config.json records of the intervals."""
    return {"replicates": replicates, "seed": seed, "level": LEVEL, "pixel_bins": PIXEL_BINS, "method": METHOD}
