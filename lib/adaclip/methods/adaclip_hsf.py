"""AdaCLIP's Hybrid Semantic Fusion (paper Sec. 3.3).

HSF clusters the most anomalous patch tokens and blends the mean cluster centre into the image
feature. The reference runs unseeded sklearn k-means image by image; the default here is a seeded,
batched k-means++ / Lloyd in torch whose result for an image does not depend on the rest of the
batch. ``kmeans="sklearn"`` keeps the reference behaviour (seeded through ``seed``).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


def kmeans(x: torch.Tensor, n_clusters: int, seed: int = 0, max_iter: int = 100) -> torch.Tensor:
    """Batched k-means. x: (B, K, C) -> labels (B, K).

    k-means++ seeding draws the same uniform numbers for every image (one generator seeded with
    ``seed``), so an image gets the same clusters alone or in any batch.
    """
    B, K, _ = x.shape
    k = min(n_clusters, K)
    x = x.float()
    u = _uniform_draws(seed, k).to(x.device)
    rows = torch.arange(B, device=x.device)
    first = (u[0] * K).long().clamp(max=K - 1).expand(B)
    centres = [x[rows, first]]                                             # k × (B, C)
    d2 = (x - centres[0][:, None]).pow(2).sum(-1)                          # (B, K)
    for c in range(1, k):
        cdf = d2.cumsum(-1)
        total = cdf[:, -1:]
        # all points identical to chosen centres: fall back to uniform choice
        cdf = torch.where(total > 0, cdf / total.clamp_min(1e-30), torch.arange(1, K + 1, device=x.device) / K)
        idx = (cdf < u[c]).sum(-1).clamp(max=K - 1)         # = searchsorted(cdf, u), also in ONNX
        centres.append(x[rows, idx])
        d2 = torch.minimum(d2, (x - centres[-1][:, None]).pow(2).sum(-1))
    centres = torch.stack(centres, dim=1)                                  # (B, k, C)

    # Exported graphs run all max_iter steps: once the labels stop changing every further step
    # repeats them exactly, so this equals stopping early (unless max_iter is reached either way).
    exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
    labels = None
    for _ in range(max_iter):
        # nearest centre by |c|² - 2 x·c (|x|² is the same for every centre): a batched matmul instead of
        # a (B, K, k, C) difference tensor; torch.cdist, which does the same for many rows, has no ONNX op
        new = (centres.pow(2).sum(-1)[:, None] - 2 * x @ centres.transpose(1, 2)).argmin(-1)   # (B, K)
        if not exporting and labels is not None and torch.equal(new, labels):
            break
        labels = new
        onehot = F.one_hot(labels, k).to(x.dtype)                          # (B, K, k)
        counts = onehot.sum(1)                                             # (B, k)
        sums = onehot.transpose(1, 2) @ x                                  # (B, k, C)
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
    return labels


@functools.lru_cache(maxsize=64)
def _uniform_draws(seed: int, k: int) -> torch.Tensor:
    """The seeding's k uniform numbers, drawn once per (seed, k): constants in an exported graph."""
    return torch.rand(k, generator=torch.Generator().manual_seed(seed))


def _sklearn_kmeans(x: torch.Tensor, n_clusters: int, seed) -> torch.Tensor:
    from sklearn.cluster import KMeans

    k = min(n_clusters, x.shape[1])
    out = [KMeans(n_clusters=k, n_init="auto", random_state=seed).fit_predict(xb.detach().float().cpu().numpy())
           for xb in x]
    return torch.as_tensor(np.stack(out), device=x.device).long()


def hybrid_semantic_fusion(patch_features: list[torch.Tensor], layer_logits: list[torch.Tensor],
                           k_clusters: int, seed: int = 0, method: str = "torch", return_clusters: bool = False,
                           max_iter: int = 100):
    """patch_features: per layer (B, N, D), L2-normalised; layer_logits: per layer (B, N, 2).

    Returns the fused feature h (B, D), L2-normalised: the mean over clusters of each cluster's mean
    token over all layers, for k-means on the top 5·k patches (layers concatenated along channels).
    ``return_clusters``: also the chosen patches (B, K) and their cluster labels (B, K).
    """
    prob = torch.softmax(torch.stack(layer_logits, 1).mean(1), dim=-1)[..., 1]   # (B, N)
    K = min(prob.shape[1], 5 * k_clusters)
    top = prob.topk(K, dim=1).indices                                             # (B, K)
    chosen = [f.gather(1, top[..., None].expand(-1, -1, f.shape[-1])) for f in patch_features]  # (B, K, D) each
    stacked = torch.cat(chosen, dim=-1).detach()                                  # (B, K, nL·D)
    if method == "sklearn":
        labels = _sklearn_kmeans(stacked, k_clusters, seed)
    else:
        labels = kmeans(stacked, k_clusters, seed, max_iter)
    k = min(k_clusters, K)
    # each layer's tokens count as separate rows (reference), so the centre is the layer mean
    mean_tokens = torch.stack(chosen, 0).mean(0)                                  # (B, K, D)
    onehot = F.one_hot(labels, k).to(mean_tokens.dtype)                           # (B, K, k)
    counts = onehot.sum(1)                                                        # (B, k)
    centres = (onehot.transpose(1, 2) @ mean_tokens) / counts.clamp_min(1)[..., None]  # (B, k, D)
    present = (counts > 0).to(centres.dtype)
    h = (centres * present[..., None]).sum(1) / present.sum(1, keepdim=True)      # mean over clusters
    h = F.normalize(h, dim=-1)
    return (h, top, labels) if return_clusters else h
