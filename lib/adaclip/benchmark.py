"""Speed and memory numbers of a method, printed (never asserted in tests): ``adaclip benchmark``.

    adaclip benchmark --backbone ViT-B-16 --image-size 224         # AdaCLIP, batch 8, random weights, CPU
    adaclip benchmark --backbone ViT-L-14-336 --image-size 518 --batch-size 8 --device cuda
    adaclip benchmark --method winclip                             # at the method's own setting (240 px)
    adaclip benchmark --pipeline --backbone ViT-B-16                # input, metrics, model, whole evaluation

Against the floor, a bare open_clip image forward at the same size and batch: inference at batch
size 1 (the reference's only option) and at ``batch_size``, the ratio to the floor, for AdaCLIP the
time of each stage (unprompted pass, prompted pass, text pass, maps and HSF; "x image pass" = x the
floor), for a method that learns a training step and its peak memory at batch 1 and N (with and
without activation checkpointing), peak inference memory, and pixel-metric streaming. Weights are
random unless ``--pretrained`` names some (speed does not depend on them). Peak memory is the GPU's max allocated on CUDA, the
process's peak RSS on CPU (then each number comes from a fresh process, since RSS never shrinks).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import torch

from . import methods
from .backbone import encode_image
from .methods import Targets
from .metrics import PixelAccumulator
from .precision import autocast


def _timed(fn, device, repeats: int) -> float:
    return _timed_together([fn], device, repeats)[0]


def _timed_together(fns, device, repeats: int) -> list[float]:
    """The best of ``repeats`` timed calls of each function, the functions taking turns: a slow spell of
    a shared machine hits them alike, so their ratios hold (a floor and a model timed minutes apart do
    not share one)."""
    def once(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns:                                         # warm-up
        once(fn)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            best[k] = min(best[k], once(fn))
    return best


def peak_memory_mb(device) -> float:
    """GPU max allocated, or the process's peak RSS since `reset_peak_memory` (Linux: VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 1024       # KiB
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device) -> None:
    """Start a new peak: the model's construction (transient copies) does not count."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:                        # "5": reset the peak RSS
            f.write("5")
    except OSError:
        pass


def _step(model, opt, x, names, masks, labels, device):
    with autocast(device):
        out = model(x, names, targets=Targets(labels, masks, torch.ones_like(labels, dtype=torch.bool)))
    opt.zero_grad()
    out.loss.backward()
    opt.step()


def measure(kind: str, method: str, cfg, batch_size: int, device: str, checkpointing: bool = False) -> float:
    """Peak memory (MiB) of one inference ("infer") or training step ("train") in this process."""
    dev = torch.device(device)
    model = methods.get(method)(cfg).to(dev)
    model.checkpoint_activations = checkpointing
    size = cfg.backbone.image_size
    x, names = torch.randn(batch_size, 3, size, size, device=dev), ["bottle"] * batch_size
    reset_peak_memory(dev)
    if kind == "infer":
        with torch.no_grad(), autocast(dev):
            model.eval()(x, names)
    else:
        opt = torch.optim.AdamW(model.learnable_parameters(), lr=0.01, betas=(0.5, 0.999))
        masks = (torch.rand(batch_size, size, size, device=dev) > 0.9).float()
        _step(model.train(), opt, x, names, masks, torch.ones(batch_size, dtype=torch.long, device=dev), dev)
    return peak_memory_mb(dev)


def _peak_in_fresh_process(kind, method, cfg, batch_size, device, checkpointing=False) -> float:
    if torch.device(device).type == "cuda":                 # max allocated resets: no new process needed
        return measure(kind, method, cfg, batch_size, device, checkpointing)
    job = json.dumps({"kind": kind, "method": method, "cfg": cfg.to_dict(), "batch_size": batch_size,
                      "device": device, "checkpointing": checkpointing})
    done = subprocess.run([sys.executable, "-m", "adaclip.benchmark", "--measure", job], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def run(backbone: Optional[str] = None, image_size: Optional[int] = None, batch_size: int = 8, device: str = "cpu",
        repeats: int = 3, pretrained=None, cfg=None, memory: bool = True, method: str = "adaclip") -> list[tuple[str, str]]:
    """(name, value) rows for ``method`` at its paper's setting, with ``backbone`` / ``image_size``
    replaced where given and random weights unless ``pretrained``; ``cfg``: the whole config instead
    (e.g. ``AdaCLIPConfig.tiny()`` in the test suite)."""
    dev = torch.device(device)
    if cfg is None:
        fields = {k: v for k, v in dict(name=backbone, image_size=image_size).items() if v is not None}
        cfg = methods.config(method, backbone={**fields, "pretrained": pretrained})
    backbone, image_size, pretrained = cfg.backbone.name, cfg.backbone.image_size, cfg.backbone.pretrained
    model = methods.get(method)(cfg).to(dev).eval()
    visual = model.clip.visual
    N = batch_size
    x = torch.randn(N, 3, image_size, image_size, device=dev)
    names = ["bottle"] * N
    rows = [("config", f"{method}: {backbone} @ {image_size}, batch {N}, weights "
                       f"{'random' if pretrained is None else pretrained}, {device}, torch threads {torch.get_num_threads()}")]
    with torch.no_grad(), autocast(dev):
        floor1, t1 = _timed_together([lambda: visual(x[:1]), lambda: model(x[:1], names[:1])], dev, repeats)
        floor, tb = _timed_together([lambda: visual(x), lambda: model(x, names)], dev, repeats)
        stages = _adaclip_stages(model, x, names, tb, dev, repeats) if method == "adaclip" else {}
    rows += [(f"floor: bare open_clip image forward, batch {N}", f"{floor / N * 1e3:.0f} ms/image"),
             ("inference, batch 1", f"{t1 * 1e3:.0f} ms/image = {t1 / floor1:.2f}x the floor at batch 1"),
             (f"inference, batch {N}", f"{tb / N * 1e3:.0f} ms/image = {tb / floor:.2f}x the floor "
                                       f"({t1 * N / tb:.2f}x faster than batch 1)")]
    rows += [(f"  {name}, batch {N}", f"{t * 1e3:.0f} ms = {t / floor:.2f}x one image pass") for name, t in stages.items()]

    learns = bool(model.learnable_parameters())
    if learns:
        model.train()
        opt = torch.optim.AdamW(model.learnable_parameters(), lr=0.01, betas=(0.5, 0.999))
        for b in sorted({1, N}):
            masks = (torch.rand(b, image_size, image_size, device=dev) > 0.9).float()
            labels = torch.ones(b, dtype=torch.long, device=dev)
            ts = _timed(lambda: _step(model, opt, x[:b], names[:b], masks, labels, dev), dev, max(1, repeats - 1))
            rows.append((f"training step, batch {b}", f"{ts:.2f} s ({b / ts:.2f} images/s)"))
    else:
        rows.append(("training step", f"none: {method} learns nothing"))
    if memory:
        what = "GPU max allocated" if dev.type == "cuda" else "peak RSS, model loaded"
        for b in sorted({1, N}):
            rows.append((f"peak memory, inference batch {b}",
                         f"{_peak_in_fresh_process('infer', method, cfg, b, device):.0f} MiB ({what})"))
        for b in sorted({1, N}) if learns else ():
            plain = _peak_in_fresh_process("train", method, cfg, b, device)
            ckpt = _peak_in_fresh_process("train", method, cfg, b, device, checkpointing=True)
            rows.append((f"peak memory, training step batch {b}", f"{plain:.0f} MiB; {ckpt:.0f} MiB with activation "
                                                                  f"checkpointing ({what})"))

    acc = PixelAccumulator()
    maps = np.random.default_rng(0).random((8, 518, 518)).astype(np.float32)
    gt = np.zeros((518, 518), np.uint8)
    gt[100:200, 150:260] = 1
    start = time.perf_counter()
    for m in maps:
        acc.update(m, gt)
    acc.compute()
    per = (time.perf_counter() - start) / len(maps)
    state = (acc.hist.nbytes + acc.pro.nbytes) / 2 ** 20
    rows.append(("pixel metrics incl. AUPRO, 518x518 map", f"{per * 1e3:.0f} ms/image, {state:.0f} MiB state "
                 f"whatever the dataset size"))
    return rows


def _adaclip_stages(model, x, names, total: float, dev, repeats: int) -> dict:
    """The time of each stage as AdaCLIP.forward runs them."""
    visual, p = model.clip.visual, model.cfg.prompts
    f0, _ = encode_image(visual, x, ())
    dyn_v = model.visual_prompts.generate(f0) if model.visual_prompts is not None and p.dynamic else None
    dyn_t = model.text_prompts.generate(f0) if model.text_prompts is not None and p.dynamic else None
    stages = {"unprompted pass": _timed(lambda: encode_image(visual, x, ()), dev, repeats) if p.dynamic else 0.0}
    if model.visual_prompts is not None:
        prompts = model.visual_prompts.layer_prompts(dyn_v)
        stages["prompted pass"] = _timed(lambda: encode_image(visual, x, model.out_layers, prompts), dev, repeats)
    stages["text pass"] = _timed(lambda: model.text_features(names, dyn_t), dev, repeats)
    stages["maps and HSF (the rest)"] = max(total - sum(stages.values()), 0.0)
    return stages


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="adaclip benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="adaclip", choices=methods.available())
    p.add_argument("--backbone", default=None, help="default: the method's (AdaCLIP ViT-L-14-336, WinCLIP ViT-B-16-plus-240)")
    p.add_argument("--image-size", type=int, default=None, help="default: the method's (518, WinCLIP 240)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pretrained", default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--pipeline", action="store_true",
                   help="images/s of the input path, the metric path, the model forward and the whole evaluation "
                        "(benchmark_pipeline.py)")
    p.add_argument("--workers", type=int, default=None, help="--pipeline: loader workers (default: one per core)")
    p.add_argument("--images", type=int, default=64, help="--pipeline: images (the dataset's, repeated)")
    p.add_argument("--model-images", type=int, default=None,
                   help="--pipeline: images for the model forward and the whole evaluation (default --images)")
    p.add_argument("--dataset", default="mvtec", help="--pipeline: a dataset adapter (mvtec, visa, ...)")
    p.add_argument("--data-root", default=None, help="--pipeline: its data root (default: the embedded sample)")
    p.add_argument("--repeat", type=int, default=3, help="--pipeline: time each pass this many times, keep the best")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)       # internal: one measurement
    a = p.parse_args(argv)
    if a.measure:
        job = json.loads(a.measure)
        cfg = methods.get(job["method"]).config_class.from_dict(job["cfg"])
        print(measure(job["kind"], job["method"], cfg, job["batch_size"], job["device"], job["checkpointing"]))
        return
    if a.pipeline:
        from . import benchmark_pipeline
        rows = benchmark_pipeline.run(a.method, a.backbone, a.image_size, a.batch_size, a.workers, a.device,
                                      a.images, a.dataset, a.data_root, model_images=a.model_images, repeat=a.repeat)
    else:
        rows = run(a.backbone, a.image_size, a.batch_size, a.device, a.repeats, a.pretrained,
                   memory=not a.no_memory, method=a.method)
    for name, value in rows:
        print(f"{name:<50} {value}")


if __name__ == "__main__":
    main()
