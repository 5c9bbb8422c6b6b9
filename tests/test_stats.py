"""DeLong's test against the textbook pairwise definition written out here (and a case worked by hand),
scikit-learn's AUROC, its size under the null; Holm against a worked example."""
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from adaclip.stats import delong, delong_components, delong_mean, holm

KEYS = ("auroc_a", "auroc_b", "difference", "variance", "z", "p_value", "variance_a", "variance_b", "covariance")


def psi(x, y):
    return 1.0 if x > y else 0.5 if x == y else 0.0


def textbook_delong(labels, scores_a, scores_b):
    """DeLong et al. (1988) by the definition, one comparison at a time: V10_i = mean_j psi(X_i, Y_j)
    over the normal images, V01_j = mean_i psi(X_i, Y_j) over the anomalous ones, S10 / S01 their
    sample covariance matrices (ddof=1) across the two methods, var = S10 / m + S01 / n."""
    pos = [i for i, l in enumerate(labels) if l == 1]
    neg = [j for j, l in enumerate(labels) if l == 0]
    m, n = len(pos), len(neg)
    methods = (scores_a, scores_b)
    v10 = [[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in methods]
    v01 = [[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in methods]
    auc = [sum(psi(s[i], s[j]) for i in pos for j in neg) / (m * n) for s in methods]

    def cov(u, w):
        mu, mw = sum(u) / len(u), sum(w) / len(w)
        return sum((u[k] - mu) * (w[k] - mw) for k in range(len(u))) / (len(u) - 1)

    s10 = [[cov(v10[r], v10[c]) for c in range(2)] for r in range(2)]
    s01 = [[cov(v01[r], v01[c]) for c in range(2)] for r in range(2)]
    s = [[s10[r][c] / m + s01[r][c] / n for c in range(2)] for r in range(2)]
    var = s[0][0] + s[1][1] - 2 * s[0][1]
    z = (auc[0] - auc[1]) / math.sqrt(var)
    return dict(auroc_a=auc[0], auroc_b=auc[1], difference=auc[0] - auc[1], variance=var, z=z,
                p_value=math.erfc(abs(z) / math.sqrt(2)), variance_a=s[0][0], variance_b=s[1][1], covariance=s[0][1],
                v10=v10, v01=v01)


# 5 anomalous, 6 normal, interleaved; ties within and across the classes in both methods
LABELS = [1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1]
SCORES_A = [0.9, 0.3, 0.5, 0.5, 0.1, 0.7, 0.5, 0.3, 0.2, 0.7, 0.8]
SCORES_B = [0.6, 0.6, 0.4, 0.8, 0.2, 0.4, 0.1, 0.6, 0.3, 0.7, 0.4]


def test_delong_matches_the_textbook_definition():
    want = textbook_delong(LABELS, SCORES_A, SCORES_B)
    got = delong(LABELS, SCORES_A, SCORES_B)
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-12, rel=0), k
    assert (got["n_anomalous"], got["n_normal"]) == (5, 6)
    for scores, v10, v01 in zip((SCORES_A, SCORES_B), want["v10"], want["v01"]):
        auc, g10, g01 = delong_components(LABELS, scores)
        np.testing.assert_allclose(g10, v10, rtol=0, atol=1e-12)          # in the images' order
        np.testing.assert_allclose(g01, v01, rtol=0, atol=1e-12)
        assert auc == pytest.approx(roc_auc_score(LABELS, scores), abs=1e-12)


def test_delong_worked_by_hand():
    # anomalous A = (0.9, 0.5), B = (0.8, 0.3); normal A = (0.5, 0.1), B = (0.6, 0.2)
    # A: psi(.9,.5)=1 psi(.9,.1)=1 psi(.5,.5)=1/2 psi(.5,.1)=1 -> V10 = (1, 3/4), V01 = (3/4, 1), AUROC 7/8
    # B: psi(.8,.6)=1 psi(.8,.2)=1 psi(.3,.6)=0   psi(.3,.2)=1 -> V10 = (1, 1/2), V01 = (1/2, 1), AUROC 3/4
    # S10: var A = 2 (1/8)^2 = 1/32, var B = 2 (1/4)^2 = 1/8, cov = 2 (1/8)(1/4) = 1/16; S01 the same
    # var_a = 1/32/2 + 1/32/2 = 1/32, var_b = 1/8, cov = 1/16, var(diff) = 1/32 + 1/8 - 1/8 = 1/32
    # z = (1/8) / sqrt(1/32) = 1/sqrt(2), p = 2 (1 - Phi(1/sqrt 2)) = erfc(1/2) = 0.47950012218695...
    got = delong([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1], [0.8, 0.6, 0.3, 0.2])
    want = dict(auroc_a=0.875, auroc_b=0.75, difference=0.125, variance=1 / 32, variance_a=1 / 32, variance_b=1 / 8,
                covariance=1 / 16, z=1 / math.sqrt(2), p_value=0.4795001221869535)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12, rel=0), k


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_components_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)                     # heavy ties
    auc, v10, v01 = delong_components(labels, scores)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert (len(v10), len(v01)) == (labels.sum(), (1 - labels).sum())
    assert v10.mean() == pytest.approx(auc, abs=1e-12) and v01.mean() == pytest.approx(auc, abs=1e-12)
    assert delong(labels, scores, -scores)["auroc_b"] == pytest.approx(1 - auc, abs=1e-12)


