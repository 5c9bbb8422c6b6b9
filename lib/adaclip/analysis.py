"""Analysis of finished runs: tables for papers, the reproduction table, and ``summary.md``.

Everything here reads run folders (``config.json``, ``metrics.csv``, ``scores.csv``,
``pixel_curves.csv``, ``train_log.csv``) and the published numbers shipped with the package
(``published/results.csv``, percent, with a ``source`` column); figures live in ``viz.py``.

>>> runs = load_runs("results", ["default", "default/baselines/clip"])
>>> table = paper_table(runs.metrics, columns="run")          # rows: datasets + mean
>>> write_table(table, "results/default/tables/main")         # .csv, .md, .tex
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
from PIL import Image

from .io import atomic_path, write_csv
from .metrics import METRIC_KEYS
from .runs import RANDOM_WEIGHTS, environment

PathLike = Union[str, Path]
PUBLISHED = Path(__file__).parent / "published" / "results.csv"
METRIC_NAMES = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1": "I-F1max", "pixel_auroc": "P-AUROC",
                "pixel_ap": "P-AP", "pixel_f1": "P-F1max", "pixel_aupro": "AUPRO"}


@dataclass
class Runs:
    """Finished runs, each table with a ``run`` column."""
    configs: dict            # run name -> config.json
    metrics: pd.DataFrame
    scores: pd.DataFrame
    curves: pd.DataFrame     # pixel ROC / PR points (empty where a run has none)
    logs: dict               # run name -> train_log.csv (absent for runs without one)

    @property
    def random_weights(self) -> bool:
        return any(c.get("backbone_weights") == "random" for c in self.configs.values())


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
    return Runs(configs, cat(metrics), cat(scores), cat(curves), logs)


def describe(config: dict) -> dict:
    """The settings that tell runs apart: method, backbone, weights, prompts, HSF."""
    model = config.get("model", {})
    prompts, fusion, backbone = model.get("prompts", {}), model.get("fusion", {}), model.get("backbone", {})
    method = model.get("method", "adaclip")
    return {"method": method, "backbone": f'{backbone.get("name")} @ {backbone.get("image_size")}',
            "weights": config.get("backbone_weights"),
            "prompts": (f'{prompts.get("type")} / {prompts.get("branch")} / J={prompts.get("depth")} / '
                        f'L={prompts.get("length")}') if method == "adaclip" and prompts.get("branch") else "none",
            "hsf": bool(fusion.get("use_hsf")), "epochs": (config.get("train") or {}).get("epochs"),
            "selected_epoch": config.get("selected_epoch")}


def run_labels(runs: Runs) -> dict:
    """Short column labels: the method when that tells the runs apart ("adaclip", "clip"), else the
    run name relative to the runs' common folder (a sweep's configuration ids)."""
    names = list(runs.configs)
    methods = [describe(runs.configs[r])["method"] for r in names]
    if len(set(methods)) == len(names):
        return dict(zip(names, methods))
    parts = [n.split("/") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return {n: "/".join(p[common:]) for n, p in zip(names, parts)}


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
    skip = {"config_id", "status", "error", "backbone_weights", "dataset", "category", "images", "anomalous",
            "image_threshold", *METRIC_KEYS}
    return [c for c in table.columns if c not in skip and table[c].astype(str).nunique() > 1]


def dataset_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per run and dataset: the dataset's mean row, or its only category's row."""
    rows = metrics[metrics.dataset != "all"]
    means = rows[rows.category == "mean"]
    single = rows[~rows.set_index(["run", "dataset"]).index.isin(means.set_index(["run", "dataset"]).index)]
    return pd.concat([means, single]).sort_index(kind="stable").reset_index(drop=True)   # the runs' own order


