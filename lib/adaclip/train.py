"""Training a method's learnable parts on an auxiliary annotated dataset (AdaCLIP paper Sec. 3.4,
reference method/trainer.py; the same loop for every method: each brings its own loss and recipe).

Writes to ``run_dir``: ``train_log.csv`` (one row per step), ``checkpoints/epoch_NNN.pt`` (learnable
parameters + config, loadable with ``methods.load``), ``checkpoints/last.pt`` (optimizer and
progress, for ``resume=True``), ``model.pt`` (the selected model) and ``config.json``.
A killed run resumes from its last finished epoch and ends with the same weights as an
uninterrupted one: the data order and every random draw of an epoch depend on (seed, epoch) only.
"""
from __future__ import annotations

import contextlib
import csv
import random
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from . import methods
from .config import EvalCfg, TrainCfg
from .data import AnomalyDataset, ManifestError, check, check_disjoint
from .data.cache import ImageCache
from .data.loading import input_seconds, resolve_workers, training_loader
from .evaluate import as_manifest, evaluate
from .io import atomic_path
from .methods import Method, Targets
from .methods.checkpoint import load_state, read as read_checkpoint
from .precision import autocast
from .runs import update_config, weights_note

PathLike = Union[str, Path]
LOG_FIELDS = ["epoch", "stage", "step", "loss", "image_focal", "segmentation", "lr"]


