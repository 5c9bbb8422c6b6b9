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


def _runs(tmp_path, weights=("random", "openai"), methods=("adaclip", "clip"), trained=("mvtec+colondb", "")) \
        -> analysis.Runs:
    """Run a (adaclip by default) evaluated on VisA (two categories) and HeadCT, run b (clip) too; each
    metrics.csv ends with evaluation's overall "all" row, which is no dataset."""
    a = _metrics("a", {("visa", "capsules"): {"image_auroc": 0.8, "pixel_auroc": 0.90},
                       ("visa", "macaroni1"): {"image_auroc": 0.6, "pixel_auroc": 0.70},
                       ("visa", "mean"): {"image_auroc": 0.7, "pixel_auroc": 0.80, "pixel_aupro_cflow": 0.6},
                       ("headct", "headct"): {"image_auroc": 0.9},
                       ("all", "mean"): {"image_auroc": 0.77, "pixel_auroc": 0.8}})
    b = _metrics("b", {("visa", "mean"): {"image_auroc": 0.75, "pixel_auroc": 0.7},
                       ("headct", "headct"): {"image_auroc": 0.5},
                       ("all", "mean"): {"image_auroc": 0.6, "pixel_auroc": 0.7}})
    for name, m, w, method, t in (("a", a, weights[0], methods[0], trained[0]), ("b", b, weights[1], methods[1], trained[1])):
        (tmp_path / name).mkdir()
        m.drop(columns="run").to_csv(tmp_path / name / "metrics.csv", index=False)
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"backbone_weights": w, "model": {"method": method, "backbone": {"quick_gelu": method == "clip"}},
             "trained_on": t}))
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
    # the narrow layout (a row per dataset and metric, a column per run): the best of each row
    long = analysis.long_table(table)
    assert long.index.tolist() == [("visa", "I-AUROC"), ("visa", "P-AUROC"), ("headct", "I-AUROC"),
                                   ("mean", "I-AUROC"), ("mean", "P-AUROC")]                 # headct has no P-AUROC
    assert long.columns.tolist() == ["a", "b"] and long.loc[("visa", "I-AUROC"), "b"] == pytest.approx(75.0)
    assert analysis.best_cells(long, by="row").loc[("visa", "P-AUROC")].tolist() == [True, False]
    md = analysis.to_markdown(long, by="row").splitlines()
    assert [c.strip() for c in md[0].split("|")[1:3]] == ["dataset", "metric"] and "| **75.0** |" in md[2]


def test_published_numbers_ship_with_the_package():
    published = analysis.published_results()
    assert {"method", "dataset", "trained_on", "source", *METRIC_KEYS} <= set(published.columns)
    assert len(published) == 162 and published.source.notna().all() and (published.source != "").all()
    row = published[(published.method == "AdaCLIP") & (published.dataset == "visa")].iloc[0]
    assert row.image_auroc == 85.8 and row.pixel_auroc == 95.5 and "Table 1" in row.source
    # AA-CLIP's source text holds quoted commas: they stay in the source, not in other columns
    aaclip = published[(published.method == "AA-CLIP") & (published.dataset == "mvtec")].iloc[0]
    assert aaclip.image_auroc == 90.47 and aaclip.source.endswith("epoch 15; a re-run log, not the paper)")
    # every published AUPRO is the cflow variant: filed under pixel_aupro_cflow, never pixel_aupro
    crane = published[(published.method == "AdaCLIP") & published.source.str.startswith("Crane")]
    assert crane.set_index("dataset").loc["visa", "pixel_aupro_cflow"] == 72.9
    assert published.pixel_aupro.isna().all()
    glocal = published[published.method == "GlocalCLIP"].set_index("dataset")
    assert len(glocal) == 15 and glocal.loc["mvtec", "pixel_aupro_cflow"] == 82.8
    assert glocal.loc["mvtec", "trained_on"] == "visa" and (published.trained_on.map(type) == str).all()
    # the plain reader agrees: nothing is hidden in extra fields
    plain = pd.read_csv(analysis.PUBLISHED)
    assert plain.shape == (162, 11) and plain.image_auroc.equals(published.image_auroc)
    if SHARED_PUBLISHED.is_file():
        assert analysis.PUBLISHED.read_text() == SHARED_PUBLISHED.read_text()


