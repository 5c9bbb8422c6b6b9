"""Bootstrap intervals (bootstrap.py) and paired comparisons (compare.py), by what they are for.

- Coverage: on simulated test sets of known image AUROC and known pooled pixel AUROC (maps with a
  per-image random effect, so pixels of an image are correlated), the 95% intervals cover the true
  value in 92-98% of 500 simulations.
- The streamed replicates are the bootstrap they claim to be: with the same counts, each replicate
  equals its metric recomputed on the resampled list of images (pixel histograms at the replicates'
  1024 bins, image metrics by scikit-learn, the cflow AUPRO at the test set's thresholds); against an
  independent naive bootstrap (own draws, exact metrics) the bounds agree within Monte-Carlo error.
- ``evaluate``: intervals around every defined metric, per category and for mean rows, equal to a
  recomputation from the model's own maps and scores; seeded; none with ``bootstrap=0``; a pixel
  state that does not grow with the number of images.
- The paired test rejects 2-8% of the time under the null, > 90% of the time for a real difference
  (either way round); ``compare`` / ``adaclip compare`` end to end, with its refusals.
(Two ranks under torchrun give one process's intervals: test_distributed.py.)
"""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from scipy.stats import norm, rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

from adaclip import EvalCfg, bootstrap, cli, compare, methods
from adaclip.data import AnomalyDataset, read_manifest, read_manifests, write_manifest
from adaclip.data.registry import RESULTS_ENV, resolve_manifest, resolve_root
from adaclip.evaluate import evaluate
from adaclip.metric_keys import METRIC_KEYS
from adaclip.metrics import CflowAupro, PixelAccumulator, f1_max

IMAGE_KEYS, PIXEL_KEYS = METRIC_KEYS[:3], METRIC_KEYS[3:7]
B_E2E = 200                       # replicates in the end-to-end evaluations


# --------------------------------------------------------------------------------------------------
# the draws


def test_resample_counts_keep_each_class_count_and_depend_on_seed_and_category_only():
    labels = np.r_[np.zeros(7, int), np.ones(5, int)][np.random.default_rng(0).permutation(12)]
    counts = bootstrap.resample_counts(labels, 2000, 3, "visa", "capsules")
    assert counts.shape == (2001, 12) and counts.dtype == np.int32
    assert (counts[0] == 1).all()                                           # row 0: the test set itself
    for cls, n in ((0, 7), (1, 5)):                                         # stratified: class counts kept
        assert (counts[:, labels == cls].sum(1) == n).all()
        # each image of a class equally likely: mean count 1, multinomial variance 1 - 1/n per draw
        mean = counts[1:, labels == cls].mean(0)
        assert np.all(np.abs(mean - 1) < 4 * math.sqrt((1 - 1 / n) / 2000))
    again = bootstrap.resample_counts(labels, 2000, 3, "visa", "capsules")
    assert np.array_equal(counts, again)
    for other in (bootstrap.resample_counts(labels, 2000, 4, "visa", "capsules"),
                  bootstrap.resample_counts(labels, 2000, 3, "visa", "macaroni1"),
                  bootstrap.resample_counts(labels, 2000, 3, "mvtec", "capsules")):
        assert (other[1:] != counts[1:]).any(axis=1).mean() > 0.9


def test_interval_quantiles_clipped_to_the_unit_range_and_holding_the_estimate():
    deviations = np.linspace(-0.1, 0.1, 401)
    lo, hi = bootstrap.interval(0.5, deviations)
    assert (lo, hi) == pytest.approx((0.5 - 0.095, 0.5 + 0.095), abs=1e-12)          # 2.5% and 97.5% quantiles
    assert bootstrap.interval(0.95, deviations) == pytest.approx((0.855, 1.0), abs=1e-12)
    # every replicate above the estimate (F1-max or a pixel metric at the coarse bins can do that):
    # the interval still holds the estimate
    assert bootstrap.interval(0.5, np.array([0.01, 0.02, 0.03, np.nan])) == pytest.approx((0.5, 0.5 + 0.0295), abs=1e-12)
    assert bootstrap.interval(0.5, np.array([-0.03, -0.02])) == pytest.approx((0.5 - 0.02975, 0.5), abs=1e-12)
    for estimate, dev in ((np.nan, deviations), (0.5, np.array([np.nan, np.nan])), (0.5, np.zeros(0))):
        assert np.isnan(bootstrap.interval(estimate, dev)).all()


