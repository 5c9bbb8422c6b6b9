"""Analysis of finished runs: tables for papers, the reproduction table, and ``summary.md``.

Everything here reads run folders (``config.json``, ``metrics.csv``, ``scores.csv``,
``pixel_curves.csv``, ``train_log.csv``) and the published numbers shipped with the package
(``published/results.csv``, percent, with a ``source`` column); figures live in ``viz.py``.

>>> runs = load_runs("results", ["default", "default/baselines/clip"])
>>> table = paper_table(runs.metrics, columns="run")          # rows: datasets + mean
>>> write_table(table, "results/default/tables/main")         # .csv, .md, .tex
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
from PIL import Image

from . import compare as comparisons
from .config import activation_name
from .io import atomic_path, write_csv
from .metric_keys import METRIC_KEYS
from .runs import BASELINE_DIR, RANDOM_WEIGHTS, environment

PathLike = Union[str, Path]
PUBLISHED = Path(__file__).parent / "published" / "results.csv"
METRIC_NAMES = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1": "I-F1max", "pixel_auroc": "P-AUROC",
                "pixel_ap": "P-AP", "pixel_f1": "P-F1max", "pixel_aupro": "AUPRO", "pixel_aupro_cflow": "AUPRO (cflow)"}
# sources whose AUPRO is the cflow-style variant (published/README.md): filed under pixel_aupro_cflow
CFLOW_AUPRO_SOURCES = ("Crane (arXiv 2504.11055)", "AnomalyCLIP paper", "GlocalCLIP paper")
UNDEFINED = "—"                          # how an undefined (NaN) value reads, in tables and in text alike
TRAINING_FREE = "none (training-free)"
MISMATCH = "≠"                          # published model trained on other auxiliary data than ours


@dataclass
class Runs:
    """Finished runs, each table with a ``run`` column."""
    configs: dict            # run name -> config.json
    metrics: pd.DataFrame
    scores: pd.DataFrame
    curves: pd.DataFrame     # pixel ROC / PR points (empty where a run has none)
    logs: dict               # run name -> train_log.csv (absent for runs without one)
    results_dir: Optional[Path] = None
    _data: dict = field(default_factory=dict, repr=False)

    @property
    def random_weights(self) -> bool:
        return any(c.get("backbone_weights") == "random" for c in self.configs.values())

    def data(self, run: str) -> "comparisons.RunData":
        """A run's metrics, scores and bootstrap replicates, as the paired comparisons read them (cached)."""
        if run not in self._data:
            self._data[run] = comparisons.read_run(self.results_dir, run)
        return self._data[run]


def load_runs(results_dir: PathLike, runs: Sequence[str]) -> Runs:
    """Read each run's folder under ``results_dir``; a run without ``metrics.csv`` is an error that
    says to evaluate it first (notebook 02)."""
    results_dir = Path(results_dir)
    configs, metrics, scores, curves, logs = {}, [], [], [], {}
    for run in runs:
        folder = results_dir / run
        if not (folder / "metrics.csv").is_file():
            raise FileNotFoundError(f"run {run!r} has no {folder / 'metrics.csv'}; evaluate it first "
                                    f"(notebook 02 or `adaclip evaluate --run {run}`)")
        configs[run] = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        metrics.append(pd.read_csv(folder / "metrics.csv").assign(run=run))
        if (folder / "scores.csv").is_file():
            scores.append(pd.read_csv(folder / "scores.csv").assign(run=run))
        if (folder / "pixel_curves.csv").is_file():
            curves.append(pd.read_csv(folder / "pixel_curves.csv").assign(run=run))
        if (folder / "train_log.csv").is_file():
            logs[run] = pd.read_csv(folder / "train_log.csv")
    cat = lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()  # noqa: E731
    return Runs(configs, cat(metrics), cat(scores), cat(curves), logs, results_dir)


def compare(run_a: str, run_b: str, results_dir: Optional[PathLike] = None,
            metrics: Sequence[str] = METRIC_KEYS) -> pd.DataFrame:
    """Run A against run B on the same test images (`adaclip.compare.compare`): per dataset and metric
    the difference, its paired-bootstrap 95% interval, p-values (Holm across datasets; DeLong for image
    AUROC). ``results_dir``: where the run folders are (default: results/)."""
    from .data.registry import results_root

    return comparisons.compare(results_dir if results_dir is not None else results_root(), run_a, run_b, metrics)


def trained_on(config: dict) -> Optional[str]:
    """The auxiliary datasets a run's model learned from ("mvtec+colondb"), "" for a training-free
    method, None when the run does not record it (older runs)."""
    return config.get("trained_on")


def trained_on_text(value: Optional[str]) -> str:
    return "unknown" if value is None else (value or TRAINING_FREE)


def published_name(method: str) -> Optional[str]:
    """A method's name in published/results.csv (`Method.published_name`); None for a method without
    published numbers of its own (the `clip` and `linear` baselines), which is compared with none."""
    from . import methods

    return methods.get(method).published_name if method in methods.available() else None


def published_name_of(config: dict) -> Optional[str]:
    """The published name of a run's method, as its config.json records it (older runs: looked up)."""
    return config["published_name"] if "published_name" in config else published_name(method_of(config))


def method_of(config: dict) -> str:
    """The method a run's config.json names (older runs: inside the model config, else AdaCLIP)."""
    return config.get("method") or (config.get("model") or {}).get("method") or "adaclip"