def paper_table(metrics: pd.DataFrame, columns: str = "run", metrics_shown: Sequence[str] = METRIC_KEYS,
                percent: bool = True) -> pd.DataFrame:
    """Rows = datasets (+ an unweighted mean over them), columns = (metric, ``columns`` value).

    ``columns`` names the column that tells runs apart ("run", or a sweep's "config_id"). Values
    in percent as papers print them; undefined metrics stay NaN (blank when written).
    """
    per = dataset_rows(metrics) if "category" in metrics else metrics
    long = per.melt(id_vars=["dataset", columns], value_vars=list(metrics_shown), var_name="metric")
    table = long.pivot_table(index="dataset", columns=["metric", columns], values="value", dropna=False,
                             sort=False)
    table = table.reindex(columns=pd.MultiIndex.from_product(
        [list(metrics_shown), list(dict.fromkeys(per[columns]))], names=["metric", columns]))
    table = table.dropna(axis=1, how="all")
    table.loc["mean"] = table.mean(axis=0, skipna=True)
    return table * 100 if percent else table


def config_table(metrics: pd.DataFrame, rows: str = "run", metrics_shown: Sequence[str] = METRIC_KEYS,
                 percent: bool = True) -> pd.DataFrame:
    """Rows = runs or configurations, columns = metrics (unweighted mean over the datasets): the
    ablation-table layout, where the best value of each column is the one to bold."""
    per = dataset_rows(metrics) if "category" in metrics else metrics
    table = per.groupby(rows, sort=False)[list(metrics_shown)].mean().dropna(axis=1, how="all")
    return table * 100 if percent else table


def best_cells(table: pd.DataFrame) -> pd.DataFrame:
    """True where a value is the best of its row within its metric (the runs compared side by side);
    for a single-level table, the best of each column (e.g. configurations as rows)."""
    values = table.astype(float)
    if isinstance(table.columns, pd.MultiIndex):
        best = values.T.groupby(level=0, sort=False).transform("max").T
    else:
        best = pd.DataFrame(np.broadcast_to(values.max(axis=0).values, values.shape), index=values.index,
                            columns=values.columns)
    return values.notna() & np.isclose(values, best)


def _flat_columns(table: pd.DataFrame) -> list[str]:
    if isinstance(table.columns, pd.MultiIndex):
        return [f"{METRIC_NAMES.get(m, m)} {v}" for m, v in table.columns]
    return [METRIC_NAMES.get(c, str(c)) for c in table.columns]


def to_markdown(table: pd.DataFrame, digits: int = 1) -> str:
    """Markdown with the best values in bold and undefined ones blank."""
    bold = best_cells(table)
    cells = table.copy().astype(object)
    for c in range(table.shape[1]):
        for r in range(table.shape[0]):
            v = table.iat[r, c]
            text = "" if pd.isna(v) else f"{v:.{digits}f}"
            cells.iat[r, c] = f"**{text}**" if text and bold.iat[r, c] else text
    cells.columns = _flat_columns(table)
    return cells.to_markdown(disable_numparse=True, stralign="right")


def to_latex(table: pd.DataFrame, digits: int = 1, caption: str = "") -> str:
    """A LaTeX tabular (pandas Styler, booktabs rules), best values in \\textbf, NaN blank."""
    bold = best_cells(table)
    styler = table.style.format(precision=digits, na_rep="").apply(
        lambda _: np.where(bold, "font-weight: bold;", ""), axis=None)
    if isinstance(table.columns, pd.MultiIndex):
        styler = styler.format_index(lambda m: METRIC_NAMES.get(m, m), axis=1, level=0)
    return styler.to_latex(convert_css=True, hrules=True, caption=caption or None, multicol_align="c")


def write_table(table: pd.DataFrame, stem: PathLike, digits: int = 1, caption: str = "") -> dict:
    """``stem``.csv, .md and .tex, each written atomically; returns their paths."""
    stem = Path(stem)
    paths = {ext: stem.with_suffix(f".{ext}") for ext in ("csv", "md", "tex")}
    flat = table.copy()
    flat.columns = _flat_columns(table)
    write_csv(paths["csv"], flat.reset_index())
    for ext, text in (("md", to_markdown(table, digits)), ("tex", to_latex(table, digits, caption))):
        with atomic_path(paths[ext]) as tmp:
            tmp.write_text(text + "\n")
    return paths


