"""Comparisons shared by the tests, with tolerances set by what float reordering can do."""
import numpy as np
import torch


def _array(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def assert_close_to_scale(actual, expected, what: str = "", rel: float = 1e-4) -> None:
    """Every element within ``rel`` x the largest magnitude of ``expected``.

    For a gradient (or any sum of many terms) reordering the reduction, as another thread count or
    batch layout does, moves an element by a few ulps of the terms' scale, not of the element: an
    element that cancels to near zero can differ by 100% of itself. Float32 sums here reorder to
    ~1e-6 of the tensor's scale; ``rel=1e-4`` leaves a hundredfold margin and still catches any
    wrong term, which moves elements by a sizeable fraction of the scale."""
    a, e = _array(actual), _array(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.isfinite(a).all() == np.isfinite(e).all(), f"{what}: non-finite values differ"
    scale = np.abs(e).max() if e.size else 0.0
    worst = np.abs(a - e).max() if e.size else 0.0
    assert worst <= rel * scale, f"{what}: largest difference {worst:.3g} exceeds {rel:g} x the scale {scale:.3g}"


def three_image_targets(S: int = 32):
    """A training batch's ground truth for 3 images: anomalous with two regions, normal (an all-zero
    mask), anomalous with three regions; (labels, masks, Targets)."""
    from adaclip.methods import Targets

    masks = torch.zeros(3, S, S)
    masks[0, 2:9, 3:12] = 1
    masks[0, 20:30, 18:27] = 1
    masks[2, 0:5, 0:6] = 1
    masks[2, 12:17, 14:31] = 1
    masks[2, 26:32, 2:8] = 1
    labels = torch.tensor([1, 0, 1])
    return labels, masks, Targets(labels, masks, torch.ones(3, dtype=torch.bool))