def run_with_baselines(results_dir: PathLike, run: str) -> list[str]:
    """A run and the evaluated baselines beside it (``results/<run>/baselines/<method>/``), as the
    pipeline's notebook 03 compares them."""
    folder = Path(results_dir) / run / BASELINE_DIR
    found = sorted(p.parent.name for p in folder.glob("*/metrics.csv")) if folder.is_dir() else []
    return [run, *(f"{run}/{BASELINE_DIR}/{name}" for name in found)]


def describe(config: dict) -> dict:
    """The settings that tell runs apart: method, backbone, activation, weights, training data, prompts,
    HSF, epochs, and whether image scores were transductive."""
    model = config.get("model", {})
    prompts, fusion, backbone = model.get("prompts", {}), model.get("fusion", {}), model.get("backbone", {})
    method = method_of(config)
    free = trained_on(config) == "" or str(config.get("selection", "")).startswith("none")
    return {"method": method + (" (transductive)" if config.get("transductive_image_scores") else ""),
            "backbone": f'{backbone.get("name")} @ {backbone.get("image_size")}',
            "activation": activation_name(backbone.get("quick_gelu")), "weights": config.get("backbone_weights"),
            "trained_on": trained_on_text(trained_on(config)),
            "prompts": (f'{prompts.get("type")} / {prompts.get("branch")} / J={prompts.get("depth")} / '
                        f'L={prompts.get("length")}') if method == "adaclip" and prompts.get("branch") else "none",
            "hsf": bool(fusion.get("use_hsf")),
            "epochs": UNDEFINED if free else (config.get("train") or {}).get("epochs", UNDEFINED),
            "selected_epoch": UNDEFINED if free or config.get("selected_epoch") is None else config["selected_epoch"]}