# --------------------------------------------------------------------------------------------------
# coverage


def test_image_auroc_interval_covers_the_true_auroc():
    """Binormal scores, normal N(0, 1) and anomalous N(mu, 1): AUROC = Phi(mu / sqrt 2) = 0.8.

    60 + 60 images: the percentile interval's coverage there is 94.3% (6000 simulations; at 40 + 30,
    93.9%). 1000 simulations (standard error 0.7%): with 500, 92% lies only 2.3 standard errors below
    94.3%, and one seed in a hundred would fail a correct bootstrap (the first 500 of this seed's
    simulations cover 91.8%)."""
    n0, n1, replicates, sims, true = 60, 60, 500, 1000, 0.8
    mu = math.sqrt(2) * norm.ppf(true)
    labels = np.r_[np.zeros(n0, int), np.ones(n1, int)]
    scores = np.random.default_rng(2024).normal(size=(sims, n0 + n1)) + mu * labels
    ranks = rankdata(scores, axis=1)                                        # Mann-Whitney, all at once
    estimate = (ranks[:, n0:].sum(1) - n1 * (n1 + 1) / 2) / (n0 * n1)
    for s in range(3):
        assert estimate[s] == pytest.approx(roc_auc_score(labels, scores[s]), abs=1e-12)
    covered = np.zeros(sims, bool)
    for s in range(sims):
        counts = bootstrap.resample_counts(labels, replicates, s, "sim", "category")
        values = bootstrap.weighted_metrics(labels, scores[s], counts)["image_auroc"]
        assert abs(values[0] - estimate[s]) < 1e-12
        lo, hi = bootstrap.interval(estimate[s], bootstrap.deviations(values))
        covered[s] = lo <= true <= hi
    print(f"image AUROC coverage {covered.mean():.3f}")
    assert 0.92 <= covered.mean() <= 0.98, f"coverage {covered.mean():.3f}"


