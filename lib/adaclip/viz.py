"""Figures: arrays and tables in, matplotlib ``Figure`` out (the caller shows or saves it).

Notebook 03's figures (the ones a paper takes) are as wide as a notebook's output area
(``NOTEBOOK_WIDTH``, 10 in: 1000 px at the inline backend's 100 dpi) with 8-10 pt text, so they are
readable where they are first seen; scaled to a printed page (``PAGE``, 7.2 in) their smallest text is
about 6 pt. `save` writes PNG and PDF (vector, for print).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import runs
from .data.images import load_row

RANDOM_WEIGHTS = runs.RANDOM_WEIGHTS   # the figure title of random-weight runs
# a figure's title where the notebook says RANDOM_WEIGHTS once in words: the figure stays marked when
# it is seen alone, without the sentence again under each figure
RANDOM_WEIGHTS_TAG = "random backbone weights"
NA = "n/a"                            # an undefined (NaN) metric in a bar chart, where a missing bar would read as 0


def _seaborn():
    """seaborn (and scipy.stats under it) on first use: most figures, and the kernels of notebooks 01
    and 04, need none of it."""
    import seaborn

    return seaborn


COLUMN, PAGE = 3.5, 7.2               # figure widths in inches: one column, a whole page
NOTEBOOK_WIDTH = 10.0                 # notebook 03's figures, in inches: 1000 px in JupyterLab (see the docstring)
PAPER_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
               "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.title_fontsize": 8}
# the explorer draws for a screen: as wide as a JupyterLab output area (about 1150 px at the inline
# backend's 100 dpi), with text sized for it
SCREEN_WIDTH = 11.5
SCREEN_STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "figure.titlesize": 13}


@contextlib.contextmanager
def paper_style(rc: dict = PAPER_STYLE):
    """``rc`` (`PAPER_STYLE`) for the figures drawn inside. Interactive mode stays as the block leaves it:
    Jupyter's inline backend loads with the first figure of a kernel and switches interactive mode on
    as it loads; a plain ``rc_context`` around that first figure would switch it off again on exit,
    and no later figure of the kernel would show inline."""
    interactive = matplotlib.is_interactive()
    try:
        with plt.rc_context(rc):
            try:
                yield
            finally:
                interactive = matplotlib.is_interactive()
    finally:
        matplotlib.interactive(interactive)


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
            image, mask = load_row(root, row)
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
    sns = _seaborn()
    sns.barplot(data=data, x="dataset", y="images", hue="state", hue_order=["normal", "anomalous"], ax=ax)
    ax.set_title("images per dataset")
    fig.tight_layout()
    return fig


def loss_curve(log: pd.DataFrame, title: str = "") -> Figure:
    """Per-step training loss with a running mean (a few steps: every step marked), epochs marked; a
    method trained in stages (AA-CLIP) gets one colour per stage, since their losses differ."""
    fig, ax = plt.subplots(figsize=(6, 3))
    stages = list(dict.fromkeys(log["stage"])) if "stage" in log and len(log) else [None]
    for stage in stages:
        part = log if stage is None else log[log["stage"] == stage]
        label = "loss" if len(stages) == 1 else f"{stage} stage"
        window = len(part) // 20
        few = window < 2                               # too few steps for a running mean: show each one
        line, = ax.plot(part["step"], part["loss"], alpha=1.0 if few else 0.35, marker="o" if few else None, ms=3,
                        label=label)
        if not few:
            ax.plot(part["step"], part["loss"].rolling(window, min_periods=1).mean(), color=line.get_color(),
                    label=f"{label}, running mean ({window})")
    for step in log.groupby("epoch")["step"].max().iloc[:-1]:
        ax.axvline(step, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if len(log):
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training steps (training-free method)", ha="center", va="center",
                transform=ax.transAxes, color="grey")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def anomaly_maps(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], masks: Sequence[Optional[np.ndarray]],
                 titles: Sequence[str], title: str = "") -> Figure:
    """Columns of (image + mask, image + anomaly map), at most as wide as a notebook's output area."""
    n = len(images)
    side = min(2.2, SCREEN_WIDTH / max(n, 1))
    fig, axes = plt.subplots(2, n, figsize=(side * n, 2.1 * side), squeeze=False)
    for i in range(n):
        overlay(axes[0, i], images[i], masks[i], title=titles[i])
        overlay(axes[1, i], images[i], masks[i], heat=maps[i], title="anomaly map")
    if title:
        fig.suptitle(title, fontsize=9, color="darkred")
    fig.tight_layout()
    return fig


