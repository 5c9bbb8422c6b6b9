"""Every figure function: arrays and tables in, a labelled Figure out; saved as PNG and PDF."""
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from adaclip import viz
from adaclip.evaluate import pixel_curves
from adaclip.metrics import PixelAccumulator


def _scores(run, shift, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    return pd.DataFrame({"run": run, "dataset": "visa", "category": "capsules", "image": [f"{i}.png" for i in range(40)],
                         "label": labels, "score": np.clip(rng.random(40) * 0.7 + shift * labels, 0, 1)})


def _curves(run, seed):
    rng = np.random.default_rng(seed)
    acc = {}
    for cat in ("capsules", "macaroni1"):
        a = PixelAccumulator(bins=4096)
        for _ in range(3):
            m = np.zeros((16, 16), int)
            m[4:9, 5:11] = 1
            a.update(np.clip(rng.random((16, 16)) * 0.6 + 0.4 * m, 0, 1), m)
        acc[("visa", cat)] = a
    return pixel_curves(acc).assign(run=run), acc


def _labelled(fig: Figure):
    for ax in fig.axes:
        if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>":
            assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


def test_curves_image_from_scores_pixel_from_histograms():
    scores = pd.concat([_scores("adaclip", 0.3), _scores("clip", 0.1, 1)])
    (a, acc_a), (b, _) = _curves("adaclip", 0), _curves("clip", 1)
    fig = viz.curves(scores, pd.concat([a, b]), "visa", by="run", title="t")
    _labelled(fig)
    pixel_roc = fig.axes[2]
    pooled = PixelAccumulator.merged(list(acc_a.values()))
    line = pixel_roc.lines[0]
    points = pooled.curve()
    np.testing.assert_allclose(line.get_xdata(), np.r_[0, points["fpr"]])       # the histograms' own points
    np.testing.assert_allclose(line.get_ydata(), np.r_[0, points["tpr"]])
    label = pixel_roc.get_legend().get_texts()[0].get_text()
    assert label.startswith("adaclip (") and float(label[9:-1]) == pytest.approx(
        pooled.compute()[0]["pixel_auroc"], abs=1.5e-3)
    assert len(fig.axes[0].lines) == 3                                            # two runs + chance line


def test_pixel_curves_pool_categories_and_keep_the_area():
    curves, acc = _curves("r", 0)
    assert set(curves.category) == {"capsules", "macaroni1", "all"}
    exact = acc[("visa", "capsules")]
    full = exact.curve(max_points=10 ** 6)                                      # every threshold kept
    assert np.trapezoid(np.r_[0, full["tpr"]], np.r_[0, full["fpr"]]) == pytest.approx(
        exact.compute()[0]["pixel_auroc"], abs=1e-12)
    one = curves[curves.category == "capsules"]                                  # thinned, as written
    assert np.trapezoid(np.r_[0, one.tpr], np.r_[0, one.fpr]) == pytest.approx(exact.compute()[0]["pixel_auroc"], abs=1e-3)
    assert (np.diff(one.fpr) >= 0).all() and one.tpr.iloc[-1] == 1.0 and one.fpr.iloc[-1] == 1.0
    thin = exact.curve(max_points=20)
    assert len(thin["fpr"]) <= 22 and thin["tpr"][-1] == 1.0


def test_every_figure_function(tmp_path):
    scores = _scores("adaclip", 0.3)
    sweep = pd.DataFrame({"config_id": ["prompt_type=S", "prompt_type=SD", "prompt_type=S", "prompt_type=SD"],
                          "prompt_type": ["S", "SD", "S", "SD"], "dataset": ["visa", "visa", "mvtec", "mvtec"],
                          "pixel_auroc": [0.8, 0.9, 0.7, 0.85]})
    bars = viz.ablation_bars(sweep, "prompt_type", "pixel_auroc", baseline=0.6, baseline_label="clip")
    assert any(line.get_linestyle() == "--" and line.get_ydata()[0] == pytest.approx(60.0) for line in bars.axes[0].lines)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (20, 30, 3), dtype=np.uint8) for _ in range(2)]
    masks = [np.eye(20, 30), None]
    grid = viz.qualitative_grid(images, masks, {"adaclip": [rng.random((20, 30))] * 2, "clip": [rng.random((20, 30))] * 2},
                                ["a", "b"])
    assert len([ax for ax in grid.axes if ax.get_label() == "<colorbar>"]) == 1
    assert [ax.get_title() for ax in grid.axes[:4]] == ["a", "ground truth", "adaclip", "clip"]
    log = pd.DataFrame({"epoch": [1, 1, 2, 2], "step": [1, 2, 3, 4], "loss": [1.0, 0.8, 0.6, 0.5]})
    figures = {
        "scores": viz.score_distributions(scores),
        "bars": bars,
        "loss": viz.loss_curves({"a": log, "b": log.assign(loss=log.loss * 2), "clip": log.iloc[:0]}),
        "curves": viz.curves(scores, pd.DataFrame(columns=["dataset", "category", "fpr", "tpr", "precision", "run"]),
                             "visa"),
    }
    for name, fig in figures.items():
        _labelled(fig)
        png = viz.save(fig, tmp_path / f"{name}.png")
        assert png.is_file() and png.with_suffix(".pdf").is_file() and png.with_suffix(".pdf").stat().st_size > 0
    viz.save(grid, tmp_path / "grid.png")
    assert (tmp_path / "grid.pdf").is_file()
    assert figures["curves"].axes[2].texts[0].get_text() == "no pixel masks"
    assert len(figures["loss"].axes[0].lines) == 2                              # the training-free run has none


