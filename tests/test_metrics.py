"""Metrics against scikit-learn and a slow, obviously-correct AUPRO written here."""
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from adaclip.metrics import PixelAccumulator, image_metrics, mean_row, summarize


def slow_aupro(masks, maps, fpr_limit=0.3):
    """Per threshold (every distinct score): mean overlap of each 8-connected region, and FPR."""
    regions = []                                                   # (image index, region pixels)
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = np.concatenate([s[m == 0] for s, m in zip(maps, masks)])
    xs, ys = [0.0], [0.0]
    for t in np.unique(np.concatenate([s.ravel() for s in maps]))[::-1]:
        fpr = (normal >= t).mean()
        pro = np.mean([(maps[i][r] >= t).mean() for i, r in regions])
        xs.append(fpr)
        ys.append(pro)
    xs, ys = np.array(xs), np.array(ys)
    inside = xs <= fpr_limit
    x, y = xs[inside], ys[inside]
    if x[-1] < fpr_limit and (~inside).any():
        j = np.argmax(~inside)
        y_at = y[-1] + (ys[j] - y[-1]) * (fpr_limit - x[-1]) / (xs[j] - x[-1])
        x, y = np.r_[x, fpr_limit], np.r_[y, y_at]
    return np.trapezoid(y, x) / fpr_limit


def random_case(seed, n=4, size=24, ties=False):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for _ in range(n):
        m = np.zeros((size, size), np.uint8)
        for _ in range(rng.integers(0, 6)):                       # many regions, some touching
            y, x = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, 6, 2)
            m[y:y + h, x:x + w] = 1
        s = rng.random((size, size)) * 0.8 + 0.2 * m * rng.random()
        if ties:
            s = np.round(s, 1)                                     # heavy ties
        masks.append(m)
        maps.append(s.clip(0, 1))
    if not any(m.any() for m in masks):
        masks[0][2:5, 2:5] = 1
    return masks, maps


@pytest.mark.parametrize("seed, ties", [(0, False), (1, True), (2, False), (3, True), (4, False)])
def test_pixel_metrics_match_sklearn_and_slow_aupro(seed, ties):
    masks, maps = random_case(seed, ties=ties)
    acc = PixelAccumulator()
    for s, m in zip(maps, masks):
        acc.update(s, m)
    got, notes = acc.compute()
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([x.ravel() for x in maps])
    assert not notes
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-5)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-5)
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.nanmax(2 * p * r / np.maximum(p + r, 1e-12))
    assert got["pixel_f1"] == pytest.approx(f1, abs=1e-5)
    # measured: equal to ~1e-16 (continuous scores rarely share one of the 2^20 bins)
    assert got["pixel_aupro"] == pytest.approx(slow_aupro(masks, maps), abs=1e-6)


def test_aupro_known_answer():
    # one region of 2 pixels, 8 normal pixels. Scores: region {0.9, 0.1}; normals all 0.5.
    # threshold 0.9: fpr 0, pro 0.5; threshold 0.5: fpr 1, pro 0.5 -> the curve to fpr 0.3 is the
    # segment from (0, 0) to (0, 0.5), then flat at 0.5: area 0.3·0.5 -> normalised 0.5.
    m = np.zeros((2, 5), np.uint8)
    m[0, :2] = 1
    s = np.full((2, 5), 0.5)
    s[0, 0], s[0, 1] = 0.9, 0.1
    acc = PixelAccumulator()
    acc.update(s, m)
    assert acc.compute()[0]["pixel_aupro"] == pytest.approx(0.5, abs=1e-9)
    perfect = PixelAccumulator()
    perfect.update(m.astype(float), m)
    assert perfect.compute()[0]["pixel_aupro"] == pytest.approx(1.0)


