"""Significance tests for comparing methods on the same images: DeLong's test for two image AUROCs,
its extension to the unweighted mean over categories (the project's mean rows), and Holm's
correction for testing many comparisons at once.

DeLong, DeLong & Clarke-Pearson (1988) estimate the covariance of two AUROCs measured on the same
images from each image's "structural component": V10 per anomalous image (the fraction of normal
images it outscores) and V01 per normal image (the fraction of anomalous images that outscore it),
ties counted 1/2. The components come from midranks as in Sun & Xu (2014, "Fast implementation of
DeLong's algorithm"), O(N log N) instead of the O(m n) pairwise comparison, and the AUROC they give
is scikit-learn's ``roc_auc_score``.

Undefined cases give NaN, never an exception (as in `metrics`): one class only makes everything NaN;
a single image of a class leaves the AUROCs defined but the variances (ddof=1) NaN.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm, rankdata

NAN = float("nan")


def _inputs(labels, *scores) -> tuple[np.ndarray, list[np.ndarray]]:
    """labels as a bool array (anomalous = True) and the scores as float64, checked for shape and values."""
    labels = np.asarray(labels).reshape(-1)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    out = []
    for s in scores:
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        if len(s) != len(labels):
            raise ValueError(f"{len(s)} scores for {len(labels)} labels")
        if np.isnan(s).any():
            raise ValueError("scores contain NaN")
        out.append(s)
    return labels.astype(bool), out


def _components(positive: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Sun & Xu's midrank form: with Tz the midranks among all images, Tx among the anomalous and Ty
    among the normal ones, Tz - Tx counts (ties 1/2) the normal images an anomalous one outscores,
    and Tz - Ty the anomalous images a normal one outscores or ties."""
    x, y = scores[positive], scores[~positive]
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        return NAN, np.zeros(0), np.zeros(0)
    tz = rankdata(np.concatenate([x, y]), method="average")
    tx, ty = rankdata(x, method="average"), rankdata(y, method="average")
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    auroc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    return float(auroc), v10, v01


def delong_components(labels, scores) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUROC, V10, V01) of one method: V10 per anomalous image, V01 per normal image, each in the
    order the images come in. Both components average to the AUROC. Only one class: (NaN, [], [])."""
    positive, (scores,) = _inputs(labels, scores)
    return _components(positive, scores)


def _cov(a: np.ndarray, b: np.ndarray) -> float:
    """Sample covariance (ddof=1) of two paired component vectors; NaN below two images."""
    if len(a) < 2:
        return NAN
    return float(((a - a.mean()) * (b - b.mean())).sum() / (len(a) - 1))


def _pieces(positive: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict:
    """The two AUROCs and the DeLong (co)variances of one set of images: S10 / m + S01 / n."""
    auc_a, v10_a, v01_a = _components(positive, a)
    auc_b, v10_b, v01_b = _components(positive, b)
    m, n = len(v10_a), len(v01_a)
    if math.isnan(auc_a):
        return dict(auroc_a=NAN, auroc_b=NAN, variance_a=NAN, variance_b=NAN, covariance=NAN, variance=NAN)

    def var(p10, q10, p01, q01):
        return _cov(p10, q10) / m + _cov(p01, q01) / n

    # the difference's variance from the differences' components: exactly 0 when they agree, never < 0
    d10, d01 = v10_a - v10_b, v01_a - v01_b
    return dict(auroc_a=auc_a, auroc_b=auc_b, variance_a=var(v10_a, v10_a, v01_a, v01_a),
                variance_b=var(v10_b, v10_b, v01_b, v01_b), covariance=var(v10_a, v10_b, v01_a, v01_b),
                variance=var(d10, d10, d01, d01))


def _finish(out: dict) -> dict:
    """Add the difference, z and the two-sided normal p-value. A zero variance with a zero difference
    is no evidence of a difference (z = 0, p = 1); with a non-zero difference z and p are NaN (the
    estimate has collapsed, e.g. both methods separate the classes perfectly, in opposite senses)."""
    diff, var = out["auroc_a"] - out["auroc_b"], out["variance"]
    if var > 0:
        z = diff / math.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
    elif var == 0 and diff == 0:
        z, p = 0.0, 1.0
    else:
        z = p = NAN
    return {**out, "difference": diff, "z": z, "p_value": p}


def delong(labels, scores_a, scores_b) -> dict:
    """DeLong's test of AUROC(a) = AUROC(b) for two methods' scores on the same images.

    Returns auroc_a, auroc_b, difference (a - b), variance (of the difference), z, p_value (two-sided,
    normal), variance_a, variance_b, covariance (of the two AUROCs), n_anomalous and n_normal."""
    positive, (a, b) = _inputs(labels, scores_a, scores_b)
    out = _finish(_pieces(positive, a, b))
    return {**out, "n_anomalous": int(positive.sum()), "n_normal": int((~positive).sum())}


def delong_mean(parts) -> dict:
    """DeLong's test for the unweighted mean of per-category AUROCs (the project's mean rows).

    ``parts``: one (labels, scores_a, scores_b) per category. Categories are independent samples, so
    each (co)variance of the mean is the sum of the categories' over C^2. Categories with only one
    class are left out, as the mean rows leave out their NaN AUROC. Returns `delong`'s keys (the
    AUROCs being the means) plus ``categories`` (how many were used) and ``left_out`` (the indices
    of the others); none usable: NaN."""
    used, left_out = [], []
    for i, (labels, a, b) in enumerate(parts):
        positive, (a, b) = _inputs(labels, a, b)
        pieces = _pieces(positive, a, b)
        if math.isnan(pieces["auroc_a"]):
            left_out.append(i)
        else:
            used.append(pieces)
    keys = ("auroc_a", "auroc_b", "variance_a", "variance_b", "covariance", "variance")
    c = len(used)
    if c == 0:
        out = dict.fromkeys(keys, NAN)
    else:
        out = {k: sum(p[k] for p in used) / (c if k.startswith("auroc") else c * c) for k in keys}
    return {**_finish(out), "categories": c, "left_out": left_out}


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input's order: the i-th smallest of m is multiplied by
    m - i + 1, made non-decreasing along the sorted order (step-down) and capped at 1. NaN stays NaN
    and does not count in m. Rejecting where adjusted <= alpha controls the family-wise error at alpha."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, NAN)
    defined = np.flatnonzero(~np.isnan(p))
    m = len(defined)
    if m == 0:
        return out
    order = defined[np.argsort(p[defined], kind="stable")]
    scaled = p[order] * (m - np.arange(m))                    # (m - i + 1) for the i-th smallest, i from 1
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out