def test_undefined_metrics_read_na_not_zero():
    """A NaN metric is "n/a" text at its bar's place, never a missing bar that reads as 0."""
    nan = float("nan")
    metrics = pd.DataFrame({"dataset": ["visa", "headct", "kvasir", "visa"],
                            "category": ["capsules", "headct", "kvasir", "mean"],
                            "image_auroc": [0.6, 0.9, nan, 0.6], "pixel_auroc": [0.7, nan, 0.3, 0.7],
                            "pixel_aupro": [0.4, nan, 0.1, 0.4]})
    ax = viz.metrics_plot(metrics).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["visa/capsules", "headct", "kvasir"]   # not "headct/headct"
    na = [t for t in ax.texts if t.get_text() == viz.NA]
    assert len(na) == 3
    bars = {round(b.get_x() + b.get_width() / 2, 6): b.get_height() for b in ax.patches}
    assert all(bars[round(t.get_position()[0], 6)] == 0 for t in na)             # each at a bar of its own
    sweep = pd.DataFrame({"prompt_type": ["S", "SD", "S", "SD"], "dataset": ["visa", "visa", "headct", "headct"],
                          "pixel_auroc": [0.8, 0.9, nan, nan]})
    bars = viz.ablation_bars(sweep, "prompt_type", "pixel_auroc", baseline=0.6)
    assert [t.get_text() for t in bars.axes[0].texts].count(viz.NA) == 2


def test_notebook_figures_fill_the_output_width():
    """Notebook 03's figures at the inline backend's 100 dpi: score histograms a grid ~1000 px wide (a
    single row of four was 715 x 204 px), map thumbnails >= 145 px (were 65), legends >= 8 pt beside
    the axes (the loss legend was 6 pt, over the curves)."""
    scores = pd.concat([_scores("adaclip", 0.3).assign(dataset=d) for d in ("visa", "glass", "headct", "kvasir")])
    fig = viz.score_distributions(scores, title="t")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 4 and len({round(ax.get_position().y0, 3) for ax in shown}) == 2          # 2 x 2
    width, height = fig.get_size_inches() * 100
    assert 900 <= width <= 1050 and height >= 450
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)]
    maps = {m: [rng.random((40, 60)), rng.random((50, 50))] for m in ("adaclip", "aprilgan", "winclip", "clip")}
    fig = viz.qualitative_grid(images, [None, None], maps, ["a", "b"], title="t")
    fig.set_dpi(100)
    fig.canvas.draw()
    thumbs = [ax.get_window_extent().width for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(thumbs) == 12 and min(thumbs) >= 145 and fig.get_size_inches()[0] * 100 <= 1050
    log = pd.DataFrame({"epoch": [1, 1, 2, 2], "step": [1, 2, 3, 4], "loss": [1.0, 0.8, 0.6, 0.5]})
    fig = viz.loss_curves({f"run {i}": log for i in range(4)})
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 8
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1                 # beside the axes, not over them


def test_a_backend_loading_inside_the_paper_style_keeps_interactive_mode():
    """Jupyter's inline backend loads with a kernel's first figure and switches interactive mode on as it
    loads; if that happens inside the style's rc_context, restoring the rc must not switch it off again
    (later figures would not show inline)."""
    import matplotlib

    was = matplotlib.is_interactive()
    try:
        matplotlib.interactive(False)
        with viz.paper_style():
            matplotlib.interactive(True)                     # the backend loading
            assert matplotlib.rcParams["font.size"] == viz.PAPER_STYLE["font.size"]
        assert matplotlib.is_interactive() and matplotlib.rcParams["font.size"] != viz.PAPER_STYLE["font.size"]
        with viz.paper_style():
            pass
        assert matplotlib.is_interactive()
        matplotlib.interactive(False)
        with pytest.raises(RuntimeError), viz.paper_style():
            matplotlib.interactive(True)
            raise RuntimeError("a figure that fails")
        assert matplotlib.is_interactive()
    finally:
        matplotlib.interactive(was)


def test_forest_plot_draws_each_run_minus_the_reference_filled_where_the_interval_excludes_zero():
    comparison = pd.DataFrame({
        "run_a": "adaclip", "run_b": ["clip", "clip"], "dataset": ["visa", "mean"], "metric": "image_auroc",
        # compare's rows are reference - run: clip is 10 points worse on visa (clear), 1 point better overall
        "difference": [0.10, -0.01], "difference_lo": [0.05, -0.04], "difference_hi": [0.15, 0.02]})
    fig = viz.forest_plot(comparison, "image_auroc")
    ax = fig.axes[0]
    filled, open_ = [line for line in ax.lines if line.get_marker() == "o"][:2]
    assert list(filled.get_xdata()) == pytest.approx([-10.0]) and list(open_.get_xdata()) == pytest.approx([1.0])
    assert open_.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))
    bars = ax.collections[0].get_segments()                       # the intervals, run - reference
    assert [tuple(np.round(s[:, 0], 6)) for s in bars] == [(-15.0, -5.0), (-2.0, 4.0)]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["visa", "mean"]
    import matplotlib.pyplot as plt
    plt.close(fig)
