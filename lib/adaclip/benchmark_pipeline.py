"""``adaclip benchmark --pipeline``: images per second of each part of an evaluation, so that a user
sees which one limits: the input path (decode, resize, normalise, AUPRO's region labelling in the
loader workers), the metric path (pixel histograms on the device, the cflow AUPRO with its counts),
the model forward, and the whole `evaluate`; and input + metrics together as `evaluate` runs them
with the model's forward replaced by ready maps (with the given workers and with none).

Real images of a dataset in its official layout (default: the embedded sample's MVTec AD bottles),
repeated to ``images``; random maps stand in for the model's in the metric path, random weights in
the model. Numbers are printed, never asserted.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Union

import pandas as pd
import torch
from torch.utils.data import DataLoader

from . import methods
from .config import EvalCfg
from .data import AnomalyDataset, build_manifest
from .data.dataset import collate
from .data.loading import loader_options, resolve_workers
from .data.sample import SAMPLE_ROOT
from .evaluate import evaluate
from .bootstrap import PIXEL_BINS
from .metrics import CflowAupro, PixelAccumulator
from .precision import autocast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.3g} images/s ({seconds / n * 1e3:.4g} ms/image)"


def _metric_pass(batches, device: torch.device, normalize) -> None:
    """Every batch's (random) maps through what evaluation does with them: the pixel histograms on
    ``device`` with the workers' region weights, the cflow AUPRO fed from host copies and counted."""
    acc = PixelAccumulator(device=device)
    cflow = CflowAupro()
    for maps, batch in batches:
        normalize(batch["image"].to(device, non_blocking=True))
        masks = batch["mask"].to(device, non_blocking=True)
        acc.update(maps, masks, batch["regions"])
        host = maps.cpu().numpy()
        for j in range(len(maps)):
            cflow.update(host[j], batch["mask"][j].numpy(), batch["regions"][j])
    acc.compute()
    thresholds = cflow.thresholds(cflow.extent())
    cflow.compute(thresholds, *cflow.counts(thresholds))
    cflow.close()


def forward_replaced(model, batch_size: int):
    """``model`` whose forward returns fixed random maps and scores at once: `evaluate` then does
    everything but the model's work (input, metrics, cflow AUPRO). Undo with ``del model.forward``."""
    size = model.image_size
    maps, scores = torch.rand(batch_size, size, size, device=model.device), torch.rand(batch_size, device=model.device)
    model.forward = lambda images, names, return_tokens=False: SimpleNamespace(
        pixel_scores=maps[:len(images)], image_scores=scores[:len(images)], score_parts=None)
    return model