def test_pixel_auroc_interval_covers_the_true_pooled_auroc():
    """Clustered maps: image i has an effect u_i ~ N(0, tau^2); its normal pixels score N(u_i, 1), its
    anomalous ones (a 2 x 2 defect in a 4 x 4 map) N(mu + u_i, 1), mapped to [0, 1] by Phi (monotone:
    the AUROC is unchanged). The pooled AUROC's expected value is exactly the mix of its pixel pairs:
    pairs from different images Phi(mu / sqrt(2 (1 + tau^2))), pairs within an anomalous image
    Phi(mu / sqrt 2), the latter a share w = (A - a) / (n0 A + n1 (A - a)) of all pairs.

    Sizes where the bootstrap over images is expected to work: with few images per class the
    percentile interval undercovers (2000 simulations each: 12 + 12 images of 8 x 8 with B = 200,
    89.9%; this process at 30 + 30 images, 93.6%, at 40 + 40, 94.5%, both B = 500; B = 200 costs about
    a point), so 40 + 40 images, B = 500; 4 x 4 maps keep 500 simulations fast. The estimate's
    accumulator has 2^14 bins (the default's 2^20 would only cost time here)."""
    n0, n1, side, replicates, sims, mu, tau = 40, 40, 4, 500, 500, 1.0, 0.5
    n, area, a = n0 + n1, side * side, (side // 2) ** 2
    labels = np.r_[np.zeros(n0, int), np.ones(n1, int)]
    masks = np.zeros((n, side, side), np.float32)
    masks[n0:, :side // 2, :side // 2] = 1
    w = (area - a) / (n0 * area + n1 * (area - a))
    true = w * norm.cdf(mu / math.sqrt(2)) + (1 - w) * norm.cdf(mu / math.sqrt(2 * (1 + tau ** 2)))
    rng = np.random.default_rng(7)
    latent = rng.normal(size=(sims, n, side, side)) + rng.normal(0, tau, size=(sims, n, 1, 1)) + mu * masks
    maps = torch.from_numpy(norm.cdf(latent).astype(np.float32))
    mask_t = torch.from_numpy(masks)
    covered, estimates = np.zeros(sims, bool), np.zeros(sims)
    for s in range(sims):
        counts = bootstrap.resample_counts(labels, replicates, s, "sim", "category")
        acc = PixelAccumulator(bins=2 ** 14, aupro=False, replicates=bootstrap.PixelReplicates(counts))
        order = np.random.default_rng(s).permutation(n)                      # images arrive in any order
        acc.update(maps[s][order], mask_t[order], images=order.tolist())
        estimates[s] = acc.compute()[0]["pixel_auroc"]
        values = acc.replicates.metrics(0.3, aupro=False)["pixel_auroc"]
        lo, hi = bootstrap.interval(estimates[s], bootstrap.deviations(values))
        covered[s] = lo <= true <= hi
    # the true value is the estimator's mean (within 4 standard errors; the limit for many images,
    # Phi(mu / sqrt(2 (1 + tau^2))), is 2.5e-4 lower)
    assert abs(estimates.mean() - true) < 4 * estimates.std() / math.sqrt(sims)
    print(f"pixel AUROC coverage {covered.mean():.3f}")
    assert 0.92 <= covered.mean() <= 0.98, f"coverage {covered.mean():.3f}"


# --------------------------------------------------------------------------------------------------
# the streamed replicates against a bootstrap done by hand


def _category(n0=30, n1=30, side=12, seed=5):
    """A simulated category: clustered maps in [0, 1] (float32), masks with one or two rectangular
    defects per anomalous image, image scores with ties (two decimals)."""
    rng = np.random.default_rng(seed)
    n = n0 + n1
    labels = np.r_[np.zeros(n0, int), np.ones(n1, int)]
    masks = np.zeros((n, side, side), np.uint8)
    for i in range(n0, n):
        for _ in range(rng.integers(1, 3)):
            h, w = rng.integers(2, 5, size=2)
            y, x = rng.integers(0, side - h), rng.integers(0, side - w)
            masks[i, y:y + h, x:x + w] = 1
    latent = rng.normal(size=(n, side, side)) + rng.normal(0, 0.5, size=(n, 1, 1)) + 1.2 * masks
    maps = norm.cdf(latent / 2).astype(np.float32)                         # / 2: few scores crowd near 1
    scores = np.round(maps.reshape(n, -1).max(1) - 0.3 * (labels == 0) * rng.random(n), 2)
    return labels, maps, masks, scores


def _regions(mask):
    """Each pixel's AUPRO weight (1 / its 8-connected region's size, 0 outside) and the region count."""
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(labelled.ravel())
    return np.where(labelled > 0, 1.0 / sizes[labelled], 0.0), count


def _exact(labels, scores, weights=None, regions=0, limit=0.3):
    """AUROC (trapezoidal), AP (step-wise), F1-max and, given region weights, AUPRO (area under PRO
    against FPR up to ``limit``, interpolated there, over ``limit``) at every distinct score."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(float)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]                    # the last of each tie
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    P, N = tp[-1], fp[-1]
    tpr, fpr = np.r_[0.0, tp / P], np.r_[0.0, fp / N]
    out = {"auroc": np.trapezoid(tpr, fpr), "ap": np.sum(np.diff(tpr) * tp / (tp + fp)),
           "f1": np.max(2 * tp / (tp + fp + P))}
    if weights is not None:
        pro = np.r_[0.0, np.cumsum(weights[order])[last] / regions]
        j = int(np.argmax(fpr > limit))                                     # the first point beyond
        at_limit = pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        out["aupro"] = np.trapezoid(np.r_[pro[:j], at_limit], np.r_[fpr[:j], limit]) / limit
    return out


def _streamed(labels, maps, masks, counts, bins=2 ** 20):
    """The replicates as evaluation builds them: images fed in a shuffled order, some in batches,
    each with its column in ``counts``."""
    acc = PixelAccumulator(bins=bins, replicates=bootstrap.PixelReplicates(counts))
    order = np.random.default_rng(1).permutation(len(labels))
    for batch in np.array_split(order, 7):
        acc.update(torch.from_numpy(maps[batch]), torch.from_numpy(masks[batch]), images=batch.tolist())
    return acc


def test_replicates_equal_their_metrics_recomputed_on_the_resampled_images():
    labels, maps, masks, scores = _category()
    counts = bootstrap.resample_counts(labels, 40, 0, "sim", "category")
    streamed = _streamed(labels, maps, masks, counts).replicates.metrics(0.3)
    image = bootstrap.weighted_metrics(labels, scores, counts)
    cflow = CflowAupro()
    for i in np.random.default_rng(2).permutation(len(labels)):
        cflow.update(maps[i], masks[i], image=int(i))
    thresholds = cflow.thresholds(cflow.extent())
    replicated = cflow.replicate_values(thresholds, *cflow.counts(thresholds, counts)[3:])
    cflow.close()
    for r, row in enumerate(counts):
        drawn = np.repeat(np.arange(len(labels)), row)                      # the resampled list of images
        acc = PixelAccumulator(bins=bootstrap.PIXEL_BINS)
        acc.update(maps[drawn], masks[drawn])
        values = acc.compute()[0]
        for key in PIXEL_KEYS:
            assert abs(streamed[key][r] - values[key]) < 1e-12, (r, key, streamed[key][r], values[key])
        y, s = labels[drawn], scores[drawn]
        expected = {"image_auroc": roc_auc_score(y, s), "image_ap": average_precision_score(y, s),
                    "image_f1": f1_max(y, s)[0]}
        for key in IMAGE_KEYS:
            assert abs(image[key][r] - expected[key]) < 1e-12, (r, key, image[key][r], expected[key])
        by_hand = CflowAupro()
        for i in drawn:
            by_hand.update(maps[i], masks[i])
        value = by_hand.compute(thresholds, *by_hand.counts(thresholds))[0]
        by_hand.close()
        assert abs(replicated[r] - value) < 1e-12, (r, replicated[r], value)


def test_streamed_intervals_agree_with_a_naive_bootstrap():
    """B = 2000 replicates each way. A bound is the estimate plus the 2.5% (97.5%) quantile of the
    deviations; a quantile's Monte-Carlo standard error is sqrt(p (1 - p) / B) / f(q_p), sigma x 0.060
    for a normal density at p = 0.025 (f = phi(1.96) / sigma), so two independent bootstraps differ by
    sqrt 2 x that: the bounds must agree within 4 such standard errors, sigma the deviations' spread
    (the 1024-bin pixel replicates against exact metrics: well inside it), and the spreads within 10%
    (4 standard errors of sqrt 2 x sigma / sqrt(2 B))."""
    replicates, level_p = 2000, 0.025
    labels, maps, masks, scores = _category()
    n = len(labels)
    # the library: counts, streamed pixel replicates, weighted image metrics
    counts = bootstrap.resample_counts(labels, replicates, 11, "sim", "category")
    acc = _streamed(labels, maps, masks, counts)
    streamed = {**acc.replicates.metrics(0.3), **bootstrap.weighted_metrics(labels, scores, counts)}
    estimate = {**acc.compute()[0], "image_auroc": roc_auc_score(labels, scores),
                "image_ap": average_precision_score(labels, scores), "image_f1": f1_max(labels, scores)[0]}
    # by hand: numpy's own draws within each class, every metric computed exactly on the drawn images
    weights, regions = zip(*[_regions(m) for m in masks])
    weights, regions = np.stack(weights).reshape(n, -1), np.array(regions)
    pixels, truth = maps.reshape(n, -1).astype(np.float64), masks.reshape(n, -1)

    def exact(images):
        px = _exact(truth[images].ravel(), pixels[images].ravel(), weights[images].ravel(), regions[images].sum())
        im = _exact(labels[images], scores[images])
        return {"pixel_auroc": px["auroc"], "pixel_ap": px["ap"], "pixel_f1": px["f1"], "pixel_aupro": px["aupro"],
                "image_auroc": im["auroc"], "image_ap": im["ap"], "image_f1": im["f1"]}

    full = exact(np.arange(n))
    for key in IMAGE_KEYS:                                                   # the exact metrics are right
        assert abs(full[key] - estimate[key]) < 1e-12, key
    for key in PIXEL_KEYS:                                                   # (2^20 bins: ~1e-6)
        assert abs(full[key] - estimate[key]) < 1e-5, key
    rng = np.random.default_rng(99)
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    naive = [exact(np.r_[rng.choice(normal, len(normal)), rng.choice(anomalous, len(anomalous))])
             for _ in range(replicates)]
    se = math.sqrt(level_p * (1 - level_p) / replicates) / norm.pdf(norm.ppf(level_p))
    worst = 0.0
    for key in [*IMAGE_KEYS, *PIXEL_KEYS]:
        ours = bootstrap.deviations(streamed[key])
        theirs = np.array([v[key] for v in naive]) - full[key]
        sigma = theirs.std()
        assert abs(ours.std() / sigma - 1) < 4 * math.sqrt(2) / math.sqrt(2 * replicates), key
        tolerance = 4 * math.sqrt(2) * se * sigma
        for a, b in zip(bootstrap.interval(estimate[key], ours), bootstrap.interval(full[key], theirs)):
            assert abs(a - b) < tolerance, (key, a, b, tolerance)
            worst = max(worst, abs(a - b) / tolerance)
    print(f"streamed against naive bounds: at most {worst:.2f} x the tolerance")


# --------------------------------------------------------------------------------------------------
# evaluation end to end: the embedded sample, tiny models


def _tiny(method):
    cls = methods.get(method)
    torch.manual_seed(0)
    return cls(cls.tiny_config()).eval()


def _spied(model):
    """``model`` whose forward also records every map evaluation receives, in order."""
    seen, forward = [], model.forward

    def spy(images, names, **kw):
        out = forward(images, names, **kw)
        seen.extend(out.pixel_scores.float().clamp(0, 1))
        return out

    model.forward = spy
    return seen


MANIFESTS = ["sample/visa.csv", "sample/mvtec.csv", "sample/headct.csv", "sample/kvasir.csv"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders under one results folder: AdaCLIP's (seed 0, twice; seed 1; no bootstrap) and the
    CLIP baseline's (seed 0; and on fewer visa images), B = 200, batch 8; AdaCLIP's maps recorded."""
    results = tmp_path_factory.mktemp("interval_runs")
    root = resolve_root("sample")
    paths = [resolve_manifest(m) for m in MANIFESTS]
    visa = read_manifest(paths[0])
    fewer = write_manifest(visa.drop(index=visa.index[-1]), results / "visa_fewer.csv")

    def run(name, method, manifests, **cfg):
        model = _tiny(method)
        seen = _spied(model) if name == "ada" else None
        result = evaluate(model, read_manifests(manifests), root,
                          EvalCfg(batch_size=8, num_workers=0, **{"bootstrap": B_E2E, **cfg}),
                          run_dir=results / name, progress=False)
        return result, seen

    out = {"results": results, "root": root}
    out["ada"] = run("ada", "adaclip", paths)
    out["ada_again"] = run("ada_again", "adaclip", paths)
    out["ada_seed1"] = run("ada_seed1", "adaclip", paths, bootstrap_seed=1)
    run("ada_none", "adaclip", paths)                      # with a bootstrap.npz first, then without
    out["ada_none"] = run("ada_none", "adaclip", paths, bootstrap=0)
    out["clip"] = run("clip", "clip", paths)
    out["clip_fewer"] = run("clip_fewer", "clip", [fewer, *paths[1:]])
    return out


def _bounds(metrics):
    return metrics[[f"{m}_{b}" for m in METRIC_KEYS for b in ("lo", "hi")]]


def test_evaluate_writes_intervals_around_every_defined_metric(runs):
    folder = runs["results"] / "ada"
    metrics = pd.read_csv(folder / "metrics.csv")
    assert list(metrics.columns[4:4 + 3 * len(METRIC_KEYS)]) == [
        c for m in METRIC_KEYS for c in (m, f"{m}_lo", f"{m}_hi")]
    rows = set(zip(metrics.dataset, metrics.category))
    assert {("visa", "mean"), ("all", "mean"), ("headct", "headct"), ("kvasir", "kvasir")} <= rows
    defined = 0
    for metric in METRIC_KEYS:
        value, lo, hi = (metrics[c].values for c in (metric, f"{metric}_lo", f"{metric}_hi"))
        ok = np.isfinite(value)
        assert np.all(lo[ok] <= value[ok]) and np.all(value[ok] <= hi[ok]), metric
        assert np.all((lo[ok] >= 0) & (hi[ok] <= 1)), metric
        assert np.isnan(lo[~ok]).all() and np.isnan(hi[~ok]).all(), metric      # undefined: no interval
        defined += ok.sum()
        assert np.any(hi[ok] > lo[ok]), metric                                 # not all degenerate
    assert defined > 30
    m = metrics.set_index(["dataset", "category"])
    kvasir, headct = m.loc[("kvasir", "kvasir")], m.loc[("headct", "headct")]   # only anomalous; no masks
    assert np.isnan(kvasir.image_auroc_lo) and np.isfinite(kvasir.pixel_auroc_lo)
    assert np.isnan(headct.pixel_auroc_lo) and np.isfinite(headct.image_auroc_lo)
    config = json.loads((folder / "config.json").read_text())
    assert config["intervals"]["replicates"] == B_E2E and config["intervals"]["seed"] == 0
    assert config["intervals"]["level"] == 0.95 and config["intervals"]["pixel_bins"] == bootstrap.PIXEL_BINS


def test_evaluate_intervals_are_the_bootstrap_of_the_models_own_scores_and_maps(runs):
    """bootstrap.npz holds, per category and metric, each replicate's deviation: recomputed here from
    the scores evaluation returned and the maps the model gave it (in order), with each category's
    own draws; metrics.csv's bounds are those deviations' interval, a mean row's from its categories'
    deviations averaged replicate by replicate."""
    result, seen = runs["ada"]
    folder = runs["results"] / "ada"
    saved = bootstrap.load(folder / bootstrap.FILE)
    assert saved["replicates"] == B_E2E and saved["seed"] == 0
    df = read_manifests([resolve_manifest(m) for m in MANIFESTS])
    assert len(seen) == len(df)
    model = _tiny("adaclip")
    dataset = AnomalyDataset(df, runs["root"], model.loader_transform, model.image_size)
    scores = result.scores.score.values
    keys = list(dict.fromkeys(zip(df.dataset, df.category)))
    assert sorted(saved["categories"]) == sorted(keys)
    for key in keys:
        rows = np.flatnonzero((df.dataset == key[0]).values & (df.category == key[1]).values)
        counts = bootstrap.resample_counts(df.label.values[rows].astype(int), B_E2E, 0, *key)
        values = bootstrap.weighted_metrics(df.label.values[rows].astype(int), scores[rows], counts)
        if dataset.has_mask[rows[0]]:
            acc = PixelAccumulator(replicates=bootstrap.PixelReplicates(counts))
            cflow = CflowAupro()
            for column, i in enumerate(rows):
                mask = dataset[int(i)]["mask"]
                acc.update(seen[i], mask, images=[column])
                cflow.update(seen[i].numpy(), mask.numpy(), image=column)
            values.update(acc.replicates.metrics(0.3))
            thresholds = cflow.thresholds(cflow.extent())
            values["pixel_aupro_cflow"] = cflow.replicate_values(thresholds, *cflow.counts(thresholds, counts)[3:])
            cflow.close()
            # a replicate state of fixed size: replicates x (3 x bins + 1), whatever the images
            assert acc.replicates.state.shape == (B_E2E + 1, 3 * bootstrap.PIXEL_BINS + 1)
        for metric in METRIC_KEYS:
            got = saved["categories"][key][metric]
            if metric in values:
                np.testing.assert_allclose(got, bootstrap.deviations(values[metric]), rtol=0, atol=1e-9,
                                           err_msg=f"{key} {metric}")
            else:
                assert np.isnan(got).all(), (key, metric)
    # metrics.csv's bounds from those deviations: the estimate plus their 2.5% and 97.5% quantiles
    # (within [0, 1], widened to hold the estimate); a mean row's, replicate by replicate, from the mean
    # of its categories' deviations (those defined in that replicate, of the categories it averages)
    metrics = pd.read_csv(folder / "metrics.csv")
    point = metrics[metrics.category != "mean"].set_index(["dataset", "category"])
    checked = 0
    for row in metrics.itertuples(index=False):
        members = ([k for k in keys if row.dataset in ("all", k[0])] if row.category == "mean"
                   else [(row.dataset, row.category)])
        for metric in METRIC_KEYS:
            estimate = getattr(row, metric)
            parts = np.array([saved["categories"][k][metric] for k in members if np.isfinite(point.loc[k, metric])])
            got = (getattr(row, f"{metric}_lo"), getattr(row, f"{metric}_hi"))
            if not np.isfinite(estimate):
                assert np.isnan(got).all()
                continue
            defined = np.isfinite(parts)
            dev = np.where(defined, parts, 0).sum(0)[defined.any(0)] / defined.sum(0)[defined.any(0)]
            lo, hi = np.clip(estimate + np.quantile(dev, [0.025, 0.975]), 0, 1)
            np.testing.assert_allclose(got, (min(lo, estimate), max(hi, estimate)), rtol=0, atol=1e-12,
                                       err_msg=f"{row.dataset}/{row.category} {metric}")
            checked += row.category == "mean"
    assert checked >= 10                                                        # mean rows among them


def test_evaluate_intervals_are_seeded(runs):
    one, again, other = (pd.read_csv(runs["results"] / r / "metrics.csv") for r in ("ada", "ada_again", "ada_seed1"))
    pd.testing.assert_frame_equal(one, again)
    a, b = (bootstrap.load(runs["results"] / r / bootstrap.FILE) for r in ("ada", "ada_again"))
    for key, per in a["categories"].items():
        for metric, dev in per.items():
            np.testing.assert_array_equal(dev, b["categories"][key][metric])
    # another seed: the same metrics, other intervals (nearly every defined bound moves)
    pd.testing.assert_frame_equal(one[list(METRIC_KEYS)], other[list(METRIC_KEYS)])
    x, y = _bounds(one).values, _bounds(other).values
    finite = np.isfinite(x)
    assert np.array_equal(finite, np.isfinite(y))
    assert (x[finite] != y[finite]).mean() > 0.5
    assert json.loads((runs["results"] / "ada_seed1" / "config.json").read_text())["intervals"]["seed"] == 1


def test_evaluate_without_bootstrap_writes_no_intervals(runs):
    folder = runs["results"] / "ada_none"
    metrics = pd.read_csv(folder / "metrics.csv")
    assert _bounds(metrics).isna().all().all()
    assert not (folder / bootstrap.FILE).exists()            # the earlier evaluation's file is gone
    assert json.loads((folder / "config.json").read_text())["intervals"] is None
    pd.testing.assert_frame_equal(metrics[list(METRIC_KEYS)],
                                  pd.read_csv(runs["results"] / "ada" / "metrics.csv")[list(METRIC_KEYS)])


def test_pixel_replicate_state_does_not_grow_with_the_images(monkeypatch):
    """Evaluating twice the images (each category's images listed twice) keeps every category's
    replicate state at replicates x (3 x bins + 1)."""
    import adaclip.evaluate as ev

    made = []

    class Recorded(PixelAccumulator):
        def __post_init__(self):
            super().__post_init__()
            made.append(self)

    monkeypatch.setattr(ev, "PixelAccumulator", Recorded)
    root = resolve_root("sample")
    visa = read_manifest(resolve_manifest("sample/visa.csv"))
    model = _tiny("clip")
    shapes = {}
    for copies in (1, 2):
        made.clear()
        df = pd.concat([visa] * copies, ignore_index=True).sort_values(["category", "label"], kind="stable")
        evaluate(model, df.reset_index(drop=True), root, EvalCfg(batch_size=8, num_workers=0, bootstrap=50,
                                                                 aupro_cflow=False), progress=False)
        tracked = [acc for acc in made if acc.replicates is not None]
        assert len(tracked) == 2 and all(acc.images == 12 * copies for acc in tracked)
        shapes[copies] = [tuple(acc.replicates.state.shape) for acc in tracked]
    assert shapes[1] == shapes[2] == [(51, 3 * bootstrap.PIXEL_BINS + 1)] * 2


# --------------------------------------------------------------------------------------------------
# the paired test


def _run_data(name, labels, scores, counts, dataset="sim", category="category"):
    """A RunData as compare reads it from a run folder, for one category's image scores."""
    values = bootstrap.weighted_metrics(labels, scores, counts)
    row = {"dataset": dataset, "category": category, **{k: float(v[0]) for k, v in values.items()}}
    devs = {k: bootstrap.deviations(v) for k, v in values.items()}
    frame = pd.DataFrame({"dataset": dataset, "category": category, "image": np.arange(len(labels)).astype(str),
                          "label": labels, "score": scores})
    return compare.RunData(name, pd.DataFrame([row]), frame, {(dataset, category): devs}, len(counts) - 1, 0, [])


def _paired_p(mu_a, mu_b, sims, n0, n1, replicates, seed):
    """Two methods scoring the same images: a shared latent per image (correlation 0.5) plus each
    method's own noise; their anomalous images shifted by mu_a and mu_b. The paired p-values of the
    image AUROC, and whether every interval holds its difference."""
    labels = np.r_[np.zeros(n0, int), np.ones(n1, int)]
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(sims, n0 + n1))
    own = rng.normal(size=(2, sims, n0 + n1))
    p, held = np.zeros(sims), np.zeros(sims, bool)
    for s in range(sims):
        counts = bootstrap.resample_counts(labels, replicates, s, "sim", "category")
        a, b = ((shared[s] + own[k, s]) / math.sqrt(2) + mu * labels for k, mu in enumerate((mu_a, mu_b)))
        out = compare.paired(_run_data("a", labels, a, counts), _run_data("b", labels, b, counts), "sim", "image_auroc")
        assert out["difference"] == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b), abs=1e-12)
        p[s], held[s] = out["p_value"], out["difference_lo"] <= out["difference"] <= out["difference_hi"]
    return p, held


