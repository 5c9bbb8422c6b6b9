"""Figures: arrays and tables in, matplotlib ``Figure`` out (the caller shows or saves it)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from . import runs
from .data.images import load_pair

RANDOM_WEIGHTS = runs.RANDOM_WEIGHTS   # the figure title of random-weight runs


def overlay(ax, image: np.ndarray, mask: Optional[np.ndarray] = None, heat: Optional[np.ndarray] = None,
            title: str = "") -> None:
    """Draw an image with an optional mask contour and anomaly heat map on ``ax``."""
    ax.imshow(image)
    if heat is not None:
        ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    if mask is not None and mask.any():
        ax.contour(mask, levels=[0.5], colors="red", linewidths=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def sample_grid(df: pd.DataFrame, root: Union[str, Path], per_dataset: int = 4, seed: int = 0) -> Figure:
    """A few images per dataset (normal and anomalous), masks outlined in red."""
    picks = []
    for _, g in df.groupby("dataset", sort=True):
        normal, anomalous = g[g.label == 0], g[g.label == 1]
        n_a = min(len(anomalous), max(per_dataset - min(len(normal), per_dataset // 2), 0))
        picks.append(pd.concat([normal.sample(min(len(normal), per_dataset - n_a), random_state=seed),
                                anomalous.sample(n_a, random_state=seed)]))
    rows = [p for p in picks if len(p)]
    fig, axes = plt.subplots(len(rows), per_dataset, figsize=(2.2 * per_dataset, 2.3 * len(rows)), squeeze=False)
    for r, sel in enumerate(rows):
        for c in range(per_dataset):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(sel):
                continue
            row = sel.iloc[c]
            image, mask = load_pair(root, row["image"], row["mask"], row.get("crop", ""))
            image, mask = np.asarray(image), (mask if row["mask"] else None)
            state = "anomalous" if row.label else "normal"
            overlay(ax, image, mask, title=f"{row.dataset}/{row.category}\n{state}")
    fig.tight_layout()
    return fig


def counts_plot(counts: pd.DataFrame) -> Figure:
    """Bar chart of images per dataset, split into normal / anomalous."""
    data = counts.assign(state=counts.label.map({0: "normal", 1: "anomalous"}))
    data = data.groupby(["dataset", "state"], as_index=False)["images"].sum()
    fig, ax = plt.subplots(figsize=(6, 3))
    sns.barplot(data=data, x="dataset", y="images", hue="state", hue_order=["normal", "anomalous"], ax=ax)
    ax.set_title("images per dataset")
    fig.tight_layout()
    return fig


def loss_curve(log: pd.DataFrame) -> Figure:
    """Per-step training loss with a running mean, epochs marked."""
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(log["step"], log["loss"], alpha=0.35, label="loss")
    window = len(log) // 20
    if window > 1:
        ax.plot(log["step"], log["loss"].rolling(window, min_periods=1).mean(), label=f"running mean ({window})")
    for step in log.groupby("epoch")["step"].max().iloc[:-1]:
        ax.axvline(step, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    return fig


def anomaly_maps(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], masks: Sequence[Optional[np.ndarray]],
                 titles: Sequence[str], title: str = "") -> Figure:
    """Columns of (image + mask, image + anomaly map)."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for i in range(n):
        overlay(axes[0, i], images[i], masks[i], title=titles[i])
        overlay(axes[1, i], images[i], masks[i], heat=maps[i], title="anomaly map")
    if title:
        fig.suptitle(title, fontsize=9, color="darkred")
    fig.tight_layout()
    return fig


def metrics_plot(metrics: pd.DataFrame, columns: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_aupro"),
                 title: str = "") -> Figure:
    """Grouped bars of the chosen metrics per dataset/category; undefined (NaN) values are left blank."""
    rows = metrics[metrics.category != "mean"] if "category" in metrics else metrics
    long = rows.melt(id_vars=["dataset", "category"], value_vars=[c for c in columns if c in rows],
                     var_name="metric", value_name="value")
    long["where"] = long.dataset + "/" + long.category
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * long["where"].nunique() + 2), 3.2))
    sns.barplot(data=long, x="where", y="value", hue="metric", ax=ax)
    ax.set_ylim(0, 1)
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=30)
    if title:
        ax.set_title(title, fontsize=9, color="darkred")
    fig.tight_layout()
    return fig


def score_distributions(scores: pd.DataFrame, title: str = "") -> Figure:
    """Image-score histograms of normal vs anomalous images, one panel per dataset."""
    data = scores.assign(state=scores.label.map({0: "normal", 1: "anomalous"}))
    names = list(dict.fromkeys(data.dataset))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        sns.histplot(data=data[data.dataset == name], x="score", hue="state", hue_order=["normal", "anomalous"],
                     bins=20, stat="density", common_norm=False, element="step", ax=ax)
        ax.set_title(name)
    if title:
        fig.suptitle(title, fontsize=9, color="darkred")
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Union[str, Path], dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
