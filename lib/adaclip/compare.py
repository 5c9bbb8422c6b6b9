"""Paired comparisons of runs evaluated on the same test images: is method A really better than B?

Per dataset and metric: the difference A - B, its paired-bootstrap 95% interval and a two-sided
p-value (both runs' bootstrap replicates draw the same images, `bootstrap.resample_counts`, so each
replicate's difference pairs like with like); for image AUROC also DeLong's test for correlated ROC
curves (`stats.delong_mean`, from ``scores.csv``); Holm's correction across the datasets beside the raw
p-values. A dataset's value is the unweighted mean over its categories (as ``metrics.csv``'s mean rows),
over the categories where both runs define the metric; "mean" is the mean over datasets (as the
paper tables' last row), reported but not part of the Holm family.

The p-value is the bootstrap test of the centred replicates: the share of replicates whose deviation
of the difference is at least as large as the observed difference, (1 + count) / (1 + replicates).

>>> table = compare("results", "default", "default/baselines/clip")
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from . import bootstrap, stats
from .metric_keys import METRIC_KEYS

PathLike = Union[str, Path]
ALPHA = 0.05
COLUMNS = ["run_a", "run_b", "dataset", "metric", "a", "b", "difference", "difference_lo", "difference_hi",
           "p_value", "p_holm", "delong_p", "delong_p_holm", "categories"]


@dataclass
class RunData:
    """What a paired comparison reads of one run folder."""
    name: str
    metrics: pd.DataFrame                   # metrics.csv: category rows
    scores: pd.DataFrame                    # scores.csv
    deviations: Optional[dict]              # bootstrap.npz's {(dataset, category): {metric: deviations}}
    replicates: int
    seed: Optional[int]
    manifests: list

    def categories(self, dataset: str) -> list[str]:
        rows = self.metrics[(self.metrics.dataset == dataset) & (self.metrics.category != "mean")]
        return list(rows.category)

    def value(self, dataset: str, category: str, metric: str) -> float:
        row = self.metrics[(self.metrics.dataset == dataset) & (self.metrics.category == category)]
        return float(row[metric].iloc[0]) if len(row) and metric in row else np.nan

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(self.metrics.dataset[self.metrics.dataset != "all"]))


def read_run(results_dir: PathLike, run: str) -> RunData:
    """A run folder's metrics, scores and bootstrap replicates (None where it was evaluated without)."""
    folder = Path(results_dir) / run
    if not (folder / "metrics.csv").is_file():
        raise FileNotFoundError(f"run {run!r} has no {folder / 'metrics.csv'}; evaluate it first "
                                f"(notebook 02 or `adaclip evaluate --run {run}`)")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    metrics = pd.read_csv(folder / "metrics.csv")
    scores = pd.read_csv(folder / "scores.csv") if (folder / "scores.csv").is_file() else pd.DataFrame()
    deviations, replicates, seed = None, 0, None
    if (folder / bootstrap.FILE).is_file():
        saved = bootstrap.load(folder / bootstrap.FILE)
        deviations, replicates, seed = saved["categories"], saved["replicates"], saved["seed"]
    return RunData(run, metrics[metrics.category != "mean"].reset_index(drop=True), scores, deviations, replicates,
                   seed, list(config.get("test_manifests") or []))