def run_labels(runs: Runs) -> dict:
    """Short column labels: the method when that tells the runs apart ("adaclip", "clip"), else the
    run name relative to the runs' common folder (a sweep's configuration ids)."""
    names = list(runs.configs)
    methods = [method_of(runs.configs[r]) for r in names]
    if len(set(methods)) == len(names):
        return dict(zip(names, methods))
    parts = [n.split("/") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return {n: "/".join(p[common:]) for n, p in zip(names, parts)}


def run_info(runs: Runs, labels: Optional[dict] = None) -> pd.DataFrame:
    """Per run (indexed by its label): run, method, the method's published name (None without one),
    trained_on as recorded (None unknown, "" training-free) and as it reads."""
    labels = labels or {r: r for r in runs.configs}
    rows = []
    for run, config in runs.configs.items():
        method = method_of(config)
        rows.append({"label": labels[run], "run": run, "method": method, "published_method": published_name_of(config),
                     "trained_on": trained_on(config), "trained_on_text": trained_on_text(trained_on(config))})
    return pd.DataFrame(rows).set_index("label")


def qualitative_examples(runs: Runs, results_dir: PathLike, n: int = 3) -> dict:
    """Up to ``n`` anomalous, pixel-annotated test images that every run scored and saved maps for
    (notebook 02's ``save_maps``), one dataset after another; returns images, masks, titles and
    {run: maps}, ready for `viz.qualitative_grid`. Empty lists when no run saved maps."""
    from .data import load_row, read_manifests

    results_dir = Path(results_dir)
    empty = {"images": [], "masks": [], "titles": [], "maps": {}}
    with_maps = [r for r in runs.configs if (results_dir / r / "maps").is_dir()]
    if not with_maps or len(runs.scores) == 0:
        return empty
    first = runs.configs[with_maps[0]]
    manifests, root = first.get("test_manifests"), first.get("test_root")
    if not manifests or not root:
        return empty
    df = read_manifests(manifests)
    annotated = df[(df.label == 1) & (df["mask"] != "")]
    common = set(annotated.image)
    for r in with_maps:
        common &= set(runs.scores[runs.scores.run == r].image)
    picks = annotated[annotated.image.isin(common)]
    picks = picks.assign(k=picks.groupby("dataset").cumcount()).sort_values(["k", "dataset"], kind="stable").head(n)
    out = {"images": [], "masks": [], "titles": [], "maps": {r: [] for r in with_maps}}
    for _, row in picks.iterrows():
        image, mask = load_row(root, row)
        out["images"].append(np.asarray(image))
        out["masks"].append(mask)
        out["titles"].append(f"{row.dataset}/{row.category}")
        for r in with_maps:
            scores = runs.scores[runs.scores.run == r].reset_index(drop=True)
            index = int(np.flatnonzero(scores.image == row.image)[0])
            with np.load(results_dir / r / "maps" / f"{index:06d}.npz") as f:
                small = f["map"].astype(np.float32)
            out["maps"][r].append(np.asarray(Image.fromarray(small).resize(image.size, Image.BILINEAR)))
    return out


def swept_parameters(table: pd.DataFrame) -> list[str]:
    """The parameters of a sweep table that take more than one value."""
    skip = {"config_id", "group", "status", "error", "backbone_weights", "dataset", "category", "images", "anomalous",
            "image_threshold", "pixel_threshold", *METRIC_KEYS, *(f"{m}_{b}" for m in METRIC_KEYS for b in ("lo", "hi"))}
    if "group" in table and (table.group.astype(str) != table.config_id.astype(str)).any():
        skip.add("seed")                  # a seed axis: seed_summary reports it, not an ablation bar
    # a parameter a configuration leaves at its default (None, NaN in sweep.csv) is a value of its own
    return [c for c in table.columns if c not in skip and table[c].map(str).nunique() > 1]


def seed_summary(table: pd.DataFrame, metrics_shown: Sequence[str] = METRIC_KEYS, percent: bool = True) -> pd.DataFrame:
    """A sweep with a seed axis (sweep.csv, ``group`` = the configuration without its seed): per
    configuration, dataset and metric, the mean and standard deviation across training seeds, beside the
    mean half-width of each seed's own 95% bootstrap interval over test images, kept apart (two sources
    of variation: which prompts training found, which test images were drawn). Configurations of one
    seed get no standard deviation."""
    rows = table[table.get("status", pd.Series("", index=table.index)) != "failed"]
    if "group" not in rows:
        rows = rows.assign(group=rows.config_id)
    levels = dataset_rows(rows.dropna(subset=["dataset"]).rename(columns={"config_id": "run"}))
    out = []
    for (group, dataset), g in levels.groupby(["group", "dataset"], sort=False):
        for metric in [m for m in metrics_shown if m in g and g[m].notna().any()]:
            values = g[metric].dropna()
            half = ((g[f"{metric}_hi"] - g[f"{metric}_lo"]) / 2).dropna() if f"{metric}_lo" in g else pd.Series(dtype=float)
            out.append({"group": group, "dataset": dataset, "metric": metric, "seeds": len(values),
                        "mean": values.mean(), "std_across_seeds": values.std(ddof=1) if len(values) > 1 else np.nan,
                        "bootstrap_half_width": half.mean() if len(half) else np.nan})
    result = pd.DataFrame(out, columns=["group", "dataset", "metric", "seeds", "mean", "std_across_seeds",
                                        "bootstrap_half_width"])
    if percent:
        result[["mean", "std_across_seeds", "bootstrap_half_width"]] *= 100
    return result


def dataset_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per run and dataset: the dataset's mean row, or its only category's row."""
    rows = metrics[metrics.dataset != "all"]
    means = rows[rows.category == "mean"]
    single = rows[~rows.set_index(["run", "dataset"]).index.isin(means.set_index(["run", "dataset"]).index)]
    return pd.concat([means, single]).sort_index(kind="stable").reset_index(drop=True)   # the runs' own order


def paper_table(metrics: pd.DataFrame, columns: str = "run", metrics_shown: Sequence[str] = METRIC_KEYS,
                percent: bool = True, published: Optional[pd.DataFrame] = None,
                info: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Rows = datasets (+ an unweighted mean over them), columns = (metric, ``columns`` value).

    ``columns`` names the column that tells runs apart ("run", or a sweep's "config_id"). Values
    in percent as papers print them; undefined metrics stay NaN (blank when written).
    With ``info`` (`run_info`, indexed by the ``columns`` values) each run's column is labelled with its
    training data, "label [trained_on]"; with ``published`` (`published_results`) too, each is followed
    by the published columns of its own method, one per source paper, "Method · paper [trained_on]",
    marked ≠ where that model learned from other data than the run. A published mean is shown only
    when the source covers every dataset the run's mean averages (like with like).
    """
    per = dataset_rows(metrics) if "category" in metrics else metrics
    shown = [m for m in metrics_shown if m in per]
    long = per.melt(id_vars=["dataset", columns], value_vars=shown, var_name="metric")
    table = long.pivot_table(index="dataset", columns=["metric", columns], values="value", dropna=False,
                             sort=False)
    names = list(dict.fromkeys(per[columns]))
    table = table.reindex(columns=pd.MultiIndex.from_product([shown, names], names=["metric", columns]))
    table.loc["mean"] = table.mean(axis=0, skipna=True)
    table = table * 100 if percent else table
    if info is not None:
        table = _with_published(table, shown, names, published, info)
    return table.dropna(axis=1, how="all")


def _with_published(table: pd.DataFrame, shown: Sequence[str], names: list, published: Optional[pd.DataFrame],
                    info: pd.DataFrame) -> pd.DataFrame:
    """`paper_table`'s columns with the published ones: per metric, each run, then its method's sources."""
    datasets = [d for d in table.index if d != "mean"]
    columns = {}
    for metric in shown:
        for name in names:
            mine = info.loc[name]
            ours = table[(metric, name)]
            columns[(metric, f"{name} [{mine.trained_on_text}]")] = ours
            defined = ours.drop("mean").notna()
            for label, values in _published_columns(published, mine, datasets, metric) if published is not None else ():
                like = defined.any() and values[defined].notna().all()      # the datasets our mean averages
                columns[(metric, label)] = pd.concat([values, pd.Series({"mean": values[defined].mean() if like
                                                                         else np.nan})])
    result = pd.DataFrame(columns, index=table.index)
    result.columns = pd.MultiIndex.from_tuples(result.columns, names=table.columns.names)
    return result


def _published_columns(published: pd.DataFrame, mine: pd.Series, datasets: list, metric: str):
    """(label, values per dataset) for each source paper of the run's method that reports ``metric``."""
    pub = published[(published.method == mine.published_method) & published.dataset.isin(datasets)]
    pub = pub.dropna(subset=[metric])
    for paper, rows in pub.groupby(pub.source.map(source_paper), sort=False):
        trained = sorted(set(rows.trained_on.fillna("")))
        label = f"{mine.published_method} · {paper} [{' / '.join(trained_on_text(t) for t in trained)}]"
        label += f" {MISMATCH}" if trained != [mine.trained_on] else ""
        yield label, rows.drop_duplicates("dataset").set_index("dataset")[metric].reindex(datasets)


def beside_published(metrics: pd.DataFrame, info: pd.DataFrame, published: pd.DataFrame,
                     columns: str = "run") -> dict:
    """{metric: `paper_table` of that metric alone} for each metric that some run's method has published
    numbers for: the compact layout of a paper (datasets x methods), ours beside theirs."""
    table = paper_table(metrics, columns, published=published, info=info)
    own = {f"{name} [{row.trained_on_text}]" for name, row in info.iterrows()}
    out = {}
    for metric in dict.fromkeys(table.columns.get_level_values(0)):
        labels = list(table[metric].columns)
        # each run that has published columns beside it (narrow: runs without any stand in the main table)
        kept = [c for i, c in enumerate(labels) if c not in own or (i + 1 < len(labels) and labels[i + 1] not in own)]
        if set(kept) - own:
            out[metric] = table[[(metric, c) for c in kept]]
    return out


def source_paper(source: str) -> str:
    """The paper (or file) of a published row's source, without tables and remarks:
    "AdaCLIP paper Table 1 (reference ...)" -> "AdaCLIP paper", "Crane (arXiv 2504.11055) Table 1" -> "Crane"."""
    plain = re.sub(r"\s*\([^)]*\)", "", source).strip()
    return re.split(r"\s+Table\b", plain)[0].strip()


def long_table(table: pd.DataFrame, index: Optional[pd.Index] = None) -> pd.DataFrame:
    """A `paper_table` with a row per dataset and metric and a column per run: as narrow as the number
    of runs, for a screen or summary.md (the written tables keep the paper layout); best per row.
    ``index``: the rows to keep (another table's `long_table` index), instead of the defined ones."""
    long = table.stack(level=0, future_stack=True)
    metrics = list(dict.fromkeys(table.columns.get_level_values(0)))
    long = long.reindex(pd.MultiIndex.from_product([list(table.index), metrics], names=["dataset", "metric"]))
    if index is not None:
        long.index = long.index.set_levels([METRIC_NAMES.get(m, m) for m in long.index.levels[1]], level=1)
        return long.reindex(index)[list(dict.fromkeys(table.columns.get_level_values(1)))]
    long = long.dropna(how="all")
    long.index = long.index.set_levels([METRIC_NAMES.get(m, m) for m in long.index.levels[1]], level=1)
    return long[list(dict.fromkeys(table.columns.get_level_values(1)))]


def config_table(metrics: pd.DataFrame, rows: str = "run", metrics_shown: Sequence[str] = METRIC_KEYS,
                 percent: bool = True) -> pd.DataFrame:
    """Rows = runs or configurations, columns = metrics (unweighted mean over the datasets): the
    ablation-table layout, where the best value of each column is the one to bold."""
    per = dataset_rows(metrics) if "category" in metrics else metrics
    table = per.groupby(rows, sort=False)[list(metrics_shown)].mean().dropna(axis=1, how="all")
    return table * 100 if percent else table


def best_cells(table: pd.DataFrame, by: str = "auto") -> pd.DataFrame:
    """True where a value is the best of its row within its metric (the runs compared side by side);
    for a single-level table, the best of each column (e.g. configurations as rows); ``by="row"``: the
    best of each row (`long_table`: a dataset and metric per row, the runs as columns)."""
    values = table.astype(float)
    if by == "row":
        best = pd.DataFrame(np.broadcast_to(values.max(axis=1).values[:, None], values.shape), index=values.index,
                            columns=values.columns)
    elif isinstance(table.columns, pd.MultiIndex):
        best = values.T.groupby(level=0, sort=False).transform("max").T
    else:
        best = pd.DataFrame(np.broadcast_to(values.max(axis=0).values, values.shape), index=values.index,
                            columns=values.columns)
    return values.notna() & np.isclose(values, best)


TIE = "≈"                               # tied for best: the paired test does not tell it from the best
INTERVAL_NOTE = ("each value with its 95% bootstrap interval over the test images, [lo, hi]; **bold**: the best, "
                 f"and better than every other run by a paired bootstrap test (p < 0.05); {TIE}: tied for the best "
                 "(the paired test does not tell them apart)")


@dataclass
class Intervals:
    """A table's 95% intervals and significance marks, cell for cell (same index and columns):
    ``marks`` "best" where the best of its row and metric beats every other run (paired bootstrap test,
    p < 0.05), "tie" for the best and every run the test does not tell from it, "" otherwise."""
    lo: pd.DataFrame
    hi: pd.DataFrame
    marks: pd.DataFrame

    @property
    def T(self) -> "Intervals":                  # noqa: N802  as DataFrame.T: the transposed table's
        return Intervals(self.lo.T, self.hi.T, self.marks.T)

    def long(self, table: pd.DataFrame) -> "Intervals":
        """The same for `long_table(table)`."""
        index = long_table(table).index
        return Intervals(*[long_table(part, index=index) for part in (self.lo, self.hi, self.marks)])


def _column_runs(runs: Runs, table: pd.DataFrame, info: Optional[pd.DataFrame]) -> dict:
    """{column label: run} for a table's run columns (published columns left out)."""
    names = {r: r for r in runs.configs}
    if "run_label" in runs.metrics:
        names.update(dict(zip(runs.metrics.run_label, runs.metrics.run)))
    if info is not None:
        for label, row in info.iterrows():
            names[label] = names[f"{label} [{row.trained_on_text}]"] = row.run
    return names


def table_intervals(runs: Runs, table: pd.DataFrame, info: Optional[pd.DataFrame] = None,
                    percent: bool = True) -> Intervals:
    """The intervals and marks of a `paper_table` (rows: datasets and their mean; columns: metric x run)
    from the runs' bootstrap replicates: a dataset's interval as in its metrics.csv mean row, the mean
    row's over the datasets replicate by replicate. Runs without replicates (evaluated with bootstrap=0)
    get no interval, and no run of a row is marked unless every pair of its runs could be tested."""
    scale = 100 if percent else 1
    names = _column_runs(runs, table, info)
    lo, hi = table * np.nan, table * np.nan
    marks = pd.DataFrame("", index=table.index, columns=table.columns)
    for metric, label in table.columns:
        run = names.get(label)
        if run is None or run not in runs.configs:
            continue
        for dataset in table.index:
            _, l, h = comparisons.run_interval(runs.data(run), None if dataset == "mean" else dataset, metric)
            lo.loc[dataset, (metric, label)], hi.loc[dataset, (metric, label)] = l * scale, h * scale
    tested: dict = {}
    for metric in dict.fromkeys(table.columns.get_level_values(0)):
        columns = [(label, names[label]) for label in table[metric].columns if names.get(label) in runs.configs]
        for dataset in table.index:
            values = [(table.loc[dataset, (metric, label)], label, run) for label, run in columns]
            values = sorted([v for v in values if np.isfinite(v[0])], key=lambda v: -v[0])
            if len(values) < 2:
                continue
            best = values[0]
            p = [_paired_p(runs, best[2], other[2], dataset, metric, tested) for other in values[1:]]
            if any(x is None for x in p):
                continue
            tie = [best] + [o for o, x in zip(values[1:], p) if not x < comparisons.ALPHA]
            for _, label, _ in tie:
                marks.loc[dataset, (metric, label)] = "best" if len(tie) == 1 else "tie"
    return Intervals(lo, hi, marks)


def _paired_p(runs: Runs, a: str, b: str, dataset: str, metric: str, tested: dict) -> Optional[float]:
    """The paired bootstrap p-value of runs a and b (None where they cannot be paired)."""
    if (a, b) not in tested:
        try:
            comparisons.check_paired(runs.data(a), runs.data(b))
            tested[(a, b)] = True
        except (ValueError, FileNotFoundError):
            tested[(a, b)] = False
    if not tested[(a, b)]:
        return None
    p = comparisons.paired(runs.data(a), runs.data(b), None if dataset == "mean" else dataset, metric)["p_value"]
    return p if np.isfinite(p) else None


def _cells(table: pd.DataFrame, digits: int, intervals: Optional[Intervals], bold: pd.DataFrame,
           tie: str = TIE) -> pd.DataFrame:
    """The table's cells as text: value, [lo, hi] where there is an interval, the tie mark; and bold."""
    cells = table.copy().astype(object)
    for c in range(table.shape[1]):
        for r in range(table.shape[0]):
            v = table.iat[r, c]
            text = UNDEFINED if pd.isna(v) else f"{v:.{digits}f}"
            if intervals is not None and not pd.isna(v) and np.isfinite(intervals.lo.iat[r, c]):
                text += f" [{intervals.lo.iat[r, c]:.{digits}f}, {intervals.hi.iat[r, c]:.{digits}f}]"
            if intervals is not None and intervals.marks.iat[r, c] == "tie":
                text += f" {tie}"
            cells.iat[r, c] = text
    return cells


def _bold(table: pd.DataFrame, by: str, intervals: Optional[Intervals]) -> pd.DataFrame:
    """Bold cells: the significant best with intervals, else the best by value (`best_cells`)."""
    if intervals is not None:
        return intervals.marks == "best"
    return best_cells(table, by)


def overall_table(table: pd.DataFrame, intervals: Optional[Intervals] = None) -> tuple[pd.DataFrame, Optional[Intervals]]:
    """A `paper_table`'s mean row as the ablation layout (rows: runs, columns: metrics), with its
    intervals and marks the same way."""
    metrics, names = (list(dict.fromkeys(table.columns.get_level_values(k))) for k in (0, 1))
    pick = lambda t: t.loc["mean"].unstack(0).reindex(index=names, columns=metrics).rename_axis("run")  # noqa: E731
    out = pick(table).astype(float).dropna(axis=1, how="all")
    if intervals is None:
        return out, None
    return out, Intervals(*[pick(part)[out.columns] for part in (intervals.lo, intervals.hi, intervals.marks)])


def single_metric(table: pd.DataFrame, intervals: Optional[Intervals] = None) -> tuple[pd.DataFrame, Optional[Intervals]]:
    """A one-metric table (`beside_published`) without its metric header row, and its intervals."""
    drop = lambda t: t.droplevel(0, axis=1)  # noqa: E731
    return drop(table), None if intervals is None else Intervals(*[drop(p) for p in (intervals.lo, intervals.hi,
                                                                                    intervals.marks)])


def comparison_view(comparison: pd.DataFrame, digits: int = 1):
    """`compare` rows as a notebook shows them: per metric and dataset, each run against the reference,
    difference [interval] in points, the p-values, the verdict at 5% (Holm-corrected)."""
    return _comparison_text(comparison, digits).style.hide(axis="index")


def comparison_markdown(comparison: pd.DataFrame, digits: int = 1) -> str:
    """`compare` rows for summary.md."""
    note = ("Difference = reference − run, in points, with its paired-bootstrap 95% interval; p: paired "
            "bootstrap, p (Holm): corrected across the datasets; DeLong: image AUROC only; verdict at 5%.")
    return note + "\n\n" + _comparison_text(comparison, digits).to_markdown(index=False, disable_numparse=True)


def _comparison_text(comparison: pd.DataFrame, digits: int) -> pd.DataFrame:
    fmt = lambda v, spec: UNDEFINED if pd.isna(v) else format(v, spec)  # noqa: E731
    rows = comparison.dropna(subset=["difference"])
    return pd.DataFrame({
        "metric": rows.metric.map(lambda m: METRIC_NAMES.get(m, m)), "dataset": rows.dataset,
        "reference": rows.run_a, "run": rows.run_b,
        "difference [95%]": [f"{d * 100:+.{digits}f} [{lo * 100:+.{digits}f}, {hi * 100:+.{digits}f}]"
                             if pd.notna(lo) else f"{d * 100:+.{digits}f}"
                             for d, lo, hi in zip(rows.difference, rows.difference_lo, rows.difference_hi)],
        "p": rows.p_value.map(lambda v: fmt(v, ".3f")), "p (Holm)": rows.p_holm.map(lambda v: fmt(v, ".3f")),
        "DeLong p": rows.delong_p.map(lambda v: fmt(v, ".3f")),
        "verdict": [comparisons.verdict(r) for _, r in rows.iterrows()]})


def _flat_columns(table: pd.DataFrame) -> list[str]:
    if isinstance(table.columns, pd.MultiIndex):
        return [f"{METRIC_NAMES.get(m, m)} {v}" for m, v in table.columns]
    return [METRIC_NAMES.get(c, str(c)) for c in table.columns]


def to_markdown(table: pd.DataFrame, digits: int = 1, by: str = "auto", intervals: Optional[Intervals] = None) -> str:
    """Markdown with the best values in bold (`best_cells`) and undefined ones as —. With ``intervals``
    (`table_intervals`): each value with its interval, bold only the significant best, ties marked."""
    bold = _bold(table, by, intervals)
    cells = _cells(table, digits, intervals, bold)
    for c in range(table.shape[1]):
        for r in range(table.shape[0]):
            if not pd.isna(table.iat[r, c]) and bold.iat[r, c]:
                cells.iat[r, c] = f"**{cells.iat[r, c]}**"
    cells.columns = _flat_columns(table)
    if isinstance(cells.index, pd.MultiIndex):     # one column per level, not tuples
        return cells.reset_index().to_markdown(index=False, disable_numparse=True, stralign="right")
    return cells.to_markdown(disable_numparse=True, stralign="right")


def styled(table: pd.DataFrame, digits: int = 1, by: str = "auto", intervals: Optional[Intervals] = None):
    """The table as a notebook shows it: best values in bold, undefined ones as —, as in the Markdown
    (with ``intervals``: values with their intervals, the significant best bold, ties marked)."""
    bold = _bold(table, by, intervals)
    if intervals is not None:
        return _cells(table, digits, intervals, bold).style.apply(
            lambda _: np.where(bold, "font-weight: bold;", ""), axis=None)
    return table.style.format(precision=digits, na_rep=UNDEFINED).apply(
        lambda _: np.where(bold, "font-weight: bold;", ""), axis=None)


def metrics_view(metrics: pd.DataFrame, digits: int = 1):
    """A ``metrics.csv`` table as a notebook shows it: metrics in percent with their 95% intervals
    ``[lo, hi]`` where evaluated with them, undefined ones as — (as in every other table), and the
    reasons once each under the table instead of a long column."""
    shown = [m for m in METRIC_KEYS if m in metrics and metrics[m].notna().any()]
    table = metrics[["dataset", "category", "images", "anomalous"]].copy()
    for m in shown:
        lo, hi = (metrics.get(f"{m}_{b}", pd.Series(np.nan, index=metrics.index)) * 100 for b in ("lo", "hi"))
        table[METRIC_NAMES[m]] = [UNDEFINED if pd.isna(v) else f"{v:.{digits}f}" +
                                  (f" [{a:.{digits}f}, {b:.{digits}f}]" if pd.notna(a) else "")
                                  for v, a, b in zip(metrics[m] * 100, lo, hi)]
    notes = {n for note in metrics.get("note", pd.Series(dtype=str)).fillna("") for n in note.split("; ") if n}
    # the mean rows' own notes say how they average, once, not among the reasons for undefined values
    means = {n for n in notes if n.startswith("unweighted mean") or n == "undefined values left out"}
    caption = "Percent" + (", each with its 95% bootstrap interval over the test images [lo, hi]"
                           if any(f"{m}_lo" in metrics and metrics[f"{m}_lo"].notna().any() for m in shown) else "")
    caption += ("; mean rows: unweighted over categories, undefined values left out" if means else "")
    caption += ("; — undefined: " + "; ".join(sorted(notes - means))) if notes - means else ""
    return table.style.hide(axis="index").set_caption(caption)


def to_latex(table: pd.DataFrame, digits: int = 1, caption: str = "", intervals: Optional[Intervals] = None) -> str:
    """A LaTeX tabular (pandas Styler, booktabs rules), best values in \\textbf, undefined ones as ---
    (with ``intervals``: values with their intervals, the significant best bold, ties $\\approx$)."""
    bold = _bold(table, "auto", intervals)
    if intervals is not None:
        cells = _cells(table, digits, intervals, bold, tie="$\\approx$").replace(UNDEFINED, "---")
        styler = cells.style.apply(lambda _: np.where(bold, "font-weight: bold;", ""), axis=None)
    else:
        styler = table.style.format(precision=digits, na_rep="---").apply(
            lambda _: np.where(bold, "font-weight: bold;", ""), axis=None)
    if isinstance(table.columns, pd.MultiIndex):
        styler = styler.format_index(lambda m: METRIC_NAMES.get(m, m), axis=1, level=0)
    return styler.to_latex(convert_css=True, hrules=True, caption=caption or None, multicol_align="c")


def write_table(table: pd.DataFrame, stem: PathLike, digits: int = 1, caption: str = "",
                intervals: Optional[Intervals] = None) -> dict:
    """``stem``.csv, .md and .tex, each written atomically; returns their paths. With ``intervals``
    the CSV has a ``lo`` and ``hi`` column after each value, the others show them in brackets."""
    stem = Path(stem)
    paths = {ext: stem.with_suffix(f".{ext}") for ext in ("csv", "md", "tex")}
    flat = table.copy()
    flat.columns = _flat_columns(table)
    if intervals is not None:
        parts = []
        for k, name in enumerate(flat.columns):
            parts.append(flat.iloc[:, k].rename(name))
            if intervals.lo.iloc[:, k].notna().any():           # published columns have none
                parts += [intervals.lo.iloc[:, k].rename(f"{name} lo"), intervals.hi.iloc[:, k].rename(f"{name} hi")]
        flat = pd.concat(parts, axis=1)
    write_csv(paths["csv"], flat.reset_index())
    for ext, text in (("md", to_markdown(table, digits, intervals=intervals)),
                      ("tex", to_latex(table, digits, caption, intervals))):
        with atomic_path(paths[ext]) as tmp:
            tmp.write_text(text + "\n")
    return paths


def published_results(path: PathLike = PUBLISHED) -> pd.DataFrame:
    """The published numbers (percent), one row per method, dataset and source.

    Cflow-style AUPRO cells (`CFLOW_AUPRO_SOURCES`) move to ``pixel_aupro_cflow``, so that they pair
    with evaluation's ``pixel_aupro_cflow`` and never with MVTec AD's ``pixel_aupro``.
    """
    text = ["method", "dataset", "trained_on", "source"]
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    header = lines[0] if lines else []
    if header[:3] != text[:3] or header[-1:] != ["source"]:
        raise ValueError(f"{path}: the columns must start with {text[:3]} and end with 'source', got {header}")
    wrong = [i + 1 for i, r in enumerate(lines) if r and len(r) != len(header)]
    if wrong:
        raise ValueError(f"{path}: line(s) {wrong[:10]} do not have the header's {len(header)} fields "
                         f"(quote source cells that contain a comma)")
    df = pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False)
    numeric = [c for c in df.columns if c not in text]
    df[numeric] = df[numeric].replace("", np.nan).astype(float)
    cflow = df.source.str.startswith(CFLOW_AUPRO_SOURCES)
    df["pixel_aupro_cflow"] = df.pixel_aupro.where(cflow)
    df.loc[cflow, "pixel_aupro"] = np.nan
    return df


