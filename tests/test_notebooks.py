"""Notebooks: committed clean, parameters papermill can read, and the whole pipeline runs headless."""
import ast
import json
import re

import nbformat
import pandas as pd
import papermill as pm
import pytest
import yaml

from adaclip.data.registry import resolve_root
from adaclip.pipeline import NOTEBOOK_DIR, notebooks, run_pipeline

NOTEBOOKS = notebooks()


def test_numbered_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["00_data_prep.ipynb", "01_prompt_training.ipynb", "02_evaluation.ipynb",
                                           "03_analysis.ipynb", "04_explore.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_with_parameters(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs (make strip)"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    # every literal of the parameters cell must be visible to papermill (comments with '=' break it)
    assigned = [t.id for node in ast.parse(tagged[0].source).body for t in node.targets]
    assert list(pm.inspect_notebook(str(path))) == assigned


def figure_cells_without_a_figure(executed: dict) -> list[str]:
    """Code cells that save a figure (``viz.save``) but show none inline (no image/png output), unless
    they say why there is no figure ("no figure: ..."). A cell's first line names it."""
    missing = []
    for cell in executed["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] != "code" or "viz.save(" not in source:
            continue
        outputs = cell.get("outputs", [])
        shown = any("image/png" in o.get("data", {}) for o in outputs)
        explained = any("no figure:" in "".join(o.get("text", "")) for o in outputs)
        if not (shown or explained):
            missing.append(source.splitlines()[0])
    return missing


def png_widths(executed: dict, first_line: str) -> list[int]:
    """Pixel widths of the PNG outputs of the cell that starts with ``first_line``."""
    import base64
    import io

    from PIL import Image

    cell = next(c for c in executed["cells"] if "".join(c["source"]).startswith(first_line))
    return [Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"]))).width
            for o in cell["outputs"] if "image/png" in o.get("data", {})]


def text_outputs(executed: dict) -> list[tuple[str, str]]:
    """(kind, text) of every text output: "stdout" / "stderr" streams, "plain" text/plain, "error"."""
    found = []
    for cell in executed["cells"]:
        for o in cell.get("outputs", []):
            if o["output_type"] == "stream":
                found.append((o["name"], "".join(o["text"])))
            elif o["output_type"] == "error":
                found.append(("error", "\n".join(o["traceback"])))
            elif "text/plain" in o.get("data", {}):
                found.append(("plain", "".join(o["data"]["text/plain"])))
    return found


def check_first_contact(executed: dict, name: str) -> None:
    """What a new user sees of notebooks 02 and 04 on the random backbone: the warning once, in plain
    text (no stderr, no root logger's copy), no raw config repr."""
    from adaclip.viz import RANDOM_WEIGHTS

    texts = text_outputs(executed)
    assert sum(text.count(RANDOM_WEIGHTS) for _, text in texts) == 1, (name, texts)
    assert not [text for kind, text in texts if kind == "stderr" and "progress" not in text], name
    assert not any("BackboneCfg(" in text or "WARNING:root" in text for _, text in texts), name


@pytest.mark.slow
def test_pipeline_runs_headless(tmp_path, capfd):
    """`make run`: 00 -> 01 -> 02 -> 04 for AdaCLIP and 01 -> 02 for each baseline beside it (the chains
    two at a time), then 03 comparing them, each beside its own published numbers, on the embedded sample
    with the tiny random backbone; kernels on IPC sockets, so no kernel warning reaches the log. (Every
    method through `train` and `evaluate`: tests/test_method_contract.py.)"""
    from adaclip.pipeline import DEFAULT_BASELINES

    others = list(DEFAULT_BASELINES)
    params = {"epochs": 1}
    run_pipeline("smoke", params=params, results_dir=tmp_path, baselines=others, jobs=2)
    captured = capfd.readouterr()
    assert "WARNING" not in captured.err and "KeyboardInterrupt" not in captured.err + captured.out
    assert f"11 notebooks of {len(others) + 1} runs (smoke, smoke/baselines/" in captured.out, captured.out
    assert captured.out.count(" finished in ") == 5 + 2 * len(others)                 # a line per notebook
    run = tmp_path / "smoke"
    beside = [run / "baselines" / m / nb for m in others for nb in ("01_prompt_training.ipynb", "02_evaluation.ipynb")]
    for nb in [*NOTEBOOKS, *beside]:
        executed = json.loads((run / nb.name if nb in NOTEBOOKS else nb).read_text())
        assert not executed["metadata"]["papermill"]["exception"]
        assert all(c["metadata"]["papermill"]["status"] == "completed" for c in executed["cells"] if c["cell_type"] == "code")
        # every figure a cell saves is also shown where the user looks (inline in the executed copy)
        assert figure_cells_without_a_figure(executed) == [], nb.name
    analysed = json.loads((run / "03_analysis.ipynb").read_text())
    shown = sum("image/png" in o.get("data", {}) for c in analysed["cells"] for o in c.get("outputs", []))
    assert shown == len(list((run / "figures").glob("03_*.png")))                 # each saved figure, shown once
    explored = json.loads((run / "04_explore.ipynb").read_text())
    assert all(w >= 1000 for w in png_widths(explored, "fig = explorer.figure()"))  # fills a 1150 px output area
    # the executed copy shows the explorer's figure where its widgets cannot run, not "VBox(children=...)"
    assert [w >= 1000 for w in png_widths(explored, "explorer.widget()")] == [True]
    for name in ("02_evaluation.ipynb", "04_explore.ipynb"):
        check_first_contact(json.loads((run / name).read_text()), name)
    # 03's figures as wide as the output area (inline: 100 dpi): histograms a grid, not a 200 px strip
    for first_line in ("for run in R.configs:", "examples = analysis.qualitative_examples("):
        assert all(w >= 900 for w in png_widths(analysed, first_line)), first_line
    metrics = pd.read_csv(run / "metrics.csv")
    assert {"visa", "glass", "headct", "kvasir"} <= set(metrics.dataset)
    config = json.loads((run / "config.json").read_text())
    assert config["backbone_weights"] == "random" and config["train"]["epochs"] == 1
    for m in others:
        config = json.loads((run / "baselines" / m / "config.json").read_text())
        assert config["method"] == m and config["backbone_weights"] == "random"
    logs = {m: pd.read_csv(run / "baselines" / m / "train_log.csv") for m in others}
    assert len(logs["aprilgan"]) and len(pd.read_csv(run / "train_log.csv")) and not len(logs["winclip"])
    figures = {p.name for p in (run / "figures").iterdir()}
    assert {"00_samples.png", "01_loss.png", "02_metrics.png", "02_maps.png", "03_scores_adaclip.png",
            "03_scores_clip.pdf", "03_curves_visa.png", "03_qualitative.png", "04_explore.png",
            "04_explore_layers.png", "04_explore_smoothing.png", "04_explore_hsf.pdf",
            "03_forest_image_auroc.png", "03_forest_pixel_auroc.pdf"} <= figures      # AdaCLIP against its baselines
    # each run beside the published numbers of its own method, and only those
    comparison = pd.read_csv(run / "tables" / "comparison.csv")
    assert set(comparison.run_a) == {"adaclip"} and set(comparison.run_b) == set(others)
    repro = pd.read_csv(run / "tables" / "reproduction.csv")
    beside = repro.dropna(subset=["published"]).groupby("run").published_method.unique()
    for m, published in (("aprilgan", "APRIL-GAN"), ("winclip", "WinCLIP")):
        assert set(beside[f"smoke/baselines/{m}"]) == {published}, m
    assert set(beside["smoke"]) == {"AdaCLIP"}
    alone = repro[repro.published.isna()].set_index("run").note
    assert "no published numbers for method 'clip'" in alone["smoke/baselines/clip"]
    summary = (run / "summary.md").read_text()
    assert re.search(r"\|\s+mean\s+\|\s+I-AUROC\s+\|", summary)           # the narrow metrics table
    for m in ("adaclip", *others):                   # every run in the narrow table and the mean over datasets
        assert re.search(rf"\|\s+{m} \[[^]]+\]\s+\|\s+\**\d", summary), m      # its row: value [lo, hi]
    assert re.search(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", summary) and "Paired comparisons" in summary
    assert "random backbone weights" in summary and "APRIL-GAN · " in summary and "WinCLIP · " in summary
    assert "](figures/03_curves_visa.png)" in summary and "open_clip_torch" in summary
    # run again: finished notebooks are skipped, so a killed pipeline resumes where it stopped
    before = (run / "02_evaluation.ipynb").stat().st_mtime_ns
    run_pipeline("smoke", params=params, results_dir=tmp_path, baselines=others, notebooks_to_run=["01", "02"])
    assert (run / "02_evaluation.ipynb").stat().st_mtime_ns == before
    # changed parameters rerun the notebooks that take them
    run_pipeline("smoke", params={**params, "n_examples": 1}, results_dir=tmp_path, baselines=(), notebooks_to_run=["02"])
    assert (run / "02_evaluation.ipynb").stat().st_mtime_ns != before


@pytest.mark.slow
@pytest.mark.skipif(not resolve_root("shared").is_dir(), reason="../shared/datasets not present")
def test_pipeline_on_the_shared_subsets(tmp_path):
    """Train on the shared MVTec AD subsets, evaluate on VisA, GLASS, HeadCT and Kvasir (random weights):
    notebooks 00-02 on the real files (03 and 04 read only the run, as on the sample)."""
    params = yaml.safe_load((NOTEBOOK_DIR / "params" / "shared.yaml").read_text())
    run_pipeline("shared", params=params, results_dir=tmp_path, baselines=(), notebooks_to_run=["00", "01", "02"])
    metrics = pd.read_csv(tmp_path / "shared" / "metrics.csv").set_index(["dataset", "category"])
    assert {("visa", "capsules"), ("visa", "macaroni1"), ("glass", "glass"), ("headct", "headct"),
            ("kvasir", "kvasir")} <= set(metrics.index)
    assert metrics.loc[("headct", "headct"), "pixel_auroc"] != metrics.loc[("headct", "headct"), "pixel_auroc"]  # NaN
    assert metrics.loc[("visa", "capsules"), "images"] == 160


def test_misspelt_parameter_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"no notebook takes parameter\(s\) \['epoch'\]"):
        run_pipeline("typo", params={"epoch": 5}, results_dir=tmp_path)


@pytest.mark.parametrize("name", ["paper.yaml", "shared.yaml"])
def test_params_files_only_name_real_parameters(name):
    params = yaml.safe_load((NOTEBOOK_DIR / "params" / name).read_text())
    known = set().union(*(pm.inspect_notebook(str(nb)) for nb in NOTEBOOKS))
    assert set(params) <= known


def test_a_notebook_whose_kernel_died_is_not_finished(tmp_path):
    """papermill marks the cells after a dead kernel "completed" without a start time and records no
    exception; resuming must run such a notebook again."""
    from adaclip.pipeline import finished

    def executed(started: list) -> dict:
        cell = lambda s: {"cell_type": "code", "source": "", "metadata": {"papermill": {  # noqa: E731
            "status": "completed", "start_time": "2026-12-02T00:27:06" if s else None, "exception": False if s else None}}}
        return {"metadata": {"papermill": {"exception": None, "parameters": {"run_name": "r"}}},
                "cells": [cell(s) for s in started]}

    path = tmp_path / "04_explore.ipynb"
    path.write_text(json.dumps(executed([True, True, True])))
    assert finished(path, {"run_name": "r"})
    path.write_text(json.dumps(executed([True, True, False, False])))
    assert not finished(path, {"run_name": "r"})