def test_published_file_with_a_short_line_is_named(tmp_path):
    bad = tmp_path / "results.csv"
    bad.write_text(analysis.PUBLISHED.read_text().splitlines()[0] + "\nAdaCLIP,visa,mvtec,85.8\n")
    with pytest.raises(ValueError, match=r"results.csv: line\(s\) \[2\]"):
        analysis.published_results(bad)
    header = analysis.PUBLISHED.read_text().splitlines()[0]
    bad.write_text(header + "\nAdaCLIP,visa,mvtec,85.8,,,,,,,a source, with an unquoted comma\n")
    with pytest.raises(ValueError, match=r"line\(s\) \[2\] do not have the header's 11 fields \(quote"):
        analysis.published_results(bad)


def test_reproduction_table_pairs_each_run_with_its_own_method(tmp_path):
    runs = _runs(tmp_path)
    table = analysis.reproduction_table(runs)
    a = table[table.run == "a"]
    visa = a[(a.dataset == "visa") & (a.metric == "image_auroc")].set_index("source")
    assert len(visa) == 2 and set(visa.published_method) == {"AdaCLIP"}         # every source of AdaCLIP's row
    paper = visa.loc[[s for s in visa.index if s.startswith("AdaCLIP paper")][0]]
    assert paper.ours == pytest.approx(70.0) and paper.published == 85.8
    assert paper.difference == pytest.approx(70.0 - 85.8) and paper.random_weights and paper.same_training
    # AUPRO pairs by variant: Crane's cflow cell with ours in pixel_aupro_cflow
    cflow = a[(a.dataset == "visa") & (a.metric == "pixel_aupro_cflow")].iloc[0]
    assert cflow.ours == pytest.approx(60.0) and cflow.published == 72.9 and cflow.source.startswith("Crane")
    assert not (a.metric == "pixel_aupro").any()
    # the clip baseline has no published numbers of its own: it says so, it is not set beside AdaCLIP's
    b = table[table.run == "b"]
    assert len(b) == 1 and b.published.isna().all() and "no published numbers for method 'clip'" in b.note.iloc[0]
    assert "all" not in set(table.dataset.dropna())                           # the overall row is no dataset
    md = analysis.reproduction_markdown(table)
    assert "70.0 †" in md and "random backbone weights" in md and "AUPRO (cflow)" in md
    assert "`b` (clip): no published numbers for method 'clip'" in md


def test_reproduction_table_marks_other_training_data(tmp_path):
    runs = _runs(tmp_path, weights=("openai", "openai"), methods=("adaclip", "adaclip"), trained=("visa", "mvtec+colondb"))
    table = analysis.reproduction_table(runs)
    visa = table[(table.dataset == "visa") & (table.metric == "image_auroc")].set_index("run")
    assert (visa.loc["a", "trained_on_ours"] == "visa").all() and (visa.loc["a", "trained_on_published"] == "mvtec+colondb").all()
    assert not visa.loc["a", "same_training"].any() and visa.loc["b", "same_training"].all()
    md = analysis.reproduction_markdown(table)
    assert "visa / mvtec+colondb ≠" in md and "mvtec+colondb / mvtec+colondb ≠" not in md and "not like with like" in md
    assert "†" not in md


def test_paper_table_sets_each_run_beside_its_own_published_columns(tmp_path):
    runs = _runs(tmp_path)
    info = analysis.run_info(runs)
    table = analysis.paper_table(runs.metrics, published=analysis.published_results(), info=info,
                                 metrics_shown=["image_auroc", "pixel_aupro_cflow"])
    assert list(table.index) == ["visa", "headct", "mean"]                    # no "all" row as a dataset
    columns = list(table.columns)
    assert columns[:3] == [("image_auroc", "a [mvtec+colondb]"), ("image_auroc", "AdaCLIP · AdaCLIP paper [mvtec+colondb]"),
                           ("image_auroc", "AdaCLIP · Crane [mvtec+colondb]")]
    assert columns[3] == ("image_auroc", "b [none (training-free)]")          # clip: no published columns
    assert not any("b" == c[1].split(" ")[0] and "·" in c[1] for c in columns)
    assert table.loc["visa", ("image_auroc", "AdaCLIP · AdaCLIP paper [mvtec+colondb]")] == 85.8
    # a published mean only over the datasets the run's mean averages: both here
    assert table.loc["mean", ("image_auroc", "AdaCLIP · AdaCLIP paper [mvtec+colondb]")] == pytest.approx((85.8 + 91.4) / 2)
    assert ("pixel_aupro_cflow", "AdaCLIP · Crane [mvtec+colondb]") in columns
    # other training data than the published model's: the column is marked
    other = analysis.load_runs(tmp_path, ["a"])
    other.configs["a"]["trained_on"] = "visa"
    marked = analysis.paper_table(other.metrics, published=analysis.published_results(), info=analysis.run_info(other),
                                  metrics_shown=["image_auroc"])
    assert ("image_auroc", "AdaCLIP · AdaCLIP paper [mvtec+colondb] ≠") in list(marked.columns)
    md = analysis.to_markdown(table)
    assert "—" in md and "nan" not in md.lower()                              # undefined reads — everywhere