REPRODUCTION_COLUMNS = ["run", "method", "dataset", "metric", "ours", "ours_lo", "ours_hi", "published", "inside",
                        "difference", "published_method",
                        "trained_on_ours", "trained_on_published", "same_training", "random_weights", "source", "note"]


def reproduction_table(runs: Runs, published: Optional[pd.DataFrame] = None,
                       metrics_shown: Sequence[str] = METRIC_KEYS) -> pd.DataFrame:
    """Each run beside every published row of its own method (`published_name`) for the datasets it
    evaluated: one row per run, dataset, metric and source, ours and published in percent, the
    difference, which data each model learned from (``same_training`` False: not like with like), and
    whether ours came from random backbone weights (then the difference says nothing about the method).
    AUPRO pairs by variant: published cflow cells are ``pixel_aupro_cflow``. A run whose method has no
    published numbers, or none for its datasets, gets one row that says so in ``note``.
    """
    published = published_results() if published is None else published
    per = dataset_rows(runs.metrics)
    shown = [m for m in metrics_shown if m in per and m in published]
    ours = per.melt(id_vars=["run", "dataset"], value_vars=shown, var_name="metric", value_name="ours")
    for bound in ("lo", "hi"):        # the 95% interval of each dataset row (metrics.csv; NaN without one)
        bounds = per.reindex(columns=[f"{m}_{bound}" for m in shown])                # melted in the same order
        ours[f"ours_{bound}"] = bounds.melt().value.to_numpy()
    ours[["ours", "ours_lo", "ours_hi"]] *= 100
    frames = []
    for run, config in runs.configs.items():
        method = method_of(config)
        name, mine = published_name_of(config), ours[ours.run == run].drop(columns="run")
        random = config.get("backbone_weights") == "random"
        pub = published[(published.method == name) & published.dataset.isin(mine.dataset)] if name else published.iloc[:0]
        long = pub.melt(id_vars=["method", "dataset", "trained_on", "source"], value_vars=shown, var_name="metric",
                        value_name="published").dropna(subset=["published"])
        if long.empty:
            note = (f"no published numbers for method {method!r}: not compared" if name is None else
                    f"no published {name} numbers for {', '.join(dict.fromkeys(mine.dataset))}")
            frames.append(pd.DataFrame([{"run": run, "method": method, "random_weights": random, "note": note}]))
            continue
        t = long.rename(columns={"method": "published_method", "trained_on": "trained_on_published"}).merge(
            mine, on=["dataset", "metric"], how="left")
        ours_trained = trained_on(config)
        # a published number inside our interval (rounded as published, to one decimal)
        inside = np.where(t.ours_lo.notna(), (t.published >= t.ours_lo.round(1)) & (t.published <= t.ours_hi.round(1)),
                          None)
        t = t.assign(run=run, method=method, difference=t.ours - t.published, trained_on_ours=ours_trained, inside=inside,
                     random_weights=random, same_training=t.trained_on_published.fillna("") == ours_trained,
                     note=np.where(t.ours.isna(), "ours undefined or not computed", ""))
        frames.append(t)
    table = pd.concat(frames, ignore_index=True).reindex(columns=REPRODUCTION_COLUMNS)
    order = {m: i for i, m in enumerate(metrics_shown)}
    return table.sort_values(["metric", "dataset", "run"], key=lambda c: c.map(order) if c.name == "metric" else c,
                             kind="stable").reset_index(drop=True)