def test_aupro_regions_are_eight_connected():
    """MVTec AD's regions are 8-connected: pixels touching only at a corner form one region.

    Defect pixels (0,0), (0,1) and (1,2): (1,2) touches (0,1) diagonally only. 8-connected: one
    region of 3 pixels; the two scored 0.9 cover 2/3 of it at FPR 0, so AUPRO is 2/3. With
    4-connectivity the regions would be {(0,0), (0,1)} (fully covered) and {(1,2)} (not): 1/2.
    """
    m = np.zeros((3, 5), np.uint8)
    m[0, 0] = m[0, 1] = m[1, 2] = 1
    s = np.full((3, 5), 0.5)
    s[0, 0] = s[0, 1] = 0.9
    s[1, 2] = 0.1
    acc = PixelAccumulator()
    acc.update(s, m)
    assert acc.regions == 1
    assert acc.compute()[0]["pixel_aupro"] == pytest.approx(2 / 3, abs=1e-9)
    assert slow_aupro([m], [s]) == pytest.approx(2 / 3, abs=1e-9)


def test_image_f1_is_the_maximum_over_thresholds():
    """F1-max is the best F1 over every threshold, here checked by brute force."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40) + 0.4 * labels, 2)              # ties too
    best, best_t = 0.0, None
    for t in np.unique(scores):
        d = scores >= t
        tp = (d & (labels == 1)).sum()
        f1 = 2 * tp / (d.sum() + labels.sum())
        if f1 > best:
            best, best_t = f1, t
    got, _ = image_metrics(labels, scores)
    assert got["image_f1"] == pytest.approx(best, abs=1e-12)
    assert got["image_threshold"] == pytest.approx(best_t)
    assert best > 0.75                                                # far from the worst threshold's F1


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = rng.random(50) + 0.3 * labels
    got, notes = image_metrics(labels, scores)
    assert not notes
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    decisions = scores >= got["image_threshold"]
    tp = (decisions & (labels == 1)).sum()
    f1 = 2 * tp / (decisions.sum() + labels.sum())
    assert got["image_f1"] == pytest.approx(f1)


def test_undefined_cases_are_nan_with_a_reason():
    values, notes = image_metrics([1, 1, 1], [0.2, 0.5, 0.9])           # Kvasir: no normal images
    assert math.isnan(values["image_auroc"]) and "only anomalous" in notes[0]
    row = summarize([0, 1], [0.1, 0.9], None)                          # HeadCT: no masks
    assert math.isnan(row["pixel_aupro"]) and "no pixel annotations" in row["note"]
    acc = PixelAccumulator()
    acc.update(np.full((4, 4), 0.3), np.zeros((4, 4)))
    values, notes = acc.compute()
    assert math.isnan(values["pixel_auroc"]) and "no anomalous pixels" in notes[0]


def test_mean_leaves_undefined_out():
    rows = [{"a": 0.5}, {"a": float("nan")}, {"a": 1.0}]
    assert mean_row(rows, ["a"])["a"] == 0.75
    assert math.isnan(mean_row([{"a": float("nan")}], ["a"])["a"])


def test_out_of_range_scores_rejected():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        PixelAccumulator().update(np.full((2, 2), 1.5), np.ones((2, 2)))


def test_memory_is_bounded_by_bins_not_images():
    acc = PixelAccumulator(bins=1024)
    for i in range(50):
        acc.update(np.random.default_rng(i).random((64, 64)), np.eye(64))
    assert acc.pos.nbytes + acc.neg.nbytes + acc.pro.nbytes == 3 * 1024 * 8


def test_aupro_can_be_skipped():
    masks, maps = random_case(0)
    fast, full = PixelAccumulator(aupro=False), PixelAccumulator()
    for s, m in zip(maps, masks):
        fast.update(s, m)
        full.update(s, m)
    (a, notes), (b, _) = fast.compute(), full.compute()
    assert math.isnan(a["pixel_aupro"]) and "not computed" in notes[0]
    assert a["pixel_auroc"] == b["pixel_auroc"]


def cal_pro_score(masks, amaps, max_step=200, expect_fpr=0.3):
    """zqhang/AnomalyCLIP metrics.py (after gudovskiy/cflow-ad), line by line; skimage's `label` and
    `regionprops` (default full connectivity) written with scipy's 8-connected label."""
    from sklearn.metrics import auc

    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs, ths = [], [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
            for r in range(1, n + 1):
                coords = np.argwhere(labelled == r)
                tp_pixels = binary_amap[coords[:, 0], coords[:, 1]].sum()
                pro.append(tp_pixels / len(coords))
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fpr = fp_pixels / inverse_masks.sum()
        pros.append(np.array(pro).mean())
        fprs.append(fpr)
        ths.append(th)
    pros, fprs, ths = np.array(pros), np.array(fprs), np.array(ths)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[idxes])