def test_paired_test_size_under_the_null():
    p, held = _paired_p(1.0, 1.0, sims=500, n0=50, n1=50, replicates=400, seed=3)
    print(f"rejected under the null: {(p < 0.05).mean():.3f}")
    assert ((p > 0) & (p <= 1)).all() and held.all()
    assert 0.02 <= (p < 0.05).mean() <= 0.08, f"rejection rate {(p < 0.05).mean():.3f}"


def test_paired_test_power_either_way_round():
    """AUROC 0.86 against 0.64: found in > 90% of simulations, A better or B better (a one-sided
    p-value would find only one of them)."""
    for mu_a, mu_b in ((1.5, 0.5), (0.5, 1.5)):
        p, held = _paired_p(mu_a, mu_b, sims=150, n0=60, n1=60, replicates=400, seed=4)
        assert held.all()
        print(f"rejected with mu_a = {mu_a}, mu_b = {mu_b}: {(p < 0.05).mean():.3f}")
        assert (p < 0.05).mean() > 0.9, (mu_a, mu_b, (p < 0.05).mean())


# --------------------------------------------------------------------------------------------------
# compare end to end


def test_compare_two_methods_on_the_same_images(runs, monkeypatch):
    results = runs["results"]
    table = compare.compare(results, "ada", "clip")
    ada, clip = (pd.read_csv(results / r / "metrics.csv").set_index(["dataset", "category"]) for r in ("ada", "clip"))
    assert set(table.dataset) == {"visa", "mvtec", "headct", "kvasir", "mean"}
    assert set(table.metric) == set(METRIC_KEYS)
    assert (table.groupby("metric").dataset.apply(lambda d: d.iloc[-1]) == "mean").all()   # the mean last
    for row in table.itertuples(index=False):
        if row.dataset != "mean":                # the dataset's value: the mean over its categories
            for value, run in ((row.a, ada), (row.b, clip)):
                categories = run.loc[row.dataset]
                assert value == pytest.approx(categories[categories.index != "mean"][row.metric].mean(), abs=1e-12)
        assert row.difference == pytest.approx(row.a - row.b, abs=1e-12)
        assert row.difference_lo <= row.difference <= row.difference_hi, row
        assert 0 < row.p_value <= 1, row
        assert row.p_holm >= row.p_value if row.dataset != "mean" else np.isnan(row.p_holm), row
    image = table[table.metric == "image_auroc"].set_index("dataset")
    assert np.isfinite(image.loc[["visa", "mvtec", "headct"], "delong_p"]).all()
    assert "kvasir" not in image.index                                      # undefined for both runs
    # against itself: no difference, p = 1
    itself = compare.compare(results, "ada", "ada_again")
    assert (itself.difference == 0).all() and (itself.p_value == 1).all()
    assert (itself.difference_lo == 0).all() and (itself.difference_hi == 0).all()
    # the CLI writes the same table
    monkeypatch.setenv(RESULTS_ENV, str(results))
    assert cli.main(["compare", "ada", "clip"]) == 0
    written = pd.read_csv(results / "ada" / "compare.csv")
    pd.testing.assert_frame_equal(written, table.reset_index(drop=True), check_dtype=False)


def test_compare_refuses_runs_on_other_images_or_other_draws(runs):
    results = runs["results"]
    with pytest.raises(ValueError, match="visa_fewer.csv") as error:
        compare.compare(results, "ada", "clip_fewer")
    assert "'visa'" in str(error.value) and "sample/visa.csv" in str(error.value)
    with pytest.raises(ValueError, match="different bootstrap replicates"):
        compare.compare(results, "ada", "ada_seed1")
    with pytest.raises(ValueError, match="bootstrap"):
        compare.compare(results, "ada", "ada_none")
