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
from typing import Optional, Union

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

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


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A mask's 8-connected anomalous regions as AUPRO counts them: the flat indices of its anomalous
    pixels (int64), each one's 1 / (its region's size) (float64), and the number of regions. Run on
    the CPU (the loader workers compute it beside decoding: `AnomalyDataset(regions=True)`); small
    to pass on, since only anomalous pixels are listed."""
    mask = np.asarray(mask) > 0
    labelled, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    pixels = np.flatnonzero(labelled)
    sizes = np.bincount(labelled.ravel())                          # sizes[0] = background
    return pixels.astype(np.int64), 1.0 / sizes[labelled.ravel()[pixels]], int(n)


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

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.hist = torch.zeros(2, self.bins, dtype=torch.int64, device=self.device)
        self.pro = torch.zeros(self.bins, dtype=torch.float64, device=self.device)

    @property
    def pos(self) -> np.ndarray:
        return self.hist[1].cpu().numpy()

    @property
    def neg(self) -> np.ndarray:
        return self.hist[0].cpu().numpy()

    def _bin(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.numel():
            lo, hi = scores.aminmax()
            if not (lo >= -1e-6 and hi <= 1 + 1e-6):          # also catches NaN
                raise ValueError(f"pixel scores must be finite and in [0, 1], got range [{float(lo):.4g}, {float(hi):.4g}]")
        # float32 x 2^k is exact: the same bins as numpy's (scores * bins).astype(int64); int32 halves the
        # memory traffic (bins * 2 < 2^31)
        return (scores * self.bins).to(torch.int32).clamp_(0, self.bins - 1)

    def update(self, anomaly_map, mask, regions: Optional[list] = None) -> None:
        """One image, map (H, W) in [0, 1] and mask (H, W) in {0, 1}, or a batch of them (B, H, W),
        as numpy arrays or tensors (moved to ``device``). ``regions``: each mask's `region_weights`
        when already computed (else the masks are labelled here)."""
        scores = _tensor(anomaly_map).to(self.device, torch.float32)
        mask = _tensor(mask).to(self.device) > 0
        if scores.shape != mask.shape:
            raise ValueError(f"map {tuple(scores.shape)} and mask {tuple(mask.shape)} differ in shape")
        if scores.ndim == 2:
            scores, mask = scores[None], mask[None]
        b = self._bin(scores).flatten()
        if self.aupro:
            if regions is None:
                regions = [region_weights(m) for m in mask.cpu().numpy()]
            if len(regions) != len(scores):
                raise ValueError(f"{len(regions)} region lists for {len(scores)} maps")
            area = scores[0].numel()
            pixels = torch.cat([_tensor(p).reshape(-1) + j * area for j, (p, _, _) in enumerate(regions)])
            if len(pixels):
                weights = torch.cat([_tensor(w).reshape(-1) for _, w, _ in regions])
                self._add(self.pro, b[pixels.to(self.device)], weights.to(self.device, torch.float64))
            self.regions += sum(int(n) for _, _, n in regions)
        # one histogram of 2 x bins: normal pixels in the first half, anomalous ones in the second
        self._add(self.hist.view(-1), b.add_(mask.flatten().to(torch.int32), alpha=self.bins))
        self.images += len(scores)

    @staticmethod
    def _add(hist: torch.Tensor, index: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
        """hist += bincount(index, weights): torch's on an accelerator, numpy's (several times faster
        than torch's there) on the CPU, in place through shared memory."""
        if hist.device.type == "cpu":
            h = hist.numpy()
            h += np.bincount(index.numpy(), None if weights is None else weights.numpy(), minlength=len(h)).astype(h.dtype, copy=False)
        else:
            hist += torch.bincount(index, weights, minlength=len(hist))

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
        """The state as arrays (pos, neg, pro, [regions, images]): what shards of a run add up."""
        return self.pos, self.neg, self.pro.cpu().numpy(), np.array([self.regions, self.images], np.int64)

    def set_counts(self, pos: np.ndarray, neg: np.ndarray, pro: np.ndarray, totals: np.ndarray) -> None:
        """Replace the state by (summed) `counts` arrays."""
        self.hist = torch.as_tensor(np.stack([neg, pos])).to(self.device)
        self.pro = torch.as_tensor(pro).to(self.device)
        self.regions, self.images = int(totals[0]), int(totals[1])

    @classmethod
    def merged(cls, parts: list["PixelAccumulator"]) -> "PixelAccumulator":
        """One accumulator holding all of ``parts``' pixels (pooled curves; shards of a run)."""
        out = cls(bins=parts[0].bins, fpr_limit=parts[0].fpr_limit, aupro=all(p.aupro for p in parts),
                  device=parts[0].device)
        for p in parts:
            if p.bins != out.bins:
                raise ValueError(f"cannot merge accumulators of {p.bins} and {out.bins} bins")
            out.hist += p.hist.to(out.device)
            out.pro += p.pro.to(out.device)
            out.regions += p.regions
            out.images += p.images
        return out

    def compute(self) -> tuple[dict, list]:
        keys = ("pixel_auroc", "pixel_ap", "pixel_f1", "pixel_aupro")
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

    The thresholds depend on every map of the category, so `update` keeps the maps (in an anonymous
    temporary file, not in memory) until `counts`. Per image, each pixel's number of thresholds below
    it is one ``searchsorted``; region and false-positive counts per threshold are then weighted
    bincounts, exact (the same float comparisons as ``map > th``). Shards of a run agree on the
    thresholds from the global `extent` and add their `counts`.
    """

    def __init__(self, steps: int = 200, fpr_limit: float = 0.3):
        self.steps, self.fpr_limit = steps, fpr_limit
        self.lo, self.hi = math.inf, -math.inf
        self._store = tempfile.TemporaryFile()
        self._shapes: list[tuple[int, int]] = []

    def update(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        """One image: map (H, W), mask (H, W) in {0, 1}."""
        anomaly_map = np.ascontiguousarray(anomaly_map, dtype=np.float32)
        mask = np.asarray(mask) > 0
        if anomaly_map.shape != mask.shape:
            raise ValueError(f"map {anomaly_map.shape} and mask {mask.shape} differ in shape")
        if anomaly_map.size:
            self.lo, self.hi = min(self.lo, float(anomaly_map.min())), max(self.hi, float(anomaly_map.max()))
        self._store.write(anomaly_map.tobytes())
        self._store.write(np.packbits(mask).tobytes())
        self._shapes.append(anomaly_map.shape)

    def extent(self) -> np.ndarray:
        """[lowest, -highest] score seen (both reduce with a minimum over shards)."""
        return np.array([self.lo, -self.hi], np.float64)

    def thresholds(self, extent: np.ndarray) -> np.ndarray:
        """The reference's thresholds from a (global) `extent`, float64 as its ``np.arange`` gives them."""
        lo, hi = np.float32(extent[0]), np.float32(-extent[1])
        if not np.isfinite(lo) or not hi > lo:
            return np.zeros(0)
        return np.arange(lo, hi, (hi - lo) / self.steps)

    def counts(self, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per threshold: the sum over regions of their hit fraction, and the false positives; then
        [regions, normal pixels]. What shards of a run add up."""
        T = len(thresholds)
        pro, fp, totals = np.zeros(T + 1), np.zeros(T + 1, np.int64), np.zeros(2, np.int64)
        self._store.seek(0)
        for h, w in self._shapes:
            values = np.frombuffer(self._store.read(4 * h * w), np.float32).reshape(h, w)
            mask = np.unpackbits(np.frombuffer(self._store.read((h * w + 7) // 8), np.uint8), count=h * w)
            mask = mask.reshape(h, w).astype(bool)
            above = np.searchsorted(thresholds, values.astype(np.float64), side="left")   # thresholds < value
            fp += np.bincount(above[~mask], minlength=T + 1)
            totals[1] += int((~mask).sum())
            if mask.any():
                labelled, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
                sizes = np.bincount(labelled.ravel())
                inside = labelled > 0
                pro += np.bincount(above[inside], weights=1.0 / sizes[labelled[inside]], minlength=T + 1)
                totals[0] += n
        # a pixel with k thresholds below it is predicted at thresholds 0..k-1: reversed cumulative sums
        return np.cumsum(pro[::-1])[::-1][1:], np.cumsum(fp[::-1])[::-1][1:], totals

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


METRIC_KEYS = ("image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "pixel_f1", "pixel_aupro",
               "pixel_aupro_cflow")


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
