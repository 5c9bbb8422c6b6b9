"""Zero-shot evaluation over manifests: metrics.csv, scores.csv and (optionally) anomaly maps."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import bootstrap, distributed
from .config import EvalCfg
from .data import AnomalyDataset, check, read_manifests
from .data.dataset import collate
from .data.loading import input_seconds, loader_options, resolve_workers, torch_threads
from .fewshot import draw_references, memory_from_references, reference_list
from .io import atomic_path, write_csv, write_json
from .metrics import METRIC_KEYS, CflowAupro, PixelAccumulator, image_metrics, mean_row, summarize
from .precision import autocast
from .runs import update_config, weights_note

PathLike = Union[str, Path]
THRESHOLDS = "thresholds.json"   # beside model.pt in a run folder: what `adaclip predict` decides with
TRANSDUCTIVE_NOTE = "transductive image scores (normalised over the category's test images, as the reference)"


@dataclass
class EvalResult:
    metrics: pd.DataFrame   # one row per dataset/category, a mean row per dataset (and overall)
    scores: pd.DataFrame    # one row per image: score, label, F1-optimal decision
    pixel_curves: Optional[pd.DataFrame] = None   # ROC / PR points from the pixel histograms (with run_dir)


def as_manifest(manifests) -> pd.DataFrame:
    return manifests if isinstance(manifests, pd.DataFrame) else read_manifests(manifests)


@torch.no_grad()
def evaluate(model, manifests, data_root: PathLike, cfg: Optional[EvalCfg] = None, run_dir: Optional[PathLike] = None,
             progress: bool = True, validate_files: bool = True, references=None) -> EvalResult:
    """Run ``model`` over ``manifests`` (DataFrame or CSV paths) in batches and score it.

    Pixel metrics use only images with pixel ground truth, at the model's input size (or
    ``cfg.pixel_metric_size``); image-level-only datasets get NaN pixel metrics with a note.
    The pipeline keeps the model busy: loader workers decode images and label AUPRO's regions, the
    pixel histograms accumulate on the model's device, and maps come back to the host only for
    the cflow AUPRO or to be saved, which a writer thread does beside the loop.
    ``cfg.k_shot > 0``: few-shot mode (fewshot.py); the references are drawn with ``cfg.shot_seed``
    from the normal training images (split "train") of each category in ``references`` (DataFrame
    or CSV paths; default: ``manifests`` themselves) and listed in config.json.
    """
    cfg = cfg or EvalCfg()
    df = as_manifest(manifests).reset_index(drop=True)
    drawn = None
    if cfg.k_shot:
        pool = as_manifest(references) if references is not None else df
        drawn = draw_references(pool, df, cfg.k_shot, cfg.shot_seed)
    if validate_files:
        check(df, data_root)
        if drawn:
            check(pd.concat(drawn.values(), ignore_index=True), data_root)
    device = model.device
    was_training = model.training
    model.eval()
    memory = memory_from_references(model, drawn, data_root) if drawn else None
    resized = bool(cfg.pixel_metric_size) and cfg.pixel_metric_size != model.image_size
    # the loader workers label AUPRO's regions unless the maps are scored at another size
    dataset = AnomalyDataset(df, data_root, model.loader_transform, model.image_size, regions=cfg.aupro and not resized)
    normalize = model.normalize
    # under torchrun each rank scores every world_size-th image; the results are summed below
    mine = distributed.shard(len(df))
    work = input_seconds(dataset, mine[0], len(mine)) if cfg.num_workers is None and mine else None
    workers = resolve_workers(cfg.num_workers, -(-len(mine) // cfg.batch_size), work)
    loader = DataLoader(Subset(dataset, mine), batch_size=cfg.batch_size, shuffle=False, collate_fn=collate,
                        **loader_options(workers, device))
    # on the CPU beside workers: the loop's own ops on one thread, the model on all (loading.torch_threads)
    loop_threads, model_threads = (1, torch.get_num_threads()) if device.type == "cpu" and workers else (None, None)
    keys = list(dict.fromkeys(zip(df.dataset, df.category)))
    key_of = list(zip(df.dataset, df.category))
    rows_of = {key: (df.dataset == key[0]).values & (df.category == key[1]).values for key in keys}
    # the bootstrap: each image's column among its category's images, each category's resample counts
    column = np.zeros(len(df), np.int64)
    for rows in rows_of.values():
        column[rows] = np.arange(rows.sum())
    resamples = {key: bootstrap.resample_counts(df.label.values[rows], cfg.bootstrap, cfg.bootstrap_seed, *key)
                 for key, rows in rows_of.items()} if cfg.bootstrap else {}
    # one accumulator per category with pixel ground truth (none for image-level datasets), on the device
    pixels = {key: PixelAccumulator(fpr_limit=cfg.aupro_fpr_limit, aupro=cfg.aupro, device=device,
                                    replicates=bootstrap.PixelReplicates(resamples[key], device=device)
                                    if cfg.bootstrap else None)
              for key in dict.fromkeys(k for k, m in zip(key_of, dataset.has_mask) if m)}
    cflow = {key: CflowAupro(fpr_limit=cfg.aupro_fpr_limit) for key in pixels} if cfg.aupro_cflow else {}
    scored_index, scored_values, scored_parts = [], [], []
    maps_dir = Path(run_dir) / "maps" if (run_dir and cfg.save_maps) else None
    # a category's cflow counts need all its maps: without ranks to agree with, the writer counts
    # each category as soon as its last map arrives, beside the loop, instead of all after it
    last = Counter(key_of[i] for i in mine if dataset.has_mask[i]) if not distributed.active() else {}
    writer = MapWriter(df, cflow, maps_dir, last, column=column, resamples=resamples) \
        if (cflow or maps_dir is not None) else None

    # the bar never holds the loader: a notebook's progress widget outlives the call, and workers freed
    # later by the garbage collector take seconds each to stop (freed here when the loop ends)
    bar = tqdm(total=len(loader), desc="evaluate", disable=not progress or not distributed.is_main())
    try:
        with torch_threads(loop_threads):
            for batch in _counted(loader, bar):
                index = batch["index"].tolist()
                images = normalize(batch["image"].to(device, non_blocking=True))
                with autocast(device), torch_threads(model_threads):
                    out = model(images, list(batch["class_name"]), return_tokens=memory is not None)
                    if memory is not None:
                        out = memory.apply(out, [f"{df.at[i, 'dataset']}/{df.at[i, 'category']}" for i in index])
                maps, masks = out.pixel_scores.float(), batch["mask"].to(device, non_blocking=True)
                if resized:
                    size = (cfg.pixel_metric_size,) * 2
                    maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                    masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0]
                maps = maps.clamp(0, 1)
                scored_index.append(batch["index"])
                scored_values.append(out.image_scores.detach().double())
                if model.transductive and out.score_parts is not None:
                    # a transductive image score (a reference's faithful option: APRIL-GAN's few-shot,
                    # AA-CLIP's) needs every test image of a category: its parts are collected here
                    scored_parts.append(out.score_parts.detach().double())
                # the annotated images of each category in the batch, one histogram update per category
                groups: dict = {}
                for j, i in enumerate(index):
                    if batch["has_mask"][j]:
                        groups.setdefault(key_of[i], []).append(j)
                for key, js in groups.items():
                    # a run of the batch (the usual case, test sets sorted by category) as a view, no copy
                    sel = slice(js[0], js[-1] + 1) if js[-1] - js[0] == len(js) - 1 else torch.tensor(js, device=device)
                    pixels[key].update(maps[sel], masks[sel], [batch["regions"][j] for j in js] if "regions" in batch else None,
                                       images=[int(column[index[j]]) for j in js])
                if writer is not None:
                    writer.submit(maps, masks, index, [bool(h) for h in batch["has_mask"]], batch.get("regions"))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    del loader
    model.train(was_training)
    scores, parts = np.zeros(len(df), np.float64), None
    if scored_index:
        done = torch.cat(scored_index).numpy()
        scores[done] = torch.cat(scored_values).cpu().numpy()
        if scored_parts:
            parts = np.zeros((len(df), scored_parts[0].shape[1]), np.float64)
            parts[done] = torch.cat(scored_parts).cpu().numpy()
    scores = distributed.sum_array(scores)               # each image was scored by exactly one rank
    if distributed.active() and model.transductive:      # a rank with no image has no parts to add
        width = -int(distributed.min_array(np.array([-(0 if parts is None else parts.shape[1])]))[0])
        parts = np.zeros((len(df), width)) if parts is None and width else parts
    transductive = parts is not None
    if transductive:
        parts = distributed.sum_array(parts)
        for key, sel in rows_of.items():
            scores[sel] = model.finalize_scores(parts[sel])
    for acc in pixels.values():
        acc.set_counts(*[distributed.sum_array(a) for a in acc.counts()])
    cflow_values = {key: writer.finished[key] if key in writer.finished else _cflow_aupro(acc, resamples.get(key))
                    for key, acc in cflow.items()}

    rows, scored = [], df[["dataset", "category", "image", *(["crop"] if "crop" in df else []), "label"]].copy()
    scored["score"], scored["threshold"], scored["decision"] = scores, np.nan, pd.NA
    for key, sel in rows_of.items():
        m = summarize(df.label.values[sel], scores[sel], pixels.get(key),
                      cflow_values.get(key, (np.nan, "pixel_aupro_cflow not computed (aupro_cflow=False)", None))[:2])
        if transductive:
            m["note"] = "; ".join(filter(None, [TRANSDUCTIVE_NOTE, m["note"]]))
        rows.append({"dataset": key[0], "category": key[1], "images": int(sel.sum()),
                     "anomalous": int(df.label.values[sel].sum()), **m})
        if np.isfinite(m["image_threshold"]):
            scored.loc[sel, "threshold"] = m["image_threshold"]
            scored.loc[sel, "decision"] = (scores[sel] >= m["image_threshold"]).astype(int)
    deviations = _deviations(keys, rows_of, df.label.values, scores, resamples, pixels, cflow_values, cfg) \
        if cfg.bootstrap else None
    metrics = with_intervals(_with_means(rows), keys, deviations)
    # curve points and thresholds are for the run folder; validation during training needs neither
    curves = pixel_curves(pixels) if run_dir is not None else None
    if run_dir is not None and distributed.is_main():
        write_csv(Path(run_dir) / "metrics.csv", metrics)
        write_csv(Path(run_dir) / "scores.csv", scored)
        write_csv(Path(run_dir) / "pixel_curves.csv", curves)
        write_json(Path(run_dir) / THRESHOLDS, decision_thresholds(metrics, scored, pixels))
        if deviations is not None:
            bootstrap.save(Path(run_dir) / bootstrap.FILE, keys, deviations, cfg.bootstrap, cfg.bootstrap_seed)
        else:
            Path(run_dir, bootstrap.FILE).unlink(missing_ok=True)     # never another evaluation's replicates
        update_config(run_dir, model=model.cfg.to_dict(), evaluation=cfg.to_dict(),
                      intervals=bootstrap.settings(cfg.bootstrap, cfg.bootstrap_seed) if cfg.bootstrap else None,
                      method=model.name, published_name=model.published_name, test_manifests=df.attrs.get("paths"),
                      test_root=str(data_root),
                      few_shot={"k_shot": cfg.k_shot, "seed": cfg.shot_seed, "references": reference_list(drawn)},
                      trained_on=model.trained_on, transductive_image_scores=transductive, **weights_note(model))
    return EvalResult(metrics, scored, curves)


def _counted(loader, bar):
    """The loader's batches, each counted on ``bar`` (which never sees the loader)."""
    for batch in loader:
        yield batch
        bar.update()