def _cflow(maps, masks, shards=1):
    """`CflowAupro` as evaluation runs it: ``shards`` accumulators (ranks) agreeing on the thresholds."""
    from adaclip.metrics import CflowAupro

    parts = [CflowAupro() for _ in range(shards)]
    for i, (s, m) in enumerate(zip(maps, masks)):
        parts[i % shards].update(s, m)
    extent = np.minimum.reduce([p.extent() for p in parts])
    thresholds = parts[0].thresholds(extent)
    counts = [sum(c) for c in zip(*(p.counts(thresholds) for p in parts))]
    return parts[0].compute(thresholds, *counts)


@pytest.mark.parametrize("seed, ties, shards", [(0, False, 1), (1, True, 1), (2, False, 3), (5, False, 2), (6, True, 2)])
def test_cflow_aupro_equals_the_reference_computation(seed, ties, shards):
    """AnomalyCLIP's and Crane's AUPRO (their published variant), on float32 maps as theirs are. With
    ``ties``, scores span 0 to 200/256, so the thresholds are k/256 exactly, and every other pixel sits
    on one: `map > th` must not count a score equal to its threshold."""
    masks, maps = random_case(seed, n=5)
    maps = [s.astype(np.float32) for s in maps]
    if ties:
        maps = [np.where(np.indices(s.shape).sum(0) % 2, s * 200 / 256, np.round(s * 200) / 256).astype(np.float32)
                for s in maps]
        maps[0][0, 0], maps[0][0, 1] = 0, 200 / 256
    expected = cal_pro_score(np.stack(masks).astype(np.float32), np.stack(maps))
    got, note = _cflow(maps, masks, shards)
    assert note == "" and got == pytest.approx(expected, abs=1e-12)


def test_cflow_counts_at_each_threshold_are_the_direct_counts():
    """Per threshold th: the normal pixels scored above it and the sum over regions of their fraction
    above it, counted directly (an off-by-one threshold in the cumulative counts moves the whole curve,
    which the area alone hides when the last thresholds hold no false positives)."""
    from adaclip.metrics import CflowAupro

    masks, maps = random_case(3, n=4)
    maps = [s.astype(np.float32) for s in maps]
    acc = CflowAupro()
    for s, m in zip(maps, masks):
        acc.update(s, m)
    thresholds = acc.thresholds(acc.extent())
    pro, fp, totals = acc.counts(thresholds)
    for t, th in enumerate(thresholds):
        above = [s > th for s in maps]
        assert fp[t] == sum(int((a & (m == 0)).sum()) for a, m in zip(above, masks)), t
        regions = [(a, labelled == r) for a, m in zip(above, masks)
                   for labelled, n in [ndimage.label(m, structure=np.ones((3, 3)))] for r in range(1, n + 1)]
        assert pro[t] == pytest.approx(sum(a[region].mean() for a, region in regions), abs=1e-9), t
    assert totals.tolist() == [len(regions), sum(int((m == 0).sum()) for m in masks)]


def test_cflow_aupro_undefined_cases_say_why():
    mask = np.zeros((8, 8), np.uint8)
    value, note = _cflow([np.full((8, 8), 0.5, np.float32)], [mask])
    assert math.isnan(value) and "constant scores" in note
    value, note = _cflow([np.random.default_rng(0).random((8, 8)).astype(np.float32)], [mask])
    assert math.isnan(value) and "no anomalous regions" in note