def test_a_published_mean_over_fewer_datasets_is_not_set_beside_ours(tmp_path):
    """The run averages VisA and GLASS; the papers report VisA only: their mean would average other
    datasets than ours, so it is left blank (the VisA cell itself stays)."""
    (tmp_path / "a").mkdir()
    _metrics("a", {("visa", "mean"): {"image_auroc": 0.7}, ("glass", "glass"): {"image_auroc": 0.9}}).drop(
        columns="run").to_csv(tmp_path / "a" / "metrics.csv", index=False)
    (tmp_path / "a" / "config.json").write_text(json.dumps(
        {"backbone_weights": "random", "model": {"method": "adaclip", "backbone": {}}, "trained_on": "mvtec+colondb"}))
    runs = analysis.load_runs(tmp_path, ["a"])
    table = analysis.paper_table(runs.metrics, published=analysis.published_results(), info=analysis.run_info(runs),
                                 metrics_shown=["image_auroc"])
    paper = ("image_auroc", "AdaCLIP · AdaCLIP paper [mvtec+colondb]")
    assert table.loc["visa", paper] == 85.8 and np.isnan(table.loc["glass", paper])
    assert np.isnan(table.loc["mean", paper]) and table.loc["mean", ("image_auroc", "a [mvtec+colondb]")] == pytest.approx(80)


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
    runs_table = text.split("## Runs")[1].split("##")[0]
    assert "QuickGELU" in runs_table and "| GELU" in runs_table and "none (training-free)" in runs_table
    b_row = next(line for line in runs_table.splitlines() if line.startswith("| b "))
    assert b_row.count("—") == 2                                    # training-free: no epochs, no selected epoch


def test_run_labels_and_missing_runs(tmp_path):
    runs = _runs(tmp_path)
    assert analysis.run_labels(runs) == {"a": "adaclip", "b": "clip"}
    with pytest.raises(FileNotFoundError, match="evaluate it first"):
        analysis.load_runs(tmp_path, ["nowhere"])


def test_a_run_is_compared_with_the_baselines_beside_it(tmp_path):
    """Notebook 03 opened on its own (runs=None) compares what the pipeline compares: the run and
    every evaluated baseline in results/<run>/baselines/."""
    for folder in ("r", "r/baselines/clip", "r/baselines/winclip", "r/baselines/linear"):
        (tmp_path / folder).mkdir(parents=True)
    for folder in ("r", "r/baselines/clip", "r/baselines/winclip"):
        (tmp_path / folder / "metrics.csv").write_text("dataset\n")
    assert analysis.run_with_baselines(tmp_path, "r") == ["r", "r/baselines/clip", "r/baselines/winclip"]
    assert analysis.run_with_baselines(tmp_path, "elsewhere") == ["elsewhere"]


def _interval_run(folder, values: dict, spread: dict, seed: int, images=("x.png", "y.png")):
    """A run folder with one category and chosen bootstrap deviations (normal, sd ``spread``)."""
    from adaclip import bootstrap
    from adaclip.metric_keys import METRIC_KEYS

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    row = {"dataset": "d", "category": "c", "images": 2, "anomalous": 1}
    table = np.full((1, len(METRIC_KEYS), 400), np.nan)
    for j, m in enumerate(METRIC_KEYS):
        row[m] = values.get(m, np.nan)
        if m in values:
            table[0, j] = rng.normal(0, spread[m], 400)
            row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap.interval(values[m], table[0, j])
    pd.DataFrame([row]).to_csv(folder / "metrics.csv", index=False)
    pd.DataFrame({"dataset": "d", "category": "c", "image": list(images), "label": [0, 1],
                  "score": [0.1, 0.9]}).to_csv(folder / "scores.csv", index=False)
    (folder / "config.json").write_text(json.dumps({"method": "clip"}))
    bootstrap.save(folder / bootstrap.FILE, [("d", "c")], table, 400, 0)