def log_fields(model) -> list[str]:
    """train_log.csv's columns: the step, the loss, each named part of the method's loss, the lr."""
    parts = list(dict.fromkeys(["image_focal", "segmentation", *model.loss_part_names]))
    return ["epoch", "stage", "step", "loss", *parts, "lr"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def split_validation(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Carve a validation split from the training data (stratified by category and label)."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for _, g in df.groupby(["category", "label"]):
        n = int(round(len(g) * fraction))
        val_idx += list(rng.choice(g.index.values, size=min(n, len(g) - 1), replace=False)) if len(g) > 1 else []
    if not val_idx:
        raise ManifestError(f"validation fraction {fraction} leaves no validation images; raise it or use selection='last'")
    return df.drop(index=val_idx).reset_index(drop=True), df.loc[sorted(val_idx)].reset_index(drop=True)


def _selection_score(result) -> float:
    """Mean pixel F1-max over categories (the reference's criterion), else image AUROC."""
    rows = result.metrics[result.metrics.category != "mean"]
    for key in ("pixel_f1", "image_auroc"):
        vals = rows[key].dropna()
        if len(vals):
            return float(vals.mean())
    return float("nan")


def train(model_cfg, train_cfg: Union[TrainCfg, dict], train_manifests,
          data_root: PathLike, run_dir: PathLike, *, test_manifests=None, test_root: Optional[PathLike] = None,
          resume: bool = False, device: Optional[str] = None, progress: bool = True,
          max_steps: Optional[int] = None, method: Optional[str] = None) -> Method:
    """Train a method's learnable parts; returns the selected model.

    ``model_cfg``: a method's config (its class names the method) or a dict with ``method``
    (default "adaclip"); a training-free method gets a run folder like any other, without training.

    ``train_manifests``: DataFrame or CSV path(s) of the auxiliary annotated data (for MVTec AD,
    its test split, as the reference does). ``test_manifests`` are only read to refuse overlap
    with the training data, and for ``selection="test_f1"`` (the reference's test-set selection,
    which leaks test data into model selection: off by default). ``max_steps`` stops early
    without finishing the epoch (smoke runs; also how the tests simulate a killed run).
    """
    method = method or methods.name_of(model_cfg)
    if isinstance(model_cfg, dict):
        model_cfg = methods.get(method).config_class.from_dict({k: v for k, v in model_cfg.items() if k != "method"})
    cfg = TrainCfg.from_dict(train_cfg) if isinstance(train_cfg, dict) else train_cfg
    run_dir, ckpt_dir = Path(run_dir), Path(run_dir) / "checkpoints"
    device = torch.device(device) if device else distributed.default_device()
    main = distributed.is_main()              # under torchrun only rank 0 writes files

    train_df = as_manifest(train_manifests).reset_index(drop=True)
    check(train_df, data_root)                       # every bad file, before any training
    test_df = as_manifest(test_manifests) if test_manifests is not None else None
    if test_df is not None:
        check_disjoint(train_df, test_df)
    val_df = None
    if cfg.selection == "val":
        train_df, val_df = split_validation(train_df, cfg.val_fraction, cfg.seed)
    elif cfg.selection == "test_f1" and test_df is None:
        raise ValueError("selection='test_f1' needs test_manifests")

    seed_everything(cfg.seed)
    model = methods.get(method)(model_cfg).to(device)
    model.checkpoint_activations = cfg.checkpoint_activations
    # the auxiliary datasets, as the published tables name them ("mvtec+colondb"); "" when nothing is learned
    model.trained_on = "+".join(dict.fromkeys(train_df.dataset.astype(str))) if model.learnable_parameters() else ""
    what_ran = dict(method=method, published_name=model.published_name, model=model_cfg.to_dict(), train=cfg.to_dict(), train_manifests=_sources(train_manifests),
                    test_manifests=_sources(test_manifests), data_root=str(data_root), trained_on=model.trained_on,
                    **weights_note(model))
    if not model.learnable_parameters():           # a training-free baseline ("clip"): a run like any other
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(run_dir / "train_log.csv") as tmp:
                pd.DataFrame(columns=log_fields(model)).to_csv(tmp, index=False)
            model.save(run_dir / "model.pt", epoch=0, selection="none")
            update_config(run_dir, **what_ran, selected_epoch=None, selection="none (training-free: nothing to learn)")
        distributed.barrier()
        print(f"method {method!r} learns nothing: no training; {run_dir / 'model.pt'} holds its config")
        return model
    # the method's stages (one for most), as consecutive epochs: epoch e belongs to stages[stage_of[e]]
    stages = model.training_stages(cfg)
    stage_of = [i for i, st in enumerate(stages) for _ in range(st.epochs)]
    total = len(stage_of)
    what_ran["stages"] = [{"name": st.name, "epochs": st.epochs, "batch_size": st.batch_size, "lr": st.lr,
                           "betas": list(st.betas), "optimizer": st.optimizer, "milestones": list(st.milestones)}
                          for st in stages]
    optimizer = scheduler = None
    start_epoch, step, best = 0, 0, {"score": -float("inf"), "epoch": None, "scores": {}}
    log_path = run_dir / "train_log.csv"
    resumed_optimizer = None

    last = ckpt_dir / "last.pt"
    if resume and last.is_file():
        state = read_checkpoint(last, map_location=device)
        # more epochs are fine, and recomputing activations changes no result
        free = ("epochs", "checkpoint_activations", "num_workers", "image_cache", "cache_mb", "cache_dir")
        resumable = {k: v for k, v in cfg.to_dict().items() if k not in free}
        saved = {k: v for k, v in state["train_config"].items() if k not in free}
        if state.get("method", "adaclip") != method or state["model_config"] != model_cfg.to_dict() \
                or saved != _jsonable(resumable):
            raise ValueError(f"cannot resume {last}: it was trained with model config {state['model_config']} "
                             f"and train config {state['train_config']}, not {model_cfg.to_dict()} and "
                             f"{cfg.to_dict()}; use another run_dir or resume=False")
        load_state(model, state["learnable"], last)
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        if start_epoch < total and stage_of[start_epoch] == stage_of[start_epoch - 1]:   # mid-stage: its optimiser
            resumed_optimizer = state
        if log_path.is_file():                       # drop the steps of the epoch that was cut off
            log = pd.read_csv(log_path)
            log = log[log.epoch <= start_epoch]
            with atomic_path(log_path) as tmp:
                log.to_csv(tmp, index=False)
        print(f"resuming {run_dir} after epoch {start_epoch} (step {step})")
    elif not resume and log_path.exists() and main:
        log_path.unlink()

    if main:
        update_config(run_dir, **what_ran)
    # loader workers unless the whole training's input is small (one item timed, without the cache);
    # decoded, resized images are kept for later epochs (in shared memory when workers fill them:
    # when any stage's loader, the one of the smallest batch having the most batches, gets workers)
    dataset = AnomalyDataset(train_df, data_root, model.loader_transform, model.image_size, aug_rate=cfg.aug_rate,
                             seed=cfg.seed)
    per_rank = -(-len(train_df) // distributed.world_size())
    work = input_seconds(dataset, 0, per_rank * total) if cfg.num_workers is None and len(train_df) else None
    workers = resolve_workers(cfg.num_workers, -(-per_rank // min(st.batch_size for st in stages)), work)
    dataset.cache = ImageCache(cfg.image_cache if total > 1 else "off", len(train_df), model.image_size, cfg.cache_mb,
                               cfg.cache_dir, shared=workers > 0)
    loaders: dict[int, DataLoader] = {}                # one per batch size, kept across epochs and stages
    normalize = model.normalize                        # the workers send uint8 images; finished on the device
    # several processes: gradients of the learnable parameters averaged (CLIP is frozen; the
    # reference's layer-0 text prompt never gets one, hence find_unused_parameters)
    net = DistributedDataParallel(model, find_unused_parameters=True,
                                  device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed.active() else model
    new_log = not log_path.is_file()
    run_dir.mkdir(parents=True, exist_ok=True)
    with (open(log_path, "a", newline="") if main else contextlib.nullcontext()) as log_file:
        writer = csv.DictWriter(log_file, fieldnames=log_fields(model)) if main else None
        if main and new_log:
            writer.writeheader()
        for epoch in range(start_epoch, total):
            stage = stages[stage_of[epoch]]
            if optimizer is None or stage_of[epoch] != stage_of[epoch - 1]:
                optimizer, scheduler = _optimizer(stage, resumed_optimizer)
                resumed_optimizer = None
            # every random draw of this epoch depends only on (seed, epoch): resumable
            seed_everything(cfg.seed + epoch)
            loader = _loader(dataset, cfg, epoch, stage.batch_size, device, loaders, work)
            net.train()
            name = f"{stage.name} " if len(stages) > 1 else ""
            # the bar never holds the loader (see evaluate): its persistent workers stop when training ends
            bar = tqdm(total=len(loader), desc=f"{name}epoch {epoch + 1}/{total}", disable=not progress or not main)
            running = []
            for batch in loader:
                if max_steps is not None and step >= max_steps:
                    bar.close()
                    loaders.clear()
                    return model
                images, masks, labels, has_mask = (batch[k].to(device, non_blocking=True)
                                                   for k in ("image", "mask", "label", "has_mask"))
                images, masks = normalize(images), masks.float()
                with autocast(device, cfg.amp):
                    # each method's own loss; images without pixel ground truth add no segmentation loss
                    targets = Targets(labels, masks, has_mask, cfg.dice, stage.name)
                    out = net(images, list(batch["class_name"]), targets=targets)
                loss, parts = out.loss, out.loss_parts
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                logged = [loss.item(), *parts.values()]
                if distributed.active():                     # the log shows the mean over the ranks
                    logged = list(distributed.sum_array(np.array(logged)) / distributed.world_size())
                running.append(logged[0])
                if main:
                    writer.writerow({"epoch": epoch + 1, "stage": stage.name, "step": step, "loss": logged[0],
                                     **dict(zip(parts, logged[1:])), "lr": optimizer.param_groups[0]["lr"]})
                    log_file.flush()
                bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}", refresh=False)
                bar.update()
            bar.close()
            if cfg.selection in ("val", "test_f1"):
                result = evaluate(model, val_df if cfg.selection == "val" else test_df,
                                  data_root if cfg.selection == "val" else (test_root or data_root),
                                  EvalCfg(batch_size=cfg.batch_size, aupro=False, aupro_cflow=False, bootstrap=0), progress=False,
                                  validate_files=False)
                score = _selection_score(result)
                best.setdefault("scores", {})[str(epoch + 1)] = score
                if score > best["score"]:
                    best.update(score=score, epoch=epoch + 1)
            if main:
                model.save(ckpt_dir / f"epoch_{epoch + 1:03d}.pt", epoch=epoch + 1, step=step)
                with atomic_path(last) as tmp:
                    torch.save({"epoch": epoch + 1, "step": step, "best": best, "method": method,
                                "model_config": model_cfg.to_dict(),
                                "train_config": _jsonable(cfg.to_dict()), "learnable": model.learnable_state_dict(),
                                "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp)
    loaders.clear()                                # their persistent workers stop now, not when collected
    distributed.barrier()                          # every checkpoint is written before any rank reads one

    chosen = total if best["epoch"] is None else best["epoch"]
    if chosen != total:
        load_state(model, read_checkpoint(ckpt_dir / f"epoch_{chosen:03d}.pt", device)["state_dict"], chosen)
    if main:
        model.save(run_dir / "model.pt", epoch=chosen, selection=cfg.selection)
        update_config(run_dir, selected_epoch=chosen, selection=cfg.selection,
                      selection_score=best["score"] if best["epoch"] else None,
                      selection_scores=best.get("scores") or None)
    distributed.barrier()
    return model


def _loader(dataset, cfg: TrainCfg, epoch: int, batch_size: int, device: torch.device = torch.device("cpu"),
            loaders: Optional[dict] = None, work_s: Optional[float] = None) -> DataLoader:
    """This epoch's batches: shuffled from (seed, epoch), items indexed (epoch, i); under torchrun each
    rank a disjoint shard. The loader of ``batch_size`` in ``loaders`` is reused (its workers persist).
    ``work_s``: the whole training's input time, as `resolve_workers` takes it."""
    loaders = {} if loaders is None else loaders
    if batch_size not in loaders:
        loaders[batch_size] = training_loader(dataset, batch_size, cfg.seed, cfg.num_workers, device, distributed.active(),
                                              work_s)
    loaders[batch_size].sampler.set_epoch(epoch)
    return loaders[batch_size]


def _optimizer(stage, resumed: Optional[dict] = None):
    """The stage's optimiser (and its per-iteration MultiStepLR), with a resumed run's states."""
    optim = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[stage.optimizer]
    optimizer = optim(stage.parameters, lr=stage.lr, betas=tuple(stage.betas))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(stage.milestones), stage.gamma) \
        if stage.milestones else None
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        if scheduler is not None and resumed.get("scheduler"):
            scheduler.load_state_dict(resumed["scheduler"])
    return optimizer, scheduler


def _jsonable(d: dict) -> dict:
    """Tuples as lists, as they come back from a checkpoint."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _sources(manifests) -> Optional[list]:
    if manifests is None:
        return None
    if isinstance(manifests, pd.DataFrame):
        return manifests.attrs.get("paths", ["<DataFrame>"])
    if isinstance(manifests, (str, Path)):
        return [str(manifests)]
    return [str(m) for m in manifests]


def load_log(run_dir: PathLike) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "train_log.csv")

