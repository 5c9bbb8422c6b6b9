"""Image and pixel metrics: AUROC, AP, F1-max, and AUPRO (MVTec AD's per-region overlap), plus the
"cflow-style" AUPRO that AnomalyCLIP and Crane publish (`CflowAupro`, ``pixel_aupro_cflow``).

Image level uses scikit-learn directly. Pixel level streams: each image's map is folded into
fixed histograms over [0, 1] (``bins`` thresholds), so a whole dataset's maps never sit in memory
and AUROC / AP / F1-max / AUPRO come from cumulative counts (ties within a bin are merged; with
the default 2^20 bins the results agree with the exact computations to ~1e-6).

Undefined cases (one class only, no masks) give NaN with a reason in ``notes``, never an exception.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from .metric_keys import METRIC_KEYS

if TYPE_CHECKING:
    from .bootstrap import PixelReplicates

NAN = float("nan")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)   # regions as in the MVTec AD evaluation code


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over thresholds and the threshold that gives it (scikit-learn PR curve)."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = np.nan_to_num(f1[:-1], nan=0.0)       # the last PR point has no threshold
    i = int(np.argmax(f1))
    return float(f1[i]), float(thresholds[i])


def image_metrics(labels, scores) -> tuple[dict, list]:
    """{'image_auroc', 'image_ap', 'image_f1', 'image_threshold'} and notes on undefined values."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    keys = ("image_auroc", "image_ap", "image_f1", "image_threshold")
    if len(labels) == 0 or labels.min() == labels.max():
        which = "no images" if len(labels) == 0 else ("only anomalous images" if labels.min() else "only normal images")
        return dict.fromkeys(keys, NAN), [f"image metrics undefined: {which}"]
    f1, thr = f1_max(labels, scores)
    return dict(image_auroc=float(roc_auc_score(labels, scores)), image_ap=float(average_precision_score(labels, scores)),
                image_f1=f1, image_threshold=thr), []


def _tensor(x) -> torch.Tensor:
    """A tensor from a tensor or any array-like (read-only numpy arrays copied, not aliased)."""
    if isinstance(x, torch.Tensor):
        return x
    x = np.asarray(x)
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def _flat_regions(regions: list, area: int, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's `region_weights` as one pair: the anomalous pixels' indices into the flattened batch
    (images of ``area`` pixels) and their float64 weights. ``pin``: in page-locked memory (when CUDA
    is present), so that the copy to the device need not wait (a plain host tensor's copy does)."""
    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty(sum(len(p) for p in parts), dtype=parts[0].dtype, pin_memory=pin and torch.cuda.is_available())
        return torch.cat(parts, out=out)

    return (cat([_tensor(p).reshape(-1) + j * area for j, (p, _, _) in enumerate(regions)]),
            cat([_tensor(w).reshape(-1).double() for _, w, _ in regions]))


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A mask's 8-connected anomalous regions as AUPRO counts them: the flat indices of its anomalous
    pixels (int64, ascending), each one's 1 / (its region's size) (float64), and the number of
    regions. Run on the CPU (the loader workers compute it beside decoding:
    `AnomalyDataset(regions=True)`); small to pass on, since only anomalous pixels are listed.
    Labelled within the anomalous pixels' bounding box (the same regions, a fraction of the work)."""
    mask = np.asarray(mask) > 0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.float64), 0
    y0, x0 = rows[0], cols[0]
    labelled, n = ndimage.label(mask[y0:rows[-1] + 1, x0:cols[-1] + 1], structure=_EIGHT_CONNECTED)
    ys, xs = np.nonzero(labelled)
    sizes = np.bincount(labelled.ravel())                          # sizes[0] = background
    pixels = (ys + y0).astype(np.int64) * mask.shape[1] + (xs + x0)
    return pixels, 1.0 / sizes[labelled[ys, xs]], int(n)