def grouped_bars(ax, values: pd.DataFrame, na_y: float = 0.0) -> None:
    """Bars of ``values`` (rows: groups along x; columns: a colour each, in the legend); an undefined
    (NaN) value reads "n/a" upright at its bar's place, from ``na_y`` up (data units), instead of a
    missing bar that looks like a zero."""
    k = max(len(values.columns), 1)
    width = 0.8 / k
    x = np.arange(len(values))
    for j, column in enumerate(values.columns):
        at = x - 0.4 + width * (j + 0.5)
        v = values[column].to_numpy(dtype=float)
        bars = ax.bar(at, np.nan_to_num(v, nan=0.0), width, label=str(column))   # NaN: a bar of height 0, unseen
        for bar, value in zip(bars.patches, v):
            if np.isnan(value):
                ax.text(bar.get_x() + bar.get_width() / 2, na_y, NA, rotation=90, ha="center", va="bottom",
                        color=bar.get_facecolor())
    ax.set_xticks(x, [str(i) for i in values.index])


def metrics_plot(metrics: pd.DataFrame, columns: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_aupro"),
                 title: str = "") -> Figure:
    """Grouped bars of the chosen metrics per dataset/category ("kvasir", not "kvasir/kvasir", where a
    dataset is its only category); undefined (NaN) values read "n/a"."""
    rows = metrics[metrics.category != "mean"] if "category" in metrics else metrics
    where = [d if d == c else f"{d}/{c}" for d, c in zip(rows.dataset, rows.category)]
    values = rows[[c for c in columns if c in rows]].set_axis(where)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(values) + 2) + 1.5, 3.2))    # + the legend beside it
    grouped_bars(ax, values, na_y=0.02)
    ax.set_ylim(0, 1)
    ax.set_ylabel("value")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(title="metric", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    if title:
        ax.set_title(title, fontsize=9, color="darkred")
    fig.tight_layout()
    return fig


def score_distributions(scores: pd.DataFrame, title: str = "") -> Figure:
    """Image-score histograms of normal vs anomalous images, one panel per dataset, in a grid of at most
    three columns as wide as the notebook (a single row of four was 200 px high)."""
    sns = _seaborn()
    data = scores.assign(state=scores.label.map({0: "normal", 1: "anomalous"}))
    names = list(dict.fromkeys(data.dataset)) or [""]
    cols = min(3, int(np.ceil(np.sqrt(len(names)))))            # 4 datasets: 2 x 2, 6: 3 x 2
    rows = int(np.ceil(len(names) / cols))
    with paper_style():
        fig, axes = plt.subplots(rows, cols, figsize=(min(NOTEBOOK_WIDTH, 4.2 * cols + 1.4), 2.8 * rows + 0.3),
                                 squeeze=False, layout="constrained")
        for i, (ax, name) in enumerate(zip(axes.flat, names)):
            legend = i == min(cols, len(names)) - 1                # beside the first row
            sns.histplot(data=data[data.dataset == name], x="score", hue="state", hue_order=["normal", "anomalous"],
                         bins=20, binrange=(0, 1), stat="density", common_norm=False, element="step", ax=ax,
                         legend=legend)
            ax.set_title(name)
            ax.set_xlabel("image score P(abnormal)")
            ax.set_ylabel("density")
            if legend and ax.get_legend() is not None:
                sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), title=None, frameon=False)
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        _title(fig, title)
    return fig


