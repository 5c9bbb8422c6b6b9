"""Training losses as the reference computes them (ADACLIP_SPEC.md, "Training")."""
from __future__ import annotations

import torch


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on probabilities (not logits), alpha 1, mean over all elements.

    probs: (B, C) or (B, C, H, W); target: class indices (B,) or (B, H, W) (floats 0/1 are fine).
    The one-hot target is clamped to [smooth, 1 - smooth] and ``pt = sum(onehot * p) + smooth``.
    """
    C = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, C)                                   # (M, C)
    t = target.reshape(-1).long()
    onehot = torch.nn.functional.one_hot(t, C).to(p.dtype).clamp(smooth / (C - 1), 1.0 - smooth)
    pt = (onehot * p).sum(-1) + smooth
    return (-(1 - pt).pow(gamma) * pt.log()).mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, mode: str = "per_image") -> torch.Tensor:
    """1 - mean over samples of (2·Σpt + 1) / (Σp + Σt + 1). probs, target: (B, H, W).

    ``mode="per_row"`` treats every image row as a sample: what the reference computes at batch
    size 1, where the squeezed (H, W) mask makes Dice see H samples.
    """
    if mode == "per_row":
        probs, target = probs.reshape(-1, probs.shape[-1]), target.reshape(-1, target.shape[-1])
    else:
        probs, target = probs.reshape(probs.shape[0], -1), target.reshape(target.shape[0], -1)
    dice = (2 * (probs * target).sum(1) + 1) / (probs.sum(1) + target.sum(1) + 1)
    return 1 - dice.mean()


def adaclip_loss(image_probs: torch.Tensor, layer_maps: list[torch.Tensor], labels: torch.Tensor,
                 masks: torch.Tensor, dice_mode: str = "per_image") -> tuple[torch.Tensor, dict]:
    """Focal(image score) + Σ over layers of Focal(map) + Dice(abnormal, mask) + Dice(normal, 1 - mask)."""
    image = focal_loss(image_probs, labels)
    seg = sum(focal_loss(m, masks) + dice_loss(m[:, 1], masks, dice_mode) + dice_loss(m[:, 0], 1 - masks, dice_mode)
              for m in layer_maps)
    return image + seg, {"image_focal": float(image.detach()), "segmentation": float(seg.detach()) if torch.is_tensor(seg) else 0.0}