def published_results(path: PathLike = PUBLISHED) -> pd.DataFrame:
    """The published numbers (percent), one row per method and dataset, with their source."""
    return pd.read_csv(path)


def reproduction_table(runs: Runs, published: Optional[pd.DataFrame] = None, method: str = "AdaCLIP",
                       metrics_shown: Sequence[str] = METRIC_KEYS) -> pd.DataFrame:
    """Our runs beside the published rows of ``method`` for the same dataset and metric.

    One row per run, dataset and metric that both report: ours and published in percent, the
    difference, the published source, and whether ours came from random backbone weights (then the
    difference says nothing about the method).
    """
    published = published_results() if published is None else published
    pub = published[published.method == method].melt(id_vars=["method", "dataset", "trained_on", "source"],
                                                     value_vars=list(metrics_shown), var_name="metric",
                                                     value_name="published").dropna(subset=["published"])
    ours = dataset_rows(runs.metrics).melt(id_vars=["run", "dataset"], value_vars=list(metrics_shown),
                                           var_name="metric", value_name="ours").dropna(subset=["ours"])
    ours["ours"] *= 100
    table = ours.merge(pub, on=["dataset", "metric"], how="inner")
    table["difference"] = table["ours"] - table["published"]
    table["random_weights"] = table.run.map(lambda r: runs.configs.get(r, {}).get("backbone_weights") == "random")
    columns = ["run", "dataset", "metric", "ours", "published", "difference", "random_weights", "trained_on", "source"]
    return table[columns].reset_index(drop=True)


def reproduction_markdown(table: pd.DataFrame) -> str:
    """The reproduction table for summary.md; cells from random weights carry a dagger."""
    if table.empty:
        return "_No dataset of these runs has published numbers to compare with._"
    shown = table.assign(metric=table.metric.map(lambda m: METRIC_NAMES.get(m, m)))
    mark = np.where(shown.random_weights, " †", "")
    shown["ours"] = [f"{v:.1f}{m}" for v, m in zip(shown.ours, mark)]
    shown["difference"] = [f"{v:+.1f}{m}" for v, m in zip(shown.difference, mark)]
    shown["published"] = shown.published.map(lambda v: f"{v:.1f}")
    text = shown.drop(columns=["random_weights"]).to_markdown(index=False, disable_numparse=True)
    if table.random_weights.any():
        text += f"\n\n† {RANDOM_WEIGHTS}."
    return text


def write_summary(path: PathLike, runs: Runs, tables: dict, figures: dict, title: str = "AdaCLIP analysis") -> Path:
    """``summary.md``: the runs, every table in Markdown, every figure linked (relative paths), whether
    real or random backbone weights were used, and the package versions."""
    path = Path(path)
    lines = [f"# {title}", ""]
    if runs.random_weights:
        lines += [f"> **Warning:** at least one run used {RANDOM_WEIGHTS}.", ""]
    described = pd.DataFrame({r: describe(c) for r, c in runs.configs.items()}).T
    lines += ["## Runs", "", described.to_markdown(), ""]
    for name, table in tables.items():
        text = table if isinstance(table, str) else to_markdown(table)
        lines += [f"## {name}", "", text, ""]
    if figures:
        lines += ["## Figures", ""]
        for name, fig_path in figures.items():
            rel = Path(fig_path).relative_to(path.parent) if Path(fig_path).is_relative_to(path.parent) else fig_path
            pdf = Path(rel).with_suffix(".pdf")
            lines += [f"### {name}", "", f"![{name}]({Path(rel).as_posix()})", "", f"[PDF]({pdf.as_posix()})", ""]
    env = environment()
    lines += ["## Environment", "", f"Python {env['python']} on {env['platform']}, device {env['device']}.", "",
              pd.Series(env["packages"], name="version").rename_axis("package").to_frame().to_markdown(), ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path