def check_paired(a: RunData, b: RunData) -> None:
    """Both runs scored the same images (per dataset, in the same order, with the same labels) and drew
    the same bootstrap replicates; else a ValueError naming the first differing dataset's manifests."""
    for run in (a, b):
        if run.deviations is None:
            raise ValueError(f"run {run.name!r} has no {bootstrap.FILE}: evaluate it again with intervals "
                             f"(EvalCfg(bootstrap=1000), the default; `adaclip evaluate --bootstrap 1000`)")
    if (a.replicates, a.seed) != (b.replicates, b.seed):
        raise ValueError(f"runs {a.name!r} and {b.name!r} drew different bootstrap replicates ({a.replicates} with "
                         f"seed {a.seed} against {b.replicates} with seed {b.seed}): evaluate them with the same "
                         f"bootstrap and bootstrap_seed to compare them")
    columns = [c for c in ("dataset", "category", "image", "crop", "label") if c in a.scores and c in b.scores]
    for dataset in dict.fromkeys([*a.datasets, *b.datasets]):
        mine = [r.scores[r.scores.dataset == dataset][columns].reset_index(drop=True).astype(str) for r in (a, b)]
        if len(mine[0]) != len(mine[1]) or not mine[0].equals(mine[1]):
            differ = np.flatnonzero((mine[0].reindex(mine[1].index) != mine[1]).any(axis=1).values) \
                if len(mine[0]) == len(mine[1]) else []
            first = (f"first differing image {mine[0].image.iloc[differ[0]]!r} against {mine[1].image.iloc[differ[0]]!r}"
                     if len(differ) else f"{len(mine[0])} against {len(mine[1])} images")
            raise ValueError(f"runs {a.name!r} and {b.name!r} were not evaluated on the same images of dataset "
                             f"{dataset!r} ({first}); its manifest: {_manifest_of(a, dataset)} in {a.name!r}, "
                             f"{_manifest_of(b, dataset)} in {b.name!r}. Evaluate both on the same manifest")


def _manifest_of(run: RunData, dataset: str) -> str:
    """The manifest of ``run`` that lists ``dataset`` (by its dataset column), else all of them."""
    for path in run.manifests:
        try:
            if dataset in set(pd.read_csv(path, usecols=["dataset"]).dataset):
                return str(path)
        except (OSError, ValueError):
            continue
    return ", ".join(map(str, run.manifests)) or "(not recorded)"


def dataset_value(run: RunData, dataset: str, metric: str, categories: Optional[list] = None) -> tuple[float, np.ndarray]:
    """A dataset's value (mean over ``categories``, default its own) and its bootstrap deviations."""
    categories = run.categories(dataset) if categories is None else categories
    values = {c: run.value(dataset, c, metric) for c in categories}
    kept = [c for c, v in values.items() if np.isfinite(v)]
    if not kept:
        return np.nan, np.zeros(0)
    value = float(np.mean([values[c] for c in kept]))
    if run.deviations is None:
        return value, np.zeros(0)
    return value, bootstrap.mean_deviation([run.deviations[(dataset, c)][metric] for c in kept])


def run_interval(run: RunData, dataset: Optional[str], metric: str) -> tuple[float, float, float]:
    """(value, lo, hi) of a dataset (``None``: the mean over the run's datasets)."""
    parts = [dataset_value(run, d, metric) for d in (run.datasets if dataset is None else [dataset])]
    parts = [(v, dev) for v, dev in parts if np.isfinite(v)]
    if not parts:
        return np.nan, np.nan, np.nan
    value = float(np.mean([v for v, _ in parts]))
    dev = bootstrap.mean_deviation([dev for _, dev in parts]) if all(len(d) for _, d in parts) else np.zeros(0)
    return (value, *bootstrap.interval(value, dev))