class MapWriter:
    """Beside the evaluation loop, in one thread and in order: each batch's maps copied to the host
    (asynchronously from a GPU), fed to the cflow AUPRO and saved when asked. ``left``: how many
    annotated maps each category still has to come; when its last one is in, its cflow AUPRO is
    computed here (`finished`). A few batches may be in flight; an error in the thread is raised in
    the loop."""

    def __init__(self, df: pd.DataFrame, cflow: dict, maps_dir: Optional[Path], left: Optional[dict] = None,
                 in_flight: int = 4, column: Optional[np.ndarray] = None, resamples: Optional[dict] = None):
        self.df, self.cflow, self.maps_dir, self.in_flight = df, cflow, maps_dir, in_flight
        # each image's column in its category's bootstrap counts, and those counts (none: no intervals)
        self.column = np.zeros(len(df), np.int64) if column is None else column
        self.resamples = resamples or {}
        self.left, self.finished = Counter(left or {}), {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maps")
        self.pending: list[Future] = []

    def submit(self, maps: torch.Tensor, masks: torch.Tensor, index: list, has_mask: list,
               regions: Optional[list] = None) -> None:
        copies = [_to_host(maps), _to_host(masks)]
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.in_flight):
            self.pending.pop(0).result()                   # raises the thread's error, if any
        self.pending.append(self.pool.submit(self._write, copies, index, has_mask, regions))

    def _write(self, copies, index: list, has_mask: list, regions: Optional[list]) -> None:
        (maps, ready), (masks, _) = copies
        if ready is not None:
            ready.synchronize()
        maps, masks = maps.numpy(), masks.numpy()
        for j, i in enumerate(index):
            key = (self.df.at[i, "dataset"], self.df.at[i, "category"])
            if has_mask[j] and self.cflow:
                self.cflow[key].update(maps[j], masks[j], regions[j] if regions else None, image=int(self.column[i]))
                if key in self.left:                       # else (under torchrun) counted after the loop
                    self.left[key] -= 1
                    if self.left[key] == 0:
                        self.finished[key] = _cflow_aupro(self.cflow[key], self.resamples.get(key))
            if self.maps_dir is not None:
                with atomic_path(self.maps_dir / f"{i:06d}.npz") as tmp:
                    with open(tmp, "wb") as f:
                        np.savez_compressed(f, map=maps[j].astype(np.float16), image=self.df.at[i, "image"])

    def close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(wait=True)