def test_tables_show_intervals_and_bold_only_a_significant_best(tmp_path):
    """A clear lead (20 points, intervals of about 3) is bold; a one-point lead within noise is a tie
    (≈ on both); each number carries its interval; a run on other images is never paired."""
    values_a = {"image_auroc": 0.90, "pixel_auroc": 0.80}
    values_b = {"image_auroc": 0.70, "pixel_auroc": 0.79}
    spread = {"image_auroc": 0.01, "pixel_auroc": 0.05}
    _interval_run(tmp_path / "A", values_a, spread, 1)
    _interval_run(tmp_path / "B", values_b, spread, 2)
    R = analysis.load_runs(tmp_path, ["A", "B"])
    main = analysis.paper_table(R.metrics, columns="run")
    iv = analysis.table_intervals(R, main)
    assert iv.marks.loc["d", ("image_auroc", "A")] == "best" and iv.marks.loc["d", ("image_auroc", "B")] == ""
    assert iv.marks.loc["d", ("pixel_auroc", "A")] == "tie" and iv.marks.loc["d", ("pixel_auroc", "B")] == "tie"
    lo, hi = iv.lo.loc["d", ("image_auroc", "A")], iv.hi.loc["d", ("image_auroc", "A")]
    assert lo < 90 < hi and hi - lo == pytest.approx(2 * 1.96, abs=0.8)
    text = analysis.to_markdown(analysis.long_table(main), by="row", intervals=iv.long(main))
    assert f"**90.0 [{lo:.1f}, {hi:.1f}]**" in text and "70.0 [" in text and "80.0 [" in text and "≈" in text
    assert "**80.0" not in text                                     # a tie is never bold
    paired = analysis.compare("A", "B", tmp_path, ["image_auroc"]).set_index("dataset")
    assert paired.loc["d", "difference"] == pytest.approx(0.2) and paired.loc["d", "p_value"] < 0.01
    # the same run against a run on other images: no claim either way
    _interval_run(tmp_path / "C", values_b, spread, 3, images=("x.png", "z.png"))
    R = analysis.load_runs(tmp_path, ["A", "C"])
    assert (analysis.table_intervals(R, analysis.paper_table(R.metrics, columns="run")).marks == "").all().all()


def test_reproduction_says_whether_the_published_number_is_inside_our_interval(tmp_path):
    _interval_run(tmp_path / "A", {"image_auroc": 0.90}, {"image_auroc": 0.01}, 1)
    config = {"method": "adaclip", "published_name": "AdaCLIP", "trained_on": "mvtec+colondb"}
    (tmp_path / "A" / "config.json").write_text(json.dumps(config))
    published = pd.DataFrame([{"method": "AdaCLIP", "dataset": "d", "trained_on": "mvtec+colondb", "source": "p1",
                               "image_auroc": 90.5}, {"method": "AdaCLIP", "dataset": "d",
                                                      "trained_on": "mvtec+colondb", "source": "p2", "image_auroc": 95.0}])
    table = analysis.reproduction_table(analysis.load_runs(tmp_path, ["A"]), published, ["image_auroc"])
    assert list(table.inside) == [True, False]
    assert (table.ours_lo < 90).all() and (table.ours_hi > 90).all()
    text = analysis.reproduction_markdown(table)
    assert "inside ours" in text and "| yes " in text and "| no " in text


def test_metrics_view_shows_intervals_and_says_each_note_once():
    rows = pd.DataFrame([
        {"dataset": "visa", "category": "a", "images": 4, "anomalous": 2, "image_auroc": 0.5, "image_auroc_lo": 0.25,
         "image_auroc_hi": 0.75, "note": ""},
        {"dataset": "visa", "category": "b", "images": 2, "anomalous": 2, "image_auroc": np.nan,
         "note": "image metrics undefined: only anomalous images"},
        {"dataset": "visa", "category": "mean", "images": 6, "anomalous": 4, "image_auroc": 0.5, "image_auroc_lo": 0.25,
         "image_auroc_hi": 0.75, "note": "unweighted mean over categories; undefined values left out"},
        {"dataset": "all", "category": "mean", "images": 6, "anomalous": 4, "image_auroc": 0.5,
         "note": "unweighted mean over all categories; undefined values left out"}])
    view = analysis.metrics_view(rows)
    caption = view.caption
    for phrase in ("undefined values left out", "only anomalous images", "unweighted"):
        assert caption.count(phrase) == 1, (phrase, caption)
    assert "95% bootstrap interval" in caption
    assert list(view.data["I-AUROC"]) == ["50.0 [25.0, 75.0]", "—", "50.0 [25.0, 75.0]", "50.0"]