def paired(a: RunData, b: RunData, dataset: Optional[str], metric: str) -> dict:
    """The paired comparison of one dataset (``None``: the mean over datasets) and metric: values,
    difference, its interval and p-value, and the number of categories both define."""
    datasets = [dataset] if dataset is not None else [d for d in a.datasets if d in b.datasets]
    va, vb, da, db, n = [], [], [], [], 0
    for d in datasets:
        both = [c for c in a.categories(d) if np.isfinite(a.value(d, c, metric)) and np.isfinite(b.value(d, c, metric))]
        if not both:
            continue
        for run, values, devs in ((a, va, da), (b, vb, db)):
            value, dev = dataset_value(run, d, metric, both)
            values.append(value)
            devs.append(dev)
        n += len(both)
    out = {"dataset": dataset if dataset is not None else "mean", "metric": metric, "a": np.nan, "b": np.nan,
           "difference": np.nan, "difference_lo": np.nan, "difference_hi": np.nan, "p_value": np.nan, "categories": n}
    if not va:
        return out
    a_value, b_value = float(np.mean(va)), float(np.mean(vb))
    diff = a_value - b_value
    dev = bootstrap.mean_deviation(da) - bootstrap.mean_deviation(db)
    dev = dev[np.isfinite(dev)]
    out.update(a=a_value, b=b_value, difference=diff)
    if len(dev):
        lo, hi = np.quantile(dev, [(1 - bootstrap.LEVEL) / 2, (1 + bootstrap.LEVEL) / 2])
        out.update(difference_lo=diff + lo, difference_hi=diff + hi,
                   p_value=float((1 + np.sum(np.abs(dev) >= abs(diff) - 1e-12)) / (1 + len(dev))))
    return out


def delong_dataset(a: RunData, b: RunData, dataset: Optional[str]) -> float:
    """DeLong's p-value for the image AUROC of a dataset (``None``: the mean over datasets), from scores.csv."""
    datasets = [dataset] if dataset is not None else [d for d in a.datasets if d in b.datasets]
    parts = []
    for d in datasets:
        sa, sb = a.scores[a.scores.dataset == d], b.scores[b.scores.dataset == d]
        for category in dict.fromkeys(sa.category):
            ca, cb = sa[sa.category == category], sb[sb.category == category]
            parts.append((ca.label.values, ca.score.values, cb.score.values))
    return float(stats.delong_mean(parts)["p_value"]) if parts else np.nan


def compare(results_dir: PathLike, run_a: str, run_b: str, metrics: Sequence[str] = METRIC_KEYS) -> pd.DataFrame:
    """Run A against run B on the same images: a row per dataset (then their mean) and metric, with the
    difference A - B, its paired 95% interval, the bootstrap p-value and Holm's correction across the
    datasets; image AUROC also with DeLong's p-value (and its Holm correction). Raises a ValueError when
    the runs did not score the same images."""
    a, b = read_run(results_dir, run_a), read_run(results_dir, run_b)
    check_paired(a, b)
    datasets = [d for d in a.datasets if d in b.datasets]
    rows = []
    for metric in metrics:
        block = [paired(a, b, d, metric) for d in [*datasets, None]]
        for row, d in zip(block, [*datasets, None]):
            row["delong_p"] = delong_dataset(a, b, d) if metric == "image_auroc" and np.isfinite(row["a"]) else np.nan
        for raw, corrected in (("p_value", "p_holm"), ("delong_p", "delong_p_holm")):
            adjusted = stats.holm([r[raw] for r in block[:-1]])          # the datasets, not their mean
            for row, p in zip(block, [*adjusted, np.nan]):
                row[corrected] = p
        rows += [r for r in block if np.isfinite(r["a"]) or np.isfinite(r["b"])]
    table = pd.DataFrame(rows).assign(run_a=run_a, run_b=run_b)
    return table.reindex(columns=COLUMNS)


def compare_many(results_dir: PathLike, runs: Sequence[str], metrics: Sequence[str] = METRIC_KEYS) -> pd.DataFrame:
    """Every run after the first against the first (the reference), one `compare` table after another."""
    if len(runs) < 2:
        raise ValueError(f"compare needs at least two runs, got {list(runs)}")
    return pd.concat([compare(results_dir, runs[0], other, metrics) for other in runs[1:]], ignore_index=True)


def verdict(row) -> str:
    """A comparison row in words: "<run_a> better", "<run_b> better" or "tie" at the 5% level
    (Holm-corrected where the row is part of the Holm family, the raw p-value for the mean)."""
    p = row["p_holm"] if np.isfinite(row["p_holm"]) else row["p_value"]
    if not np.isfinite(p):
        return "n/a"
    return "tie" if p >= ALPHA else f'{row["run_a"] if row["difference"] > 0 else row["run_b"]} better'