def reproduction_markdown(table: pd.DataFrame) -> str:
    """The reproduction table for summary.md: ours, published, difference, the training data of both
    (≠ where they differ), the source; † marks cells from random weights; runs without published
    numbers are listed below it."""
    compared = table[table.published.notna()]
    lines = []
    if not compared.empty:
        shown = pd.DataFrame({"run": compared.run, "dataset": compared.dataset,
                              "metric": compared.metric.map(lambda m: METRIC_NAMES.get(m, m))})
        dagger = np.where(compared.random_weights.astype(bool), " †", "")
        shown["ours [95% interval]"] = [
            UNDEFINED if pd.isna(v) else f"{v:.1f}" + (f" [{lo:.1f}, {hi:.1f}]" if pd.notna(lo) else "") + m
            for v, lo, hi, m in zip(compared.ours, compared.ours_lo, compared.ours_hi, dagger)]
        shown["published"] = compared.published.map(lambda v: f"{v:.1f}")
        shown["inside ours"] = compared.inside.map(lambda v: UNDEFINED if v is None or pd.isna(v) else
                                                   ("yes" if v else "no"))
        shown["difference"] = [UNDEFINED if pd.isna(v) else f"{v:+.1f}{m}" for v, m in zip(compared.difference, dagger)]
        shown["trained on (ours / published)"] = [
            f"{trained_on_text(o)} / {trained_on_text(p or '')}" + ("" if same else f" {MISMATCH}")
            for o, p, same in zip(compared.trained_on_ours, compared.trained_on_published.fillna(""),
                                  compared.same_training)]
        shown["source"] = compared.source.values
        lines.append(shown.to_markdown(index=False, disable_numparse=True))
        notes = []
        if compared.random_weights.astype(bool).any():
            notes.append(f"† {RANDOM_WEIGHTS}.")
        if not compared.same_training.astype(bool).all():
            notes.append(f"{MISMATCH} the published model learned from other auxiliary data than ours: "
                         "the difference is not like with like.")
        if compared.metric.eq("pixel_aupro_cflow").any():
            notes.append("AUPRO (cflow): the variant AnomalyCLIP and Crane publish (200 score thresholds, "
                         "rescaled false-positive rates), computed the same way for ours.")
        lines += ["", " ".join(notes)] if notes else []
    alone = table[table.published.isna() & table.note.fillna("").str.startswith("no published")]
    if not alone.empty:
        lines += ["", *[f"- `{r.run}` ({r.method}): {r.note}." for r in alone.itertuples()]]
    return "\n".join(lines).strip() or "_No run has published numbers to compare with._"