def curves(scores: pd.DataFrame, pixel_curves: pd.DataFrame, dataset: str, by: str = "run",
           title: str = "") -> Figure:
    """ROC and PR curves of one dataset, image level (from image scores) and pixel level (from the
    streamed histograms' points in ``pixel_curves.csv``, never from stored maps); a line per ``by``
    value (runs or sweep configurations). Pixel curves pool the dataset's categories."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    with paper_style():
        fig, axes = plt.subplots(2, 2, figsize=(0.8 * NOTEBOOK_WIDTH, 0.68 * NOTEBOOK_WIDTH))
        img = scores[scores.dataset == dataset] if len(scores) else scores
        for name, g in (img.groupby(by, sort=False) if len(img) else []):
            if g.label.nunique() == 2:
                fpr, tpr, _ = roc_curve(g.label, g.score)
                precision, recall, _ = precision_recall_curve(g.label, g.score)
                axes[0, 0].plot(fpr, tpr, label=f"{name} ({auc(fpr, tpr):.3f})")
                axes[0, 1].plot(recall, precision, label=str(name))
        pix = pixel_curves[pixel_curves.dataset == dataset] if len(pixel_curves) else pixel_curves
        if len(pix):
            pooled = "all" if (pix.category == "all").any() else pix.category.iloc[0]
            for name, g in pix[pix.category == pooled].groupby(by, sort=False):
                fpr, tpr = np.r_[0.0, g.fpr], np.r_[0.0, g.tpr]
                axes[1, 0].plot(fpr, tpr, label=f"{name} ({np.trapezoid(tpr, fpr):.3f})")
                axes[1, 1].plot(g.tpr, g.precision, label=str(name))
        for (r, c), (level, kind) in {(0, 0): ("image", "ROC"), (0, 1): ("image", "PR"),
                                      (1, 0): ("pixel", "ROC"), (1, 1): ("pixel", "PR")}.items():
            ax = axes[r, c]
            ax.set_title(f"{dataset}: {level}-level {kind}")
            ax.set_xlabel("false positive rate" if kind == "ROC" else "recall")
            ax.set_ylabel("true positive rate" if kind == "ROC" else "precision")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            if ax.lines:
                ax.legend(title="AUROC" if kind == "ROC" else None, loc="lower right" if kind == "ROC" else "lower left")
            else:
                ax.text(0.5, 0.5, "undefined: one class only" if level == "image" else "no pixel masks",
                        ha="center", va="center", transform=ax.transAxes, color="grey")
            if kind == "ROC":
                ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls=":")
        _title(fig, title)
        fig.tight_layout()
    return fig


def ablation_bars(table: pd.DataFrame, parameter: str, metric: str = "pixel_auroc", baseline: Optional[float] = None,
                  baseline_label: str = "baseline", title: str = "") -> Figure:
    """Bars of ``metric`` (percent) for each value of a swept ``parameter``, one hue per dataset, with
    the baseline's value as a dashed reference line; undefined (NaN) values read "n/a". ``table``:
    dataset-level rows of a sweep."""
    data = table.assign(value=lambda d: d[metric] * 100,
                        **{parameter: lambda d: d[parameter].map(lambda v: "None" if pd.isna(v) else str(v))})
    values = (data.pivot_table(index=parameter, columns="dataset", values="value", aggfunc="mean", dropna=False)
              .reindex(index=list(dict.fromkeys(data[parameter])), columns=list(dict.fromkeys(data.dataset))))
    lo = data.value.min() if data.value.notna().any() else 0
    bottom = max(0, min(lo, baseline * 100 if baseline is not None and np.isfinite(baseline) else lo) - 10)
    with paper_style():
        fig, ax = plt.subplots(figsize=(0.6 * NOTEBOOK_WIDTH, 3.0))
        grouped_bars(ax, values, na_y=bottom + 2)
        if baseline is not None and np.isfinite(baseline):
            ax.axhline(baseline * 100, color="black", ls="--", lw=1, label=f"{baseline_label} ({baseline * 100:.1f})")
        ax.set_xlabel(parameter)
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.set_ylim(bottom, 100)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
        _title(fig, title)
        fig.tight_layout()
    return fig


def qualitative_grid(images: Sequence[np.ndarray], masks: Sequence[Optional[np.ndarray]],
                     maps: dict, titles: Sequence[str] = (), title: str = "") -> Figure:
    """Rows = images; columns = image, ground truth, then one anomaly map per method (``maps``:
    name -> list of (H, W) maps in [0, 1] for the same images), with a shared colour bar."""
    names = list(maps)
    n, cols = len(images), 2 + len(names)
    # thumbnails share the notebook's width (about 1.5 in, 150 px on screen, for the usual six columns), at
    # most 2.4 in; each row as high as its image is at that width, plus its titles
    side = min(2.4, (NOTEBOOK_WIDTH - 0.7) / cols)
    heights = [side * min(image.shape[0] / image.shape[1], 1.5) for image in images]
    with paper_style():
        fig, axes = plt.subplots(n, cols, figsize=(side * cols + 0.7, sum(heights) + 0.45 * n + (0.3 if title else 0)),
                                 squeeze=False, layout="constrained", gridspec_kw={"height_ratios": heights})
        fig.get_layout_engine().set(w_pad=0.01, wspace=0.01)
        heat = None
        for i in range(n):
            overlay(axes[i, 0], images[i], title=titles[i] if i < len(titles) else "")
            axes[i, 0].title.set_fontsize(PAPER_STYLE["axes.labelsize"])
            gt = masks[i] if masks[i] is not None else np.zeros(images[i].shape[:2])
            axes[i, 1].imshow(gt, cmap="gray", vmin=0, vmax=1)
            axes[i, 1].set_title("ground truth" if masks[i] is not None else "no mask", fontsize="medium")
            axes[i, 1].axis("off")
            for j, name in enumerate(names):
                ax = axes[i, 2 + j]
                ax.imshow(images[i])
                heat = ax.imshow(maps[name][i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
                ax.set_title(name, fontsize="medium")
                ax.axis("off")
        if heat is not None:
            fig.colorbar(heat, ax=axes, fraction=0.02, pad=0.01, label="anomaly score")
        _title(fig, title)
    return fig


def loss_curves(logs: dict, title: str = "") -> Figure:
    """Training loss (running mean over an epoch's steps) of several runs or sweep configurations."""
    with paper_style():
        fig, ax = plt.subplots(figsize=(0.75 * NOTEBOOK_WIDTH, 3.0), layout="constrained")
        for name, log in logs.items():
            if len(log):
                steps_per_epoch = max(1, int(log.groupby("epoch").size().max()))
                window = max(1, steps_per_epoch // 4)
                ax.plot(log["step"], log["loss"].rolling(window, min_periods=1).mean(), label=str(name), lw=1)
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (focal + dice)")
        if ax.lines:                                  # beside the axes: it hides no curve, however many runs
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
        else:
            ax.text(0.5, 0.5, "no training steps", ha="center", va="center", transform=ax.transAxes, color="grey")
        _title(fig, title)
    return fig


def explorer_view(found, threshold: float, mask: Optional[np.ndarray] = None, title: str = "") -> Figure:
    """One image (an `explore.Inspection`): image, anomaly-map overlay, mask at ``threshold``, ground
    truth; the image score and the decision at ``threshold`` in the title. As wide as the notebook."""
    decision = "anomalous" if found.score >= threshold else "normal"
    h, w = found.image.shape[:2]
    panel = (SCREEN_WIDTH - 1.0) / 4                         # four panels beside the colour bar, in inches
    with paper_style(SCREEN_STYLE):
        fig, axes = plt.subplots(1, 4, figsize=(SCREEN_WIDTH, panel * h / w + (1.3 if title else 1.0)),
                                 layout="constrained")
        overlay(axes[0], found.image, title="image")
        axes[0].title.set_fontsize(SCREEN_STYLE["axes.titlesize"])
        axes[1].imshow(found.image)
        heat = axes[1].imshow(found.anomaly_map, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[1].set_title("anomaly map")
        axes[1].axis("off")
        axes[2].imshow(found.anomaly_map >= threshold, cmap="gray", vmin=0, vmax=1)
        axes[2].set_title(f"map >= {threshold:.2f}")
        if mask is not None:
            axes[3].imshow(mask, cmap="gray", vmin=0, vmax=1)
            if not mask.any():
                axes[3].text(0.5, 0.5, "normal: no anomalous pixels", ha="center", va="center", color="lightgrey",
                             transform=axes[3].transAxes)
        else:                                                # same frame as the other panels, text inside it
            axes[3].imshow(np.ones(found.image.shape[:2]), cmap="gray", vmin=0, vmax=1)
            axes[3].text(0.5, 0.5, "no ground truth", ha="center", va="center", color="grey",
                         transform=axes[3].transAxes)
        axes[3].set_title("ground truth")
        for ax in axes[2:]:                                  # framed: white masks on a white page
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(heat, ax=axes, fraction=0.02, pad=0.01, label="anomaly score")
        fig.suptitle(f"'{found.class_name}': image score {found.score:.3f} -> {decision} at {threshold:.2f}"
                     + (f"\n{title}" if title else ""), color="darkred" if decision == "anomalous" else "black")
    return fig


def layer_maps_figure(found) -> Figure:
    """Each output layer's P(abnormal) map before the layers are averaged, on a shared colour bar."""
    n = len(found.layer_maps)
    with paper_style(SCREEN_STYLE):
        h, w = found.image.shape[:2]
        fig, axes = plt.subplots(1, n, figsize=(SCREEN_WIDTH, (SCREEN_WIDTH - 1.0) / n * h / w + 0.9), squeeze=False,
                                 layout="constrained")
        for ax, name, m in zip(axes[0], found.layer_names, found.layer_maps):
            heat = ax.imshow(m, cmap="jet", vmin=0, vmax=1)
            ax.set_title(name)
            ax.axis("off")
        fig.colorbar(heat, ax=axes, fraction=0.02, pad=0.01, label="P(abnormal)")
        fig.suptitle("per-layer maps, before they are combined" if found.layer_names[0].startswith("layer")
                     else "per-scale window maps, before the harmonic mean with the image score")
    return fig


def smoothing_figure(found) -> Figure:
    """The averaged map before and after the Gaussian smoothing (sigma 4, as the reference)."""
    with paper_style(SCREEN_STYLE):
        h, w = found.image.shape[:2]
        fig, axes = plt.subplots(1, 2, figsize=(SCREEN_WIDTH * 0.6, (SCREEN_WIDTH * 0.6 - 1.0) / 2 * h / w + 0.6),
                                 layout="constrained")
        for ax, m, name in zip(axes, (found.raw_map, found.anomaly_map), ("before smoothing", "after smoothing")):
            heat = ax.imshow(m, cmap="jet", vmin=0, vmax=1)
            ax.set_title(name)
            ax.axis("off")
        fig.colorbar(heat, ax=axes, fraction=0.04, pad=0.02, label="anomaly score")
    return fig


def hsf_figure(found) -> Figure:
    """The patches HSF clustered (the most anomalous 5·k), outlined in their cluster's colour."""
    from matplotlib.patches import Rectangle

    h, w = found.image.shape[:2]
    ph, pw = h / found.grid, w / found.grid
    k = int(found.hsf_clusters.max()) + 1
    colours = plt.get_cmap("tab20", max(k, 1))
    with paper_style(SCREEN_STYLE):
        side = SCREEN_WIDTH * 0.4
        fig, ax = plt.subplots(figsize=(side, side * h / w + 0.5), layout="constrained")
        ax.imshow(found.image)
        for index, cluster in zip(found.hsf_patches, found.hsf_clusters):
            r, c = divmod(int(index), found.grid)
            ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, lw=1.5, edgecolor=colours(int(cluster))))
        ax.set_title(f"HSF: {len(found.hsf_patches)} patches, {k} clusters")
        ax.axis("off")
    return fig


def forest_plot(comparison: pd.DataFrame, metric: str, title: str = "") -> Figure:
    """A forest plot of `compare` rows for one metric: per dataset (and their mean) each run's difference
    from the reference (run_a), run - reference in points, with its paired 95% interval; 0 dashed.
    Intervals that exclude 0 are drawn solid, the others open."""
    rows = comparison[comparison.metric == metric]
    datasets = list(dict.fromkeys(rows.dataset))
    others = list(dict.fromkeys(rows.run_b))
    with paper_style():
        fig, ax = plt.subplots(figsize=(0.9 * NOTEBOOK_WIDTH, 1.2 + 0.3 * len(datasets) * max(1, len(others)) ** 0.5))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        step = 0.7 / max(1, len(others))
        for k, other in enumerate(others):
            mine = rows[rows.run_b == other].set_index("dataset").reindex(datasets)
            y = np.arange(len(datasets)) - 0.35 + step * (k + 0.5)
            # compare's rows are reference - run: drawn as run - reference, so right of 0 is better than it
            diff, lo, hi = (-mine[c].to_numpy(float) * 100 for c in ("difference", "difference_hi", "difference_lo"))
            sure = (lo > 0) | (hi < 0)
            color = colors[k % len(colors)]
            ax.errorbar(diff, y, xerr=[diff - lo, hi - diff], fmt="none", ecolor=color, elinewidth=1.2, capsize=2)
            ax.plot(diff[sure], y[sure], "o", color=color, markersize=4, label=other)
            ax.plot(diff[~sure], y[~sure], "o", mfc="white", color=color, markersize=4,
                    label=None if sure.any() else other)
        ax.axvline(0, color="0.4", linestyle="--", linewidth=0.8)
        ax.set_yticks(np.arange(len(datasets)), datasets)
        ax.invert_yaxis()
        reference = rows.run_a.iloc[0] if len(rows) else ""
        ax.set_xlabel(f"difference in {metric} (points): run - {reference}, 95% paired bootstrap interval")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, title="run",
                  handles=[plt.Line2D([], [], marker="o", linestyle="", color=colors[k % len(colors)], markersize=4)
                           for k in range(len(others))], labels=others)
        ax.set_title("filled: the interval excludes 0 (a difference the test set shows); open: it does not",
                     fontsize=plt.rcParams["legend.fontsize"], loc="left")
        ax.grid(axis="x", alpha=0.3)
        _title(fig, title)
        fig.tight_layout()
    return fig


def _title(fig: Figure, title: str) -> None:
    if title:
        fig.suptitle(title, fontsize=10, color="darkred")


def save(fig: Figure, path: Union[str, Path], dpi: int = 150, formats: Sequence[str] = ("png", "pdf")) -> Path:
    """Save ``fig`` as ``path`` with each suffix of ``formats`` (PNG and PDF, vector for print); returns
    the first. 150 dpi: a column-wide PNG is 525 px, sharp on a screen (200 dpi costs 1.7x the time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        fig.savefig(path.with_suffix(f".{fmt}"), dpi=dpi, bbox_inches="tight")
    return path.with_suffix(f".{formats[0]}")
