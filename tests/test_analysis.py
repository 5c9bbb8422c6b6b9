"""Tables for papers, the reproduction table against the published numbers, and summary.md."""
import json

import numpy as np
import pandas as pd
import pytest

from adaclip import analysis
from adaclip.data.registry import REPO_ROOT
from adaclip.metrics import METRIC_KEYS

SHARED_PUBLISHED = REPO_ROOT.parent / "shared" / "published" / "results.csv"


def _metrics(run, values: dict) -> pd.DataFrame:
    """metrics.csv rows: values = {(dataset, category): {metric: value}}."""
    rows = [{"run": run, "dataset": d, "category": c, **{k: np.nan for k in METRIC_KEYS}, **v}
            for (d, c), v in values.items()]
    return pd.DataFrame(rows)


def _runs(tmp_path, weights=("random", "openai")) -> analysis.Runs:
    a = _metrics("a", {("visa", "capsules"): {"image_auroc": 0.8, "pixel_auroc": 0.90},
                       ("visa", "macaroni1"): {"image_auroc": 0.6, "pixel_auroc": 0.70},
                       ("visa", "mean"): {"image_auroc": 0.7, "pixel_auroc": 0.80},
                       ("headct", "headct"): {"image_auroc": 0.9}})
    b = _metrics("b", {("visa", "mean"): {"image_auroc": 0.75, "pixel_auroc": 0.7},
                       ("headct", "headct"): {"image_auroc": 0.5}})
    for name, m, w in (("a", a, weights[0]), ("b", b, weights[1])):
        (tmp_path / name).mkdir()
        m.drop(columns="run").to_csv(tmp_path / name / "metrics.csv", index=False)
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"backbone_weights": w, "model": {"method": "adaclip" if name == "a" else "clip"}}))
    return analysis.load_runs(tmp_path, ["a", "b"])


def test_paper_table_rows_datasets_columns_metric_by_run(tmp_path):
    runs = _runs(tmp_path)
    table = analysis.paper_table(runs.metrics, metrics_shown=["image_auroc", "pixel_auroc"])
    assert list(table.index) == ["visa", "headct", "mean"]
    assert list(table.columns) == [("image_auroc", "a"), ("image_auroc", "b"), ("pixel_auroc", "a"), ("pixel_auroc", "b")]
    assert table.loc["visa", ("image_auroc", "a")] == pytest.approx(70.0)          # the dataset's mean row
    assert table.loc["headct", ("image_auroc", "b")] == pytest.approx(50.0)       # its only category
    assert table.loc["mean", ("image_auroc", "a")] == pytest.approx(80.0)         # mean over datasets
    assert np.isnan(table.loc["headct", ("pixel_auroc", "a")])                    # undefined stays NaN
    assert table.loc["mean", ("pixel_auroc", "a")] == pytest.approx(80.0)         # NaN left out of the mean


def test_best_value_is_bold_in_every_format(tmp_path):
    runs = _runs(tmp_path)
    table = analysis.paper_table(runs.metrics, metrics_shown=["image_auroc", "pixel_auroc"])
    bold = analysis.best_cells(table)
    assert bold.loc["visa"].tolist() == [False, True, True, False]
    assert bold.loc["headct"].tolist() == [True, False, False, False]
    md = analysis.to_markdown(table)
    assert "**75.0**" in md and "**80.0**" in md and "**70.0**" not in md
    tex = analysis.to_latex(table)
    assert "\\bfseries 75.0" in tex and "\\bfseries 70.0" not in tex and "I-AUROC" in tex
    paths = analysis.write_table(table, tmp_path / "out" / "main")
    assert {p.suffix for p in paths.values()} == {".csv", ".md", ".tex"} and all(p.is_file() for p in paths.values())
    assert pd.read_csv(paths["csv"]).columns.tolist() == ["dataset", "I-AUROC a", "I-AUROC b", "P-AUROC a", "P-AUROC b"]
    # ablation layout: configurations as rows, the best of each column in bold
    overall = analysis.config_table(runs.metrics, metrics_shown=["image_auroc", "pixel_auroc"])
    assert overall.index.tolist() == ["a", "b"] and overall.loc["b", "image_auroc"] == pytest.approx(62.5)
    assert analysis.best_cells(overall).values.tolist() == [[True, True], [False, False]]


def test_published_numbers_ship_with_the_package():
    published = analysis.published_results()
    assert {"method", "dataset", "trained_on", "source", *METRIC_KEYS} <= set(published.columns)
    row = published[(published.method == "AdaCLIP") & (published.dataset == "visa")].iloc[0]
    assert row.image_auroc == 85.8 and row.pixel_auroc == 95.5 and "Table 1" in row.source
    if SHARED_PUBLISHED.is_file():
        assert analysis.PUBLISHED.read_text() == SHARED_PUBLISHED.read_text()


def test_reproduction_table_puts_ours_beside_the_published_rows(tmp_path):
    runs = _runs(tmp_path)
    table = analysis.reproduction_table(runs)
    visa = table[(table.run == "a") & (table.dataset == "visa") & (table.metric == "image_auroc")].iloc[0]
    assert visa.ours == pytest.approx(70.0) and visa.published == 85.8
    assert visa.difference == pytest.approx(70.0 - 85.8) and visa.random_weights and "Table 1" in visa.source
    headct_b = table[(table.run == "b") & (table.dataset == "headct")].set_index("metric")
    assert headct_b.loc["image_auroc", "published"] == 91.4 and not headct_b.loc["image_auroc", "random_weights"]
    assert set(table.metric) <= {"image_auroc", "pixel_auroc"}          # only what both report
    md = analysis.reproduction_markdown(table)
    assert "70.0 †" in md and "random backbone weights" in md and "50.0 †" not in md


def test_summary_has_tables_figures_weights_and_versions(tmp_path):
    runs = _runs(tmp_path)
    (tmp_path / "a" / "figures").mkdir()
    fig = tmp_path / "a" / "figures" / "curves.png"
    fig.write_bytes(b"png")
    table = analysis.paper_table(runs.metrics)
    path = analysis.write_summary(tmp_path / "a" / "summary.md", runs, {"Metrics": table, "Note": "text"},
                                  {"Curves": fig})
    text = path.read_text()
    assert "## Metrics" in text and "**75.0**" in text and "## Note" in text
    assert "![Curves](figures/curves.png)" in text and "(figures/curves.pdf)" in text
    assert "random backbone weights" in text and "| torch " in text and "open_clip_torch" in text
    assert "| a " in text and "adaclip" in text and "clip" in text


def test_run_labels_and_missing_runs(tmp_path):
    runs = _runs(tmp_path)
    assert analysis.run_labels(runs) == {"a": "adaclip", "b": "clip"}
    with pytest.raises(FileNotFoundError, match="evaluate it first"):
        analysis.load_runs(tmp_path, ["nowhere"])