def summary_markdown(runs: Runs, tables: dict, figures: dict, title: str = "AdaCLIP analysis",
                     base: Optional[PathLike] = None, with_figures: bool = True, with_tables: bool = True) -> str:
    """The text of ``summary.md``: the runs, every table in Markdown, every figure linked (relative to
    ``base``; ``with_figures=False`` / ``with_tables=False`` only list them, for a notebook that shows
    them already), whether real or random backbone weights were used, and the package versions."""
    lines = [f"# {title}", ""]
    if runs.random_weights:
        lines += [f"> **Warning:** at least one run used {RANDOM_WEIGHTS}.", ""]
    described = pd.DataFrame({r: describe(c) for r, c in runs.configs.items()}).T
    lines += ["## Runs", "", described.to_markdown(), ""]
    if not with_tables and tables:
        lines += ["## Tables", "", *[f"- {name}" for name in tables], ""]
    for name, table in tables.items() if with_tables else ():
        text = table if isinstance(table, str) else to_markdown(table)
        lines += [f"## {name}", "", text, ""]
    if figures and with_figures:
        lines += ["## Figures", ""]
        for name, fig_path in figures.items():
            rel = Path(fig_path)
            if base is not None and rel.is_relative_to(base):
                rel = rel.relative_to(base)
            lines += [f"### {name}", "", f"![{name}]({rel.as_posix()})", "", f"[PDF]({rel.with_suffix('.pdf').as_posix()})", ""]
    elif figures:
        lines += ["## Figures", "", f"{len(figures)} figure(s), shown above and linked in summary.md.", ""]
    env = environment()
    lines += ["## Environment", "", f"Python {env['python']} on {env['platform']}, device {env['device']}.", "",
              pd.Series(env["packages"], name="version").rename_axis("package").to_frame().to_markdown(), ""]
    return "\n".join(lines)


def write_summary(path: PathLike, runs: Runs, tables: dict, figures: dict, title: str = "AdaCLIP analysis") -> Path:
    """``summary.md`` (`summary_markdown`), written atomically; figures linked relative to its folder."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(summary_markdown(runs, tables, figures, title, base=path.parent))
    return path