def _to_host(t: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """A device tensor copied into pinned host memory without waiting, and the event that marks the
    copy done; a CPU tensor as it is."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _cflow_aupro(acc: CflowAupro, resamples: Optional[np.ndarray] = None) -> tuple[float, str, Optional[np.ndarray]]:
    """One category's cflow AUPRO over every rank's maps: shared thresholds, summed counts; with the
    bootstrap's ``resamples``, also its value in each of their rows."""
    thresholds = acc.thresholds(distributed.min_array(acc.extent()))
    counts = [distributed.sum_array(a) for a in acc.counts(thresholds, resamples)]
    acc.close()
    value, note = acc.compute(thresholds, *counts[:3])
    return value, note, acc.replicate_values(thresholds, *counts[3:]) if resamples is not None else None


def _deviations(keys: list, rows_of: dict, labels: np.ndarray, scores: np.ndarray, resamples: dict, pixels: dict,
                cflow_values: dict, cfg: EvalCfg) -> np.ndarray:
    """(categories x metrics x replicates): each metric's deviation in each bootstrap replicate from
    its value on the whole test set (bootstrap.py); NaN where a metric is not computed."""
    table = np.full((len(keys), len(METRIC_KEYS), cfg.bootstrap), np.nan)
    for k, key in enumerate(keys):
        values = bootstrap.weighted_metrics(labels[rows_of[key]], scores[rows_of[key]], resamples[key])
        if key in pixels:
            values.update(pixels[key].replicates.metrics(cfg.aupro_fpr_limit, cfg.aupro))
        if key in cflow_values and cflow_values[key][2] is not None:
            values["pixel_aupro_cflow"] = cflow_values[key][2]
        for j, metric in enumerate(METRIC_KEYS):
            if metric in values:
                table[k, j] = bootstrap.deviations(values[metric])
    return table


def with_intervals(metrics: pd.DataFrame, keys: list, deviations: Optional[np.ndarray]) -> pd.DataFrame:
    """``metrics`` with ``<metric>_lo`` and ``<metric>_hi`` after each metric: each category's bootstrap
    interval, a mean row's from its categories' deviations averaged replicate by replicate (the
    categories whose value is defined, as the mean itself). NaN without ``deviations``."""
    out = metrics.copy()
    bounds = {f"{m}_{b}": np.full(len(out), np.nan) for m in METRIC_KEYS for b in ("lo", "hi")}
    if deviations is not None:
        index = {key: k for k, key in enumerate(keys)}
        point = {key: out[(out.dataset == key[0]) & (out.category == key[1])].iloc[0] for key in keys}
        for r, row in enumerate(out.itertuples(index=False)):
            if row.category == "mean":
                members = [key for key in keys if row.dataset in ("all", key[0])]
            else:
                members = [(row.dataset, row.category)]
            for j, metric in enumerate(METRIC_KEYS):
                parts = [deviations[index[key], j] for key in members if np.isfinite(point[key][metric])]
                dev = bootstrap.mean_deviation(parts) if row.category == "mean" else (parts[0] if parts else np.zeros(0))
                bounds[f"{metric}_lo"][r], bounds[f"{metric}_hi"][r] = bootstrap.interval(getattr(row, metric), dev)
    for metric in reversed(METRIC_KEYS):
        at = out.columns.get_loc(metric) + 1
        out.insert(at, f"{metric}_hi", bounds[f"{metric}_hi"])
        out.insert(at, f"{metric}_lo", bounds[f"{metric}_lo"])
    return out


def decision_thresholds(metrics: pd.DataFrame, scores: pd.DataFrame, pixels: dict) -> dict:
    """The F1-optimal thresholds evaluation found: per category (image and pixel level), and pooled
    over every evaluated image / annotated pixel, for categories it never saw."""
    rows = metrics[metrics.category != "mean"]
    per = lambda col: {f"{d}/{c}": float(v) for d, c, v in zip(rows.dataset, rows.category, rows[col])  # noqa: E731
                       if np.isfinite(v)}
    pooled_image = image_metrics(scores.label.values, scores.score.values)[0]["image_threshold"]
    pooled_pixel = PixelAccumulator.merged(list(pixels.values())).compute()[0]["pixel_threshold"] if pixels else np.nan
    finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
    return {"image": per("image_threshold"), "pixel": per("pixel_threshold"),
            "image_pooled": finite(pooled_image), "pixel_pooled": finite(pooled_pixel),
            "note": "F1-optimal thresholds found by evaluation (adaclip.evaluate); image scores >= image "
                    "threshold are anomalous, map pixels >= pixel threshold are in the mask"}


def pixel_curves(pixels: dict) -> pd.DataFrame:
    """Pixel ROC / PR points per category and, for datasets of several categories, pooled over
    them (category "all"), from the streamed histograms: what the pixel-level figures draw."""
    parts = dict(pixels)
    for name in dict.fromkeys(d for d, _ in pixels):
        mine = [acc for (d, _), acc in pixels.items() if d == name]
        if len(mine) > 1:
            parts[(name, "all")] = PixelAccumulator.merged(mine)
    frames = [pd.DataFrame({"dataset": d, "category": c, **acc.curve()}) for (d, c), acc in parts.items()]
    columns = ["dataset", "category", "threshold", "fpr", "tpr", "precision"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _with_means(rows: list[dict]) -> pd.DataFrame:
    """Category rows, then per dataset the unweighted mean over its categories (NaN left out)."""
    table = pd.DataFrame(rows)
    out = []
    for name, g in table.groupby("dataset", sort=False):
        out.append(g)
        if len(g) > 1:
            out.append(pd.DataFrame([{"dataset": name, "category": "mean", "images": int(g.images.sum()),
                                      "anomalous": int(g.anomalous.sum()), **mean_row(g.to_dict("records"), METRIC_KEYS),
                                      "note": "unweighted mean over categories; undefined values left out"}]))
    if table.dataset.nunique() > 1:
        cats = table.to_dict("records")
        out.append(pd.DataFrame([{"dataset": "all", "category": "mean", "images": int(table.images.sum()),
                                  "anomalous": int(table.anomalous.sum()), **mean_row(cats, METRIC_KEYS),
                                  "note": "unweighted mean over all categories; undefined values left out"}]))
    cols = ["dataset", "category", "images", "anomalous", *METRIC_KEYS, "image_threshold", "pixel_threshold", "note"]
    return pd.concat(out, ignore_index=True).reindex(columns=cols)