def run(method: str = "adaclip", backbone: Optional[str] = None, image_size: Optional[int] = None,
        batch_size: int = 8, workers: Optional[int] = None, device: str = "cpu", images: int = 64,
        dataset: str = "mvtec", data_root: Union[str, Path, None] = None, cfg=None,
        model_images: Optional[int] = None, repeat: int = 3, intervals: tuple = (200, 1000)) -> list[tuple[str, str]]:
    """The rows `adaclip benchmark --pipeline` prints. ``model_images``: how many images the model
    forward and the whole evaluation run on (default ``images``; fewer for a large model on a CPU).
    ``repeat``: the input, metric and input + metrics passes are timed that many times and the best
    kept, as `timeit` does (a shared machine's noise only ever slows a pass down). ``intervals``: the
    bootstrap replicates whose cost is measured (input + metrics and the whole evaluation, against none)."""
    dev = torch.device(device)
    if cfg is None:
        fields = {k: v for k, v in dict(name=backbone, image_size=image_size).items() if v is not None}
        cfg = methods.config(method, backbone={**fields, "pretrained": None})
    size = cfg.backbone.image_size
    root = Path(data_root) if data_root else SAMPLE_ROOT
    base = build_manifest(dataset, root)
    base = base[base.split == "test"] if "split" in base and (base.split == "test").any() else base
    df = pd.concat([base] * -(-images // len(base)), ignore_index=True).iloc[:images]
    model = methods.get(method)(cfg).to(dev).eval()
    n_workers = resolve_workers(workers, -(-len(df) // batch_size))
    rows = [("config", f"{method}: {cfg.backbone.name} @ {size}, batch {batch_size}, {n_workers} loader workers "
                       f"({'auto' if workers is None else 'given'}), {len(df)} images of {dataset} from {root}, "
                       f"{device}, torch threads {torch.get_num_threads()}, best of {max(1, repeat)}")]

    def loader(n: int, regions: bool) -> DataLoader:
        data = AnomalyDataset(df, root, model.loader_transform if regions else model.transform, size, regions=regions)
        return DataLoader(data, batch_size=batch_size, collate_fn=collate, **loader_options(n, dev))

    normalize = model.normalize

    def timed_input(n: int, regions: bool) -> float:
        start = time.perf_counter()
        for batch in loader(n, regions):
            normalize(batch["image"].to(dev, non_blocking=True))
        _sync(dev)
        return time.perf_counter() - start

    for col in ("image", "mask"):                      # the files in the OS cache: no run pays the first read
        for rel in set(df[col]) - {""}:
            (root / rel).read_bytes()

    def best(f, *settings) -> list[float]:
        """The best time of each setting, the settings taking turns (a slow spell hits all alike)."""
        times = [[f(*a) for a in settings] for _ in range(max(1, repeat))]
        return [min(t) for t in zip(*times)]

    t_in, t_in0 = best(timed_input, (n_workers, True), (0, False))
    rows += [(f"input, {n_workers} workers (regions labelled there)", _rate(len(df), t_in)),
             ("input, 0 workers (the previous default)", _rate(len(df), t_in0))]

    batches = [(torch.rand(len(b["index"]), size, size, device=dev), b) for b in loader(0, True)]

    def timed_metrics() -> float:
        _sync(dev)
        start = time.perf_counter()
        _metric_pass(batches, dev, normalize)
        return time.perf_counter() - start

    t_m, = best(timed_metrics, ())
    rows.append((f"metrics on {device} (histograms, cflow AUPRO with its counts)", _rate(len(df), t_m)))

    def input_and_metrics(n: int, replicates: int = EvalCfg.bootstrap) -> float:
        forward_replaced(model, batch_size)
        try:
            start = time.perf_counter()
            evaluate(model, df, root, EvalCfg(batch_size=batch_size, num_workers=n, bootstrap=replicates),
                     progress=False, validate_files=False)
            _sync(dev)
            return time.perf_counter() - start
        finally:
            del model.forward

    t_im, t_im0 = best(input_and_metrics, (n_workers,), (0,))
    default = f"intervals B={EvalCfg.bootstrap}, the default"
    rows += [(f"input + metrics (evaluate, forward replaced), {n_workers} workers",
              f"{_rate(len(df), t_im)}; {t_im0 / t_im:.2f}x 0 workers ({default})"),
             ("input + metrics (evaluate, forward replaced), 0 workers", f"{_rate(len(df), t_im0)} ({default})")]
    # the 95% intervals' cost (bootstrap.py): the same pass without them and at each number of replicates
    settings = [(n_workers, b) for b in (0, *intervals)]
    times = dict(zip([b for _, b in settings], best(input_and_metrics, *settings)))
    rows.append((f"input + metrics, {n_workers} workers, no intervals (B=0)", _rate(len(df), times[0])))
    for b in intervals:
        rows.append((f"input + metrics, intervals B={b} (0: none)",
                     f"{_rate(len(df), times[b])}; {times[b] / times[0] - 1:+.0%} time against none"))
    state = lambda b: (b + 1) * (3 * PIXEL_BINS + 1) * 8 / 2 ** 20  # noqa: E731
    rows.append(("intervals' pixel state per annotated category",
                 ", ".join(f"B={b}: {state(b):.1f} MiB" for b in intervals) + " (fixed, whatever the number of images)"))

    x, names = torch.randn(batch_size, 3, size, size, device=dev), ["bottle"] * batch_size
    with torch.no_grad(), autocast(dev):
        model(x, names)
        _sync(dev)
        start = time.perf_counter()
        n_model = model_images or len(df)
        steps = max(1, n_model // batch_size)
        for _ in range(steps):
            model(x, names)
        _sync(dev)
    t_f = (time.perf_counter() - start) / (steps * batch_size)                 # per image
    rows.append((f"model forward, batch {batch_size}", _rate(1, t_f)))

    def whole(replicates: int) -> float:
        start = time.perf_counter()
        evaluate(model, df.iloc[:n_model], root, EvalCfg(batch_size=batch_size, num_workers=workers, bootstrap=replicates),
                 progress=False, validate_files=False)
        _sync(dev)
        return (time.perf_counter() - start) / min(n_model, len(df))

    whole_times = dict(zip((0, *intervals), best(whole, *[(b,) for b in (0, *intervals)])))
    t_e = whole_times[0]
    rows.append((f"whole evaluation ({min(n_model, len(df))} images), no intervals",
                 f"{_rate(1, t_e)} = {t_f / t_e:.0%} of the model-forward rate"))
    for b in intervals:
        rows.append((f"whole evaluation, intervals B={b}",
                     f"{_rate(1, whole_times[b])}; {whole_times[b] / t_e - 1:+.0%} time against none"))
    limit = min([("input", t_in / len(df)), ("metrics", t_m / len(df)), ("model", t_f)], key=lambda r: -r[1])[0]
    rows.append(("limited by", limit))
    return rows
