"""Speed and memory numbers, printed (never asserted in tests): ``adaclip benchmark``.

    adaclip benchmark                                   # ViT-B-16 @ 224, random weights, CPU
    adaclip benchmark --backbone ViT-L-14-336 --image-size 518 --batch-size 8 --device cuda

Measures inference images/s at batch size 1 (the reference's only option) and at ``batch_size``,
one training step, the text pass with and without padding truncation, and pixel-metric streaming.
"""
from __future__ import annotations

import resource
import time
from typing import Optional

import numpy as np
import torch

from .config import AdaCLIPConfig
from .losses import adaclip_loss
from .metrics import PixelAccumulator
from .model import AdaCLIP
from .model.backbone import encode_text


def _timed(fn, device, repeats: int) -> float:
    fn()                                                   # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


def run(backbone: str = "ViT-B-16", image_size: int = 224, batch_size: int = 8, device: str = "cpu",
        repeats: int = 3, pretrained=None, cfg: Optional[AdaCLIPConfig] = None) -> list[tuple[str, str]]:
    """(name, value) rows. ``cfg`` replaces the paper's prompt and fusion settings on ``backbone``
    (e.g. ``AdaCLIPConfig.tiny()`` in the test suite)."""
    dev = torch.device(device)
    cfg = cfg or AdaCLIPConfig.from_params(backbone, pretrained, image_size)
    backbone, image_size, pretrained = cfg.backbone.name, cfg.backbone.image_size, cfg.backbone.pretrained
    model = AdaCLIP(cfg).to(dev).eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    names = ["bottle"] * batch_size
    rows = [("config", f"{backbone} @ {image_size}, weights {'random' if pretrained is None else pretrained}, "
                       f"{device}, torch threads {torch.get_num_threads()}")]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), amp:
        t1 = _timed(lambda: model(x[:1], names[:1]), dev, repeats)
        tb = _timed(lambda: model(x, names), dev, repeats)
    rows += [("inference, batch 1", f"{1 / t1:.2f} images/s"),
             (f"inference, batch {batch_size}", f"{batch_size / tb:.2f} images/s ({t1 * batch_size / tb:.2f}x)")]

    tokens = torch.stack([model._tokens_for("bottle")] * batch_size).to(dev)
    feature = torch.randn(batch_size, model.cls_proj.in_features, device=dev)
    with torch.no_grad(), amp:
        prompts = model.text_prompts.layer_prompts(model.text_prompts.generate(feature)) if model.text_prompts else None
        full = _timed(lambda: encode_text(model.clip, tokens, prompts, truncate=False), dev, repeats)
        short = _timed(lambda: encode_text(model.clip, tokens, prompts, truncate=True), dev, repeats)
    rows.append((f"text pass, {batch_size}x{tokens.shape[1]} sentences", f"{full * 1e3:.0f} ms padded, "
                 f"{short * 1e3:.0f} ms truncated after EOT ({full / short:.1f}x)"))

    model.train()
    opt = torch.optim.AdamW(model.learnable_parameters(), lr=0.01, betas=(0.5, 0.999))
    masks = (torch.rand(batch_size, image_size, image_size, device=dev) > 0.9).float()
    labels = torch.ones(batch_size, dtype=torch.long, device=dev)

    def step():
        with amp:
            out = model(x, names, return_layer_maps=True)
        loss, _ = adaclip_loss(out.image_probs.float(), [m.float() for m in out.layer_maps], labels, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ts = _timed(step, dev, max(1, repeats - 1))
    rows.append((f"training step, batch {batch_size}", f"{ts:.2f} s ({batch_size / ts:.2f} images/s)"))
    rows.append(("peak memory", f"{peak_memory_mb(dev):.0f} MiB ({'GPU allocated' if dev.type == 'cuda' else 'process RSS'})"))

    acc = PixelAccumulator()
    maps = np.random.default_rng(0).random((8, 518, 518)).astype(np.float32)
    gt = np.zeros((518, 518), np.uint8)
    gt[100:200, 150:260] = 1
    start = time.perf_counter()
    for m in maps:
        acc.update(m, gt)
    acc.compute()
    per = (time.perf_counter() - start) / len(maps)
    state = (acc.pos.nbytes + acc.neg.nbytes + acc.pro.nbytes) / 2 ** 20
    rows.append(("pixel metrics incl. AUPRO, 518x518 map", f"{per * 1e3:.0f} ms/image, {state:.0f} MiB state "
                 f"whatever the dataset size"))
    return rows


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="adaclip benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pretrained", default=None)
    a = p.parse_args(argv)
    for name, value in run(a.backbone, a.image_size, a.batch_size, a.device, a.repeats, a.pretrained):
        print(f"{name:<42} {value}")


if __name__ == "__main__":
    main()
