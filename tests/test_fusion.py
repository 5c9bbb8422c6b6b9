import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import adjusted_rand_score

from adaclip.methods.adaclip_hsf import hybrid_semantic_fusion, kmeans
from adaclip.methods.shared import gaussian_blur


@pytest.mark.parametrize("size", [32, 10])
def test_gaussian_blur_equals_scipy(size):
    x = torch.rand(2, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = gaussian_blur(x, 4.0)
    ref = np.stack([gaussian_filter(m, sigma=4) for m in x.numpy()])
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-10)


def test_kmeans_finds_separated_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + 0.3 * torch.randn(60, 2, generator=g)
    x = torch.stack([x, x.flip(0)])                                   # (2, 60, 2)
    labels = kmeans(x, 3, seed=0)
    assert adjusted_rand_score(truth, labels[0]) == 1.0
    assert adjusted_rand_score(truth.flip(0), labels[1]) == 1.0
    assert torch.equal(labels, kmeans(x, 3, seed=0))
    # an image's clusters do not depend on the rest of the batch
    assert torch.equal(kmeans(x[1:], 3, seed=0)[0], labels[1])


def test_kmeans_more_clusters_than_points():
    x = torch.randn(1, 4, 3)
    labels = kmeans(x, 20)
    assert sorted(labels[0].tolist()) == [0, 1, 2, 3]


def _reference_hsf(patch, logits, labels_fn, k_clusters):
    """The reference's loop (method/adaclip.py), per image, with given cluster labels."""
    amap = torch.softmax(torch.stack(logits, 1).mean(1), dim=2)[:, :, 1]
    K = min(amap.shape[1], 5 * k_clusters)
    top = torch.topk(amap, k=K, dim=1).indices
    sel = [p.gather(1, top[..., None].expand(-1, -1, p.shape[-1])) for p in patch]
    out = []
    for b in range(amap.shape[0]):
        labels = labels_fn(torch.cat(sel, 2)[b])
        centres = []
        for c in range(k_clusters):
            rows = torch.cat([s[b][labels == c] for s in sel], 0)
            centres.append(rows.mean(0, keepdim=True))
        out.append(torch.cat(centres).mean(0))
    return torch.nn.functional.normalize(torch.stack(out), dim=1)


def test_hsf_equals_reference_loop():
    g = torch.Generator().manual_seed(0)
    patch = [torch.nn.functional.normalize(torch.randn(2, 49, 8, generator=g), dim=-1) for _ in range(4)]
    logits = [torch.randn(2, 49, 2, generator=g) * 5 for _ in range(4)]
    ours = hybrid_semantic_fusion(patch, logits, k_clusters=3, seed=0)
    ref = _reference_hsf(patch, logits, lambda x: kmeans(x[None], 3, seed=0)[0], 3)
    torch.testing.assert_close(ours, ref)


def test_hsf_sklearn_option_runs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    patch = [torch.nn.functional.normalize(torch.randn(2, 49, 8, generator=g), dim=-1) for _ in range(4)]
    logits = [torch.randn(2, 49, 2, generator=g) for _ in range(4)]
    a = hybrid_semantic_fusion(patch, logits, 3, seed=5, method="sklearn")
    b = hybrid_semantic_fusion(patch, logits, 3, seed=5, method="sklearn")
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 8)