def test_identical_scores_and_a_large_difference():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(1000), np.zeros(1000)].astype(int)
    strong = rng.normal(size=2000) + 2 * labels
    same = delong(labels, strong, strong.copy())
    assert (same["difference"], same["variance"], same["z"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    weak = strong + rng.normal(scale=3, size=2000)                           # same images, much noisier
    res = delong(labels, strong, weak)
    assert res["difference"] > 0.1 and res["z"] > 0 and res["p_value"] < 1e-6
    flipped = delong(labels, weak, strong)                                    # antisymmetric, two-sided
    assert flipped["z"] == pytest.approx(-res["z"]) and flipped["p_value"] == pytest.approx(res["p_value"])


def test_undefined_cases():
    one_class = delong([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    assert all(math.isnan(one_class[k]) for k in KEYS)
    single = delong([1, 0, 0], [0.9, 0.1, 0.2], [0.8, 0.3, 0.1])       # AUROCs defined, variance (ddof=1) not
    assert single["auroc_a"] == 1.0 and math.isnan(single["variance"]) and math.isnan(single["p_value"])
    perfect = delong([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.8])  # variance 0, difference 1
    assert perfect["variance"] == 0 and perfect["difference"] == 1 and math.isnan(perfect["p_value"])
    with pytest.raises(ValueError):
        delong([0, 1, 2], [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError):
        delong([0, 1], [0, 1], [0, 1, 2])


def test_size_under_the_null():
    """Two methods with the same binormal score distribution, correlated through a shared latent on the
    same images: a 5% test rejects in about 5% of 500 simulations."""
    rng = np.random.default_rng(2024)
    labels = np.r_[np.ones(50), np.zeros(50)].astype(int)
    rejected = 0
    for _ in range(500):
        latent = rng.normal(size=100) + 1.0 * labels
        a = latent + rng.normal(size=100)
        b = latent + rng.normal(size=100)
        rejected += delong(labels, a, b)["p_value"] < 0.05
    assert 0.02 <= rejected / 500 <= 0.08, rejected


def _random_category(rng, n_anomalous, n_normal):
    labels = np.r_[np.ones(n_anomalous), np.zeros(n_normal)].astype(int)
    latent = rng.normal(size=len(labels)) + labels
    return labels, np.round(latent + rng.normal(size=len(labels)), 1), latent + 0.5 * rng.normal(size=len(labels))


def test_delong_mean():
    rng = np.random.default_rng(1)
    one, two = _random_category(rng, 12, 30), _random_category(rng, 25, 9)
    single, alone = delong_mean([one]), delong(*one)
    for k in KEYS:
        assert single[k] == pytest.approx(alone[k], abs=1e-15, rel=0), k
    r1, r2 = delong(*two), alone
    got = delong_mean([two, ([1, 1], [0.5, 0.6], [0.1, 0.2]), one])       # the middle one has no normal image
    assert (got["categories"], got["left_out"]) == (2, [1])
    var = (r1["variance"] + r2["variance"]) / 4                             # independent categories / C^2
    diff = (r1["auroc_a"] + r2["auroc_a"]) / 2 - (r1["auroc_b"] + r2["auroc_b"]) / 2
    want = dict(auroc_a=(r1["auroc_a"] + r2["auroc_a"]) / 2, auroc_b=(r1["auroc_b"] + r2["auroc_b"]) / 2,
                difference=diff, variance=var, z=diff / math.sqrt(var), p_value=math.erfc(abs(diff) / math.sqrt(2 * var)),
                variance_a=(r1["variance_a"] + r2["variance_a"]) / 4, variance_b=(r1["variance_b"] + r2["variance_b"]) / 4,
                covariance=(r1["covariance"] + r2["covariance"]) / 4)
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-12, rel=0), k
    assert delong_mean([one, one])["variance"] == pytest.approx(alone["variance"] / 2, abs=1e-15)
    none = delong_mean([([0, 0], [0.1, 0.2], [0.2, 0.1])])
    assert none["categories"] == 0 and math.isnan(none["p_value"])


def test_holm():
    # m = 4, sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06 for 0.04
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=0, atol=1e-15)
    got = holm([0.01, np.nan, 0.04, 0.03, np.nan, 0.005])                    # NaN kept, not counted (m = 4)
    np.testing.assert_allclose(got, [0.03, np.nan, 0.06, 0.06, np.nan, 0.02], rtol=0, atol=1e-15)
    np.testing.assert_allclose(holm([0.3, 0.6, 0.2]), [0.6, 0.6, 0.6])    # 0.6, 0.6, max(0.6, 0.6)
    np.testing.assert_allclose(holm([0.6, 0.9]), [1.0, 1.0])               # capped: 0.6 x 2 = 1.2, 0.9 x 1
    np.testing.assert_allclose(holm([0.7, 0.45]), [0.9, 0.9])              # 0.45 x 2 = 0.9 carried up to 0.7
    np.testing.assert_allclose(holm([0.02]), [0.02])
    assert holm([]).shape == (0,) and np.isnan(holm([np.nan, np.nan])).all()