@dataclass
class PixelAccumulator:
    """Streams (map, mask) pairs into histograms; `compute()` gives the pixel metrics.

    The histograms live on ``device``, where the maps are: an update is two ``bincount`` calls there
    (no copy to the host). AUPRO's regions are labelled on the CPU: pass each mask's
    `region_weights` (from the loader workers) or they are computed here from the masks.

    >>> acc = PixelAccumulator()
    >>> acc.update(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[1, 0], [0, 1]]))
    >>> round(acc.compute()[0]["pixel_auroc"], 3)
    1.0
    """
    bins: int = 2 ** 20
    fpr_limit: float = 0.3
    aupro: bool = True                       # False: skip region labelling (pixel_aupro is NaN)
    device: Union[str, torch.device] = "cpu"
    hist: torch.Tensor = field(init=False)   # (2, bins): normal, anomalous pixels per bin
    pro: torch.Tensor = field(init=False)    # Σ 1/|region| of anomalous pixels per bin
    regions: int = field(init=False, default=0)
    images: int = field(init=False, default=0)
    replicates: Optional["PixelReplicates"] = None   # the bootstrap's histograms (bootstrap.py), fed alongside
    _extent: Optional[torch.Tensor] = field(init=False, default=None, repr=False)

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.hist = torch.zeros(2, self.bins, dtype=torch.int64, device=self.device)
        self.pro = torch.zeros(self.bins, dtype=torch.float64, device=self.device)

    @property
    def pos(self) -> np.ndarray:
        self._checked()
        return self.hist[1].cpu().numpy()

    @property
    def neg(self) -> np.ndarray:
        self._checked()
        return self.hist[0].cpu().numpy()

    def _check_range(self, lo: float, hi: float) -> None:
        if not (lo >= -1e-6 and hi <= 1 + 1e-6):              # also catches NaN
            raise ValueError(f"pixel scores must be finite and in [0, 1], got range [{lo:.4g}, {hi:.4g}]")

    def _checked(self) -> None:
        """On an accelerator the range check is deferred to here (reading it in `update` would wait
        for the device every batch): the running extent of every score seen."""
        if self._extent is not None:
            lo, hi = self._extent.tolist()
            self._extent = None
            self._check_range(lo, hi)

    def update(self, anomaly_map, mask, regions: Optional[list] = None, images: Optional[Sequence[int]] = None) -> None:
        """One image, map (H, W) in [0, 1] and mask (H, W) in {0, 1}, or a batch of them (B, H, W),
        as numpy arrays or tensors (moved to ``device``). ``regions``: each mask's `region_weights`
        when already computed (else the masks are labelled here). ``images``: each map's column in the
        `replicates`' counts (needed with them). Scores outside [0, 1] raise a ValueError, on an
        accelerator when the state is next read."""
        scores = _tensor(anomaly_map).to(self.device, torch.float32)
        mask = _tensor(mask).to(self.device)
        if scores.shape != mask.shape:
            raise ValueError(f"map {tuple(scores.shape)} and mask {tuple(mask.shape)} differ in shape")
        if scores.ndim == 2:
            scores, mask = scores[None], mask[None]
        if self.aupro:
            if regions is None:
                regions = [region_weights(m) for m in (mask > 0).cpu().numpy()]
            if len(regions) != len(scores):
                raise ValueError(f"{len(regions)} region lists for {len(scores)} maps")
            self.regions += sum(int(n) for _, _, n in regions)
        if self.replicates is not None and (images is None or len(images) != len(scores)):
            raise ValueError(f"the bootstrap replicates need each map's image column: got {images} for {len(scores)} maps")
        if scores.numel():
            update = self._update_host if self.device.type == "cpu" else self._update_device
            update(scores.reshape(-1), mask.reshape(-1) > 0, regions, scores[0].numel(), images)
        self.images += len(scores)

    def _update_replicates(self, b: torch.Tensor, anomalous: torch.Tensor, regions, flat, area: int, images,
                           host: bool) -> None:
        """The bootstrap's coarse histograms from the same bins (the fine bin index, shifted)."""
        rep = self.replicates
        shift = int(math.log2(self.bins // rep.bins))
        pixels, weights = flat if flat is not None else (anomalous.new_zeros(0), torch.zeros(0, dtype=torch.float64))
        rep.update(b >> shift, anomalous, pixels.to(b.device), weights.to(b.device),
                   [n for _, _, n in regions] if regions else [0] * len(images), images, area, host)

    def _update_host(self, scores: torch.Tensor, mask: torch.Tensor, regions, area: int, images=None) -> None:
        """numpy on the CPU (several times faster than torch's elementwise ops and bincount there),
        in place through shared memory: every pixel counted as normal, then the few anomalous ones
        moved to the anomalous half."""
        s = scores.numpy()
        self._check_range(float(s.min()), float(s.max()))
        # float32 x 2^k is exact and the cast truncates, as torch's: the same bins on every device
        b = (s * np.float32(self.bins)).astype(np.int32)
        np.clip(b, 0, self.bins - 1, out=b)
        neg, pos = self.hist.numpy()
        neg += np.bincount(b, minlength=self.bins)
        where = np.flatnonzero(mask.numpy())
        anomalous = b[where]
        np.subtract.at(neg, anomalous, 1)
        np.add.at(pos, anomalous, 1)
        flat = _flat_regions(regions, area) if regions else None
        if flat is not None:
            np.add.at(self.pro.numpy(), b[flat[0].numpy()], flat[1].numpy())
        if self.replicates is not None:
            self._update_replicates(torch.from_numpy(b), torch.from_numpy(where), regions, flat, area, images, True)

    def _update_device(self, scores: torch.Tensor, mask: torch.Tensor, regions, area: int, images=None) -> None:
        """torch where the maps are, nothing read back: ``bincount`` into one histogram of 2 x bins
        (normal pixels in the first half, anomalous ones in the second); the region lists copied
        from pinned memory without waiting."""
        extent = torch.stack([scores.min(), scores.max()]).double()
        self._extent = extent if self._extent is None else \
            torch.stack([torch.minimum(self._extent[0], extent[0]), torch.maximum(self._extent[1], extent[1])])
        b = (scores * self.bins).to(torch.int32).clamp_(0, self.bins - 1)
        self.hist.view(-1).add_(torch.bincount(b + mask.to(torch.int32) * self.bins, minlength=2 * self.bins))
        flat = None
        if regions:
            pixels, weights = _flat_regions(regions, area, pin=True)
            flat = pixels.to(self.device, non_blocking=True), weights.to(self.device, non_blocking=True)
            if len(pixels):
                self.pro.add_(torch.bincount(b[flat[0]], flat[1], minlength=self.bins))
        if self.replicates is not None:
            self._update_replicates(b, torch.nonzero(mask).view(-1), regions, flat, area, images, False)

    def _cumulative(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Thresholds from high to low (only bins that hold pixels): the mask of those bins, and the
        true / false positive counts at each."""
        neg, pos = self.hist.cpu().numpy()
        keep = (pos + neg) > 0
        tp = np.cumsum(pos[::-1][keep[::-1]]).astype(np.float64)
        fp = np.cumsum(neg[::-1][keep[::-1]]).astype(np.float64)
        return keep, tp, fp

    def _thresholds(self, keep: np.ndarray) -> np.ndarray:
        """The score threshold of each point of `_cumulative` (the lower edge of its bin)."""
        return (self.bins - 1 - np.flatnonzero(keep[::-1])) / self.bins

    def curve(self, max_points: int = 1000) -> dict:
        """ROC and PR curve points from the histograms (no maps needed): {'threshold', 'fpr', 'tpr',
        'precision'} arrays, thresholds from high to low (recall = tpr). Thinned to about
        ``max_points`` evenly spaced along the ROC curve's length (both ends kept), so that the
        drawn curve and its area stay within ~1e-3 of the exact ones."""
        self._checked()
        N, P = self.hist.sum(1).tolist()
        if P == 0 or N == 0:
            return {k: np.zeros(0) for k in ("threshold", "fpr", "tpr", "precision")}
        keep, tp, fp = self._cumulative()
        thresholds = self._thresholds(keep)
        length = np.r_[0.0, np.cumsum(np.hypot(np.diff(fp / N), np.diff(tp / P)))]
        step = np.floor(length / max(length[-1], 1e-12) * max_points)
        idx = np.unique(np.r_[0, np.flatnonzero(np.diff(step)) + 1, len(tp) - 1])
        return {"threshold": thresholds[idx], "fpr": fp[idx] / N, "tpr": tp[idx] / P,
                "precision": tp[idx] / (tp[idx] + fp[idx])}

    def counts(self) -> tuple[np.ndarray, ...]:
        """The state as arrays (pos, neg, pro, [regions, images], and the replicates' state when there
        are replicates): what shards of a run add up."""
        self._checked()
        state = (self.pos, self.neg, self.pro.cpu().numpy(), np.array([self.regions, self.images], np.int64))
        return state + ((self.replicates.state.cpu().numpy(),) if self.replicates is not None else ())

    def set_counts(self, pos: np.ndarray, neg: np.ndarray, pro: np.ndarray, totals: np.ndarray,
                   replicates: Optional[np.ndarray] = None) -> None:
        """Replace the state by (summed) `counts` arrays."""
        self.hist = torch.as_tensor(np.stack([neg, pos])).to(self.device)
        self.pro = torch.as_tensor(pro).to(self.device)
        self.regions, self.images = int(totals[0]), int(totals[1])
        if replicates is not None:
            self.replicates.state = torch.as_tensor(replicates).to(self.replicates.device)

    @classmethod
    def merged(cls, parts: list["PixelAccumulator"]) -> "PixelAccumulator":
        """One accumulator holding all of ``parts``' pixels (pooled curves; shards of a run)."""
        out = cls(bins=parts[0].bins, fpr_limit=parts[0].fpr_limit, aupro=all(p.aupro for p in parts),
                  device=parts[0].device)
        for p in parts:
            p._checked()
            if p.bins != out.bins:
                raise ValueError(f"cannot merge accumulators of {p.bins} and {out.bins} bins")
            out.hist += p.hist.to(out.device)
            out.pro += p.pro.to(out.device)
            out.regions += p.regions
            out.images += p.images
        return out

    def compute(self) -> tuple[dict, list]:
        keys = ("pixel_auroc", "pixel_ap", "pixel_f1", "pixel_aupro")
        self._checked()
        N, P = self.hist.sum(1).tolist()
        if P == 0 or N == 0:
            which = "no pixel annotations" if self.images == 0 else \
                ("no anomalous pixels" if P == 0 else "no normal pixels")
            return {**dict.fromkeys(keys, NAN), "pixel_threshold": NAN}, [f"pixel metrics undefined: {which}"]
        keep, tp, fp = self._cumulative()
        tpr, fpr = tp / P, fp / N
        auroc = float(np.trapezoid(np.r_[0.0, tpr], np.r_[0.0, fpr]))
        precision = tp / (tp + fp)
        ap = float(np.sum(np.diff(np.r_[0.0, tpr]) * precision))          # step-wise, as scikit-learn
        f1s = 2 * precision * tpr / np.maximum(precision + tpr, 1e-12)
        best = int(np.argmax(f1s))
        f1 = float(f1s[best])
        values = dict(pixel_auroc=auroc, pixel_ap=ap, pixel_f1=f1, pixel_aupro=NAN,
                      pixel_threshold=float(self._thresholds(keep)[best]))
        if not self.aupro:
            return values, ["pixel_aupro not computed (aupro=False)"]
        pro = np.cumsum(self.pro.cpu().numpy()[::-1][keep[::-1]]) / self.regions
        values["pixel_aupro"] = _partial_area(np.r_[0.0, fpr], np.r_[0.0, pro], self.fpr_limit) / self.fpr_limit
        return values, []


def thresholds_below(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per value, how many of the (ascending) ``thresholds`` lie strictly below it: exactly
    ``np.searchsorted(thresholds, values, side="left")`` (NaN counts all), but without a binary search
    per pixel (several times faster). The cflow thresholds are evenly spaced, so the index guessed
    from the spacing is off by at most a step of rounding; float64 comparisons with the neighbouring
    thresholds then correct it, the same comparisons the search makes."""
    values = np.asarray(values, dtype=np.float64)
    T = len(thresholds)
    if T < 2 or not np.isfinite(thresholds).all() or np.isnan(values).any():
        return np.searchsorted(thresholds, values, side="left")
    lo, step = float(thresholds[0]), (float(thresholds[-1]) - float(thresholds[0])) / (T - 1)
    if not step > 0:
        return np.searchsorted(thresholds, values, side="left")
    guess = np.clip(np.ceil((values - lo) / step), 0, T).astype(np.intp)
    padded = np.r_[-np.inf, np.asarray(thresholds, np.float64), np.inf]      # padded[g] = thresholds[g - 1]
    for _ in range(T + 1):                             # in practice one round; bounded all the same
        down = padded[guess] >= values                 # thresholds[g - 1] is not below the value
        up = padded[guess + 1] < values                # thresholds[g] is below it too
        if not (down.any() or up.any()):
            return guess
        guess -= down
        guess += up
    raise AssertionError("thresholds are not ascending")


def _partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) for x in [0, x_max], interpolating at x_max (x ascending)."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max and inside.sum() < len(x):
        j = int(np.argmax(~inside))                   # first point beyond x_max
        y_at = ys[-1] + (y[j] - ys[-1]) * (x_max - xs[-1]) / (x[j] - xs[-1])
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_at]
    return float(np.trapezoid(ys, xs))


class CflowAupro:
    """AUPRO as AnomalyCLIP (``metrics.py: cal_pro_score``, after gudovskiy/cflow-ad) and Crane compute
    it, the variant behind their published AUPRO (ANOMALYCLIP_CRANE_AACLIP_SPEC.md, section 0):

    1. thresholds ``np.arange(lo, hi, (hi - lo) / 200)`` between the smallest and largest score of all
       maps of the category (``hi`` itself excluded; rounding can give 201);
    2. per threshold, PRO = mean over all 8-connected regions of all masks of the fraction of the
       region's pixels scored above it; FPR = normal pixels above it / normal pixels;
    3. the thresholds with FPR < 0.3 are kept, their FPRs rescaled to [0, 1] by their own min and max,
       and ``sklearn.metrics.auc(FPR, PRO)`` is the result (no interpolation at 0.3, no division by 0.3).

    The thresholds depend on every map of the category, so `update` keeps the maps with their
    anomalous pixels' region weights (in an anonymous temporary file, not in memory) until `counts`.
    Per image, each pixel's number of thresholds below it (`thresholds_below`); region and
    false-positive counts per threshold are then weighted bincounts, exact (the same float
    comparisons as ``map > th``). Shards of a run agree on the
    thresholds from the global `extent` and add their `counts`.
    """

    def __init__(self, steps: int = 200, fpr_limit: float = 0.3):
        self.steps, self.fpr_limit = steps, fpr_limit
        self.lo, self.hi = math.inf, -math.inf
        self._store = tempfile.TemporaryFile()
        self._shapes: list[tuple[int, ...]] = []       # (H, W, anomalous pixels, regions, image column) per map

    def update(self, anomaly_map: np.ndarray, mask: np.ndarray, regions: Optional[tuple] = None,
               image: int = -1) -> None:
        """One image: map (H, W), mask (H, W) in {0, 1}; ``regions``: the mask's `region_weights` when
        already computed (else labelled here); ``image``: its column in the bootstrap's counts."""
        anomaly_map = np.ascontiguousarray(anomaly_map, dtype=np.float32)
        if anomaly_map.shape != np.shape(mask):
            raise ValueError(f"map {anomaly_map.shape} and mask {np.shape(mask)} differ in shape")
        pixels, weights, n = region_weights(mask) if regions is None else regions
        if anomaly_map.size:
            self.lo, self.hi = min(self.lo, float(anomaly_map.min())), max(self.hi, float(anomaly_map.max()))
        self._store.write(anomaly_map.tobytes())
        self._store.write(np.asarray(pixels, np.int64).tobytes())
        self._store.write(np.asarray(weights, np.float64).tobytes())
        self._shapes.append((*anomaly_map.shape, len(pixels), int(n), int(image)))

    def extent(self) -> np.ndarray:
        """[lowest, -highest] score seen (both reduce with a minimum over shards)."""
        return np.array([self.lo, -self.hi], np.float64)

    def thresholds(self, extent: np.ndarray) -> np.ndarray:
        """The reference's thresholds from a (global) `extent`, float64 as its ``np.arange`` gives them."""
        lo, hi = np.float32(extent[0]), np.float32(-extent[1])
        if not np.isfinite(lo) or not hi > lo:
            return np.zeros(0)
        return np.arange(lo, hi, (hi - lo) / self.steps)

    def counts(self, thresholds: np.ndarray, replicates: Optional[np.ndarray] = None) -> tuple[np.ndarray, ...]:
        """Per threshold: the sum over regions of their hit fraction, and the false positives; then
        [regions, normal pixels]. What shards of a run add up. With the bootstrap's ``replicates``
        (rows x images, `bootstrap.resample_counts`), the same three per row, each image weighted by its count."""
        T = len(thresholds)
        pro, fp, totals = np.zeros(T + 1), np.zeros(T + 1, np.int64), np.zeros(2, np.int64)
        rows = 0 if replicates is None else len(replicates)
        per_image = np.zeros((len(self._shapes), 2 * (T + 1) + 2)) if rows else None
        self._store.seek(0)
        for i, (h, w, k, n, image) in enumerate(self._shapes):
            values = np.frombuffer(self._store.read(4 * h * w), np.float32)
            pixels = np.frombuffer(self._store.read(8 * k), np.int64)
            weights = np.frombuffer(self._store.read(8 * k), np.float64)
            above = thresholds_below(values, thresholds)
            inside = above[pixels]                                     # the anomalous pixels: no false positives
            image_fp = np.bincount(above, minlength=T + 1) - np.bincount(inside, minlength=T + 1)
            image_pro = np.bincount(inside, weights=weights, minlength=T + 1)
            fp += image_fp
            pro += image_pro
            totals += (n, h * w - k)
            if rows:
                per_image[i] = np.r_[image_pro, image_fp, n, h * w - k]
        # a pixel with k thresholds below it is predicted at thresholds 0..k-1: reversed cumulative sums
        tail = lambda a: np.cumsum(a[..., ::-1], axis=-1)[..., ::-1][..., 1:]  # noqa: E731
        out = (tail(pro), tail(fp), totals)
        if rows:
            summed = replicates[:, [s[-1] for s in self._shapes]].astype(np.float64) @ per_image
            out += (tail(summed[:, :T + 1]), tail(summed[:, T + 1:2 * (T + 1)]), summed[:, -2:])
        return out

    def replicate_values(self, thresholds: np.ndarray, pro: np.ndarray, fp: np.ndarray, totals: np.ndarray) -> np.ndarray:
        """The cflow AUPRO of each bootstrap row (`counts`' last three, summed over shards), at the
        test set's own thresholds: `compute` row by row, vectorised (the FPR falls with the threshold,
        so the kept thresholds are a run at the end and the area is the trapezoids between them)."""
        regions, normals = totals[:, 0:1], totals[:, 1:2]
        if len(thresholds) == 0:
            return np.full(len(pro), NAN)
        with np.errstate(divide="ignore", invalid="ignore"):
            fpr, pros = fp / normals, pro / regions
            kept = fpr < self.fpr_limit
            lo = np.where(kept, fpr, np.inf).min(axis=1, keepdims=True)
            hi = np.where(kept, fpr, -np.inf).max(axis=1, keepdims=True)
            x = (fpr - lo) / (hi - lo)
            both = kept[:, 1:] & kept[:, :-1]
            area = np.abs(np.sum(np.where(both, np.diff(x, axis=1) * (pros[:, 1:] + pros[:, :-1]) / 2, 0.0), axis=1))
        undefined = (regions[:, 0] == 0) | (normals[:, 0] == 0) | (kept.sum(axis=1) < 2) | ~(hi[:, 0] > lo[:, 0])
        return np.where(undefined, NAN, area)

    def compute(self, thresholds: np.ndarray, pro: np.ndarray, fp: np.ndarray, totals: np.ndarray) -> tuple[float, str]:
        """The cflow AUPRO from (summed) `counts`, and a note when it is undefined."""
        regions, normals = int(totals[0]), int(totals[1])
        if len(thresholds) == 0 or regions == 0 or normals == 0:
            return NAN, "pixel_aupro_cflow undefined: " + ("constant scores" if len(thresholds) == 0 else
                                                           "no anomalous regions" if regions == 0 else "no normal pixels")
        fpr, pros = fp / normals, pro / regions
        kept = fpr < self.fpr_limit
        fpr, pros = fpr[kept], pros[kept]
        if len(fpr) < 2 or fpr.max() == fpr.min():
            return NAN, "pixel_aupro_cflow undefined: fewer than two distinct FPRs below the limit (the reference divides by zero)"
        fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
        return float(auc(fpr, pros)), ""

    def close(self) -> None:
        self._store.close()


def mean_row(rows: list[dict], keys) -> dict:
    """Unweighted mean over categories, leaving undefined (NaN) values out; NaN if none defined."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
        out[k] = float(np.mean(vals)) if vals else NAN
    return out


def summarize(labels, scores, pixels: Optional[PixelAccumulator], cflow: Optional[tuple[float, str]] = None) -> dict:
    """All metrics of one category, with a ``note`` column saying why any is undefined. ``cflow``:
    the category's `CflowAupro` value and note, when it was computed."""
    values, notes = image_metrics(labels, scores)
    if pixels is None:
        pixel_values = {**dict.fromkeys(METRIC_KEYS[3:], NAN), "pixel_threshold": NAN}
        pixel_notes = ["pixel metrics undefined: no pixel annotations"]
    else:
        pixel_values, pixel_notes = pixels.compute()
        pixel_values["pixel_aupro_cflow"], note = cflow if cflow is not None else (NAN, "")
        pixel_notes += [note] if note else []
    return {**values, **pixel_values, "note": "; ".join(notes + pixel_notes)}
