"""Sweeps: grids and lists of configurations, run through papermill, skipped when done, failures
recorded, unknown parameters refused before anything runs; then the analysis notebook over them."""
import json

import pandas as pd
import pytest

from adaclip import pipeline
from adaclip.metrics import METRIC_KEYS
from adaclip.pipeline import NOTEBOOK_DIR, run_pipeline
from adaclip.sweep import config_id, expand, run_sweep

TINY = NOTEBOOK_DIR / "params" / "ablations_tiny.yaml"


def test_grids_lists_and_ids():
    spec = {"base": {"epochs": 1, "prompt_type": "SD", "use_hsf": True},
            "grid": [{"prompt_type": ["S", "SD"]}, {"use_hsf": [True, False]}],
            "configs": [{"method": "clip"}, {"prompt_type": "SD"}]}
    configs = expand(spec)
    # the base setting appears once, under its first id; the explicit duplicate is dropped
    assert [c.id for c in configs] == ["prompt_type=S", "prompt_type=SD", "use_hsf=False", "method=clip"]
    assert configs[0].params == {"epochs": 1, "prompt_type": "S", "use_hsf": True}
    product = expand({"grid": {"prompt_type": ["S", "D"], "prompt_depth": [1, 2]}})
    assert [c.id for c in product] == ["prompt_type=S,prompt_depth=1", "prompt_type=S,prompt_depth=2",
                                       "prompt_type=D,prompt_depth=1", "prompt_type=D,prompt_depth=2"]
    assert expand({"base": {"epochs": 1}})[0].id == "base"
    assert config_id({"test_manifests": ["a/b.csv"]}) == 'test_manifests=["a_b.csv"]'
    with pytest.raises(ValueError, match="unknown key"):
        expand({"grids": {}})
    with pytest.raises(ValueError, match="lists of values"):
        expand({"grid": {"prompt_type": "S"}})


def test_a_seed_axis_repeats_every_configuration_per_training_seed():
    configs = expand({"base": {"epochs": 1}, "grid": {"prompt_type": ["S", "D"]}, "seeds": [0, 7]})
    assert [c.id for c in configs] == ["prompt_type=S,seed=0", "prompt_type=S,seed=7", "prompt_type=D,seed=0",
                                       "prompt_type=D,seed=7"]
    assert [c.group for c in configs] == ["prompt_type=S"] * 2 + ["prompt_type=D"] * 2
    assert configs[1].params == {"epochs": 1, "prompt_type": "S", "seed": 7}
    assert [c.id for c in expand({"base": {"epochs": 1}, "seeds": [3]})] == ["seed=3"]
    assert expand({"grid": {"prompt_type": ["S"]}})[0].group == "prompt_type=S"      # no axis: the id
    for bad in ([], [1, 1], ["a"], 3, [True]):
        with pytest.raises(ValueError, match="seeds must be a list of distinct integers"):
            expand({"seeds": bad})
    with pytest.raises(ValueError, match="seed axis"):
        expand({"configs": [{"seed": 1}], "seeds": [0, 1]})


def test_seed_summary_keeps_the_seeds_spread_apart_from_the_bootstrap_interval():
    from adaclip.analysis import seed_summary, swept_parameters

    rows = []
    for group, values in (("a", [0.80, 0.84, 0.86]), ("b", [0.70])):
        for seed, v in enumerate(values):
            rows.append({"config_id": f"{group},seed={seed}", "group": group, "status": "done", "seed": seed,
                         "prompt_type": group, "dataset": "visa", "category": "candle", "image_auroc": v,
                         "image_auroc_lo": v - 0.05, "image_auroc_hi": v + 0.03})
    table = pd.DataFrame(rows)
    summary = seed_summary(table, ["image_auroc"])
    a = summary[summary.group == "a"].iloc[0]
    assert a.seeds == 3 and a["mean"] == pytest.approx(250 / 3) and a.std_across_seeds == pytest.approx(
        pd.Series([80.0, 84.0, 86.0]).std())
    assert a.bootstrap_half_width == pytest.approx(4.0)
    b = summary[summary.group == "b"].iloc[0]
    assert b.seeds == 1 and pd.isna(b.std_across_seeds)
    # the seed is an axis of its own, not an ablation parameter; intervals are no parameters either
    assert swept_parameters(table) == ["prompt_type"]


def test_unknown_parameter_stops_the_sweep_before_anything_runs(tmp_path):
    spec = {"grid": [{"prompt_type": ["S", "D"]}, {"prompt_tpye": ["S"]}]}
    with pytest.raises(ValueError, match=r"no notebook takes parameter\(s\) \['prompt_tpye'\]"):
        run_sweep(spec, "typo", results_dir=tmp_path)
    assert not (tmp_path / "typo").exists()


def test_shipped_sweeps_name_real_parameters():
    import papermill as pm
    from adaclip.pipeline import notebooks
    known = set().union(*(pm.inspect_notebook(str(nb)) for nb in notebooks()))
    for name in ("ablations.yaml", "ablations_tiny.yaml", "methods.yaml", "methods_tiny.yaml"):
        for c in expand(NOTEBOOK_DIR / "params" / name):
            assert set(c.params) <= known, (name, c.id)
    axes = {k for c in expand(NOTEBOOK_DIR / "params" / "ablations.yaml") for k in c.overrides}
    assert axes == {"prompt_type", "prompt_branch", "prompt_depth", "prompt_length", "use_hsf", "quick_gelu", "method"}
    # every registered method is in both methods sweeps (CI runs each method through the notebooks in
    # test_notebooks.py's pipeline, the same tiny setting as methods_tiny.yaml)
    from adaclip import methods
    for name in ("methods.yaml", "methods_tiny.yaml"):
        assert {c.params.get("method") for c in expand(NOTEBOOK_DIR / "params" / name)} >= set(methods.available()), name


@pytest.mark.slow
def test_tiny_sweep_runs_skips_records_failures_and_is_analysed(tmp_path):
    """CI's sweep: the shipped tiny file through papermill, then again (the finished configurations are
    skipped), then notebook 03 over the sweep."""
    table = run_sweep(TINY, "tiny", results_dir=tmp_path)
    ids = ["prompt_type=SD", "prompt_type=D", "quick_gelu=True"]
    assert list(dict.fromkeys(table.config_id)) == ids and (table.status == "done").all()
    for i in ids:
        for nb in ("01_prompt_training.ipynb", "02_evaluation.ipynb"):
            assert (tmp_path / "tiny" / i / nb).is_file()
    on_disk = pd.read_csv(tmp_path / "tiny" / "sweep.csv")
    assert {"config_id", "status", "method", "prompt_type", "epochs", "dataset", "category", *METRIC_KEYS} <= set(on_disk.columns)
    per_config = on_disk.groupby("config_id").size()
    assert (per_config == 6).all()                  # visa: 2 categories + mean, headct, kvasir, overall mean
    # a parameter a configuration leaves out holds the notebooks' default
    assert (on_disk[on_disk.config_id == "prompt_type=D"].method == "adaclip").all()
    assert (on_disk[on_disk.config_id == "quick_gelu=True"].prompt_type == "SD").all()
    config = json.loads((tmp_path / "tiny" / "quick_gelu=True" / "config.json").read_text())
    assert config["method"] == "adaclip" and config["model"]["backbone"]["quick_gelu"] is True
    assert json.loads((tmp_path / "tiny" / "prompt_type=D" / "config.json").read_text())["model"]["backbone"][
        "quick_gelu"] is False                       # unset: AdaCLIP's GELU, recorded as such

    # run again: every configuration is skipped (how a real notebook's failure is recorded while the
    # others run, and --force, are checked with stand-in notebooks below)
    before = (tmp_path / "tiny" / "prompt_type=D" / "02_evaluation.ipynb").stat().st_mtime_ns
    again = run_sweep(TINY, "tiny", results_dir=tmp_path)
    assert again.drop_duplicates("config_id").set_index("config_id").loc[ids, "status"].tolist() == ["skipped"] * 3
    assert (tmp_path / "tiny" / "prompt_type=D" / "02_evaluation.ipynb").stat().st_mtime_ns == before

    run_pipeline("tiny", params={"sweep": "tiny", "baseline": "prompt_type=SD"}, notebooks_to_run=["03"],
                 results_dir=tmp_path)
    out = tmp_path / "tiny"
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"03_ablation_prompt_type_pixel_auroc.png", "03_ablation_quick_gelu_image_auroc.pdf", "03_loss.png",
            "03_qualitative.png", "03_curves_visa.png"} <= figures
    summary = (out / "summary.md").read_text()
    assert "quick_gelu=True" in summary and "prompt_type=SD" in summary
    assert {"metrics.csv", "metrics.md", "metrics.tex", "overall.tex", "reproduction.csv"} <= {
        p.name for p in (out / "tables").iterdir()}


@pytest.mark.slow
def test_a_seed_sweep_is_compared_and_summarised_across_seeds(tmp_path, monkeypatch):
    """A sweep with a seed axis (two training seeds of one configuration) through the notebooks, then
    notebook 03 over it: the spread across seeds beside the bootstrap intervals, the paired comparison
    of the seeds on the same images, its forest plot, and `adaclip compare` on the same runs."""
    import yaml

    from adaclip.cli import main
    from adaclip.data.registry import RESULTS_ENV

    spec = yaml.safe_load(TINY.read_text())
    spec = {"base": {**spec["base"], "test_manifests": ["sample/visa.csv", "sample/kvasir.csv"]}, "seeds": [0, 1]}
    table = run_sweep(spec, "seeds", results_dir=tmp_path)
    assert list(dict.fromkeys(table.config_id)) == ["seed=0", "seed=1"] and set(table.group) == {"base"}
    assert {"image_auroc_lo", "pixel_auroc_hi"} <= set(table.columns)
    run_pipeline("seeds", params={"sweep": "seeds"}, notebooks_to_run=["03"], results_dir=tmp_path)
    out = tmp_path / "seeds"
    seeds = pd.read_csv(out / "tables" / "seeds.csv")
    assert (seeds.seeds == 2).all() and seeds.std_across_seeds.notna().all() and (seeds.bootstrap_half_width > 0).all()
    comparison = pd.read_csv(out / "tables" / "comparison.csv")
    assert set(comparison.run_a) == {"seed=0"} and set(comparison.run_b) == {"seed=1"}
    assert {"visa", "kvasir", "mean"} <= set(comparison.dataset)
    ok = comparison.dropna(subset=["difference_lo"])
    assert len(ok) and ((ok.difference_lo <= ok.difference) & (ok.difference <= ok.difference_hi)).all()
    assert (out / "figures" / "03_forest_pixel_auroc.png").is_file()
    summary = (out / "summary.md").read_text()
    assert "Across training seeds" in summary and "Paired comparisons" in summary
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    assert main(["compare", "seeds/seed=0", "seeds/seed=1", "--out", str(tmp_path / "c.csv")]) == 0
    assert pd.read_csv(tmp_path / "c.csv")[["dataset", "metric", "difference"]].equals(
        pd.read_csv(out / "tables" / "comparison.csv")[["dataset", "metric", "difference"]])


# Stand-ins for notebooks 01 and 02 (run through papermill like the real ones, in a second each): what
# the sweep decides to run, skip or record does not depend on what the notebooks compute. Each appends
# "<notebook> <parameters>" to the configuration's runs.txt, and fails on purpose where ``fail_in``
# names it; 02 writes a one-row metrics.csv.
STUB_01 = """import os
from pathlib import Path
run = Path(results_dir) / run_name
run.mkdir(parents=True, exist_ok=True)
with open(run / "runs.txt", "a") as f:
    f.write(f"01 epochs={epochs} value={value}\\n")
(run / "value.txt").write_text(f"{value} {os.environ.get('OMP_NUM_THREADS', '')}")
if fail_in == "01":
    raise RuntimeError("notebook 01 fails on purpose")
"""
STUB_02 = """from pathlib import Path
run = Path(results_dir) / run_name
with open(run / "runs.txt", "a") as f:
    f.write("02\\n")
if fail_in == "02":
    raise RuntimeError("notebook 02 fails on purpose")
value = int((run / "value.txt").read_text().split()[0])
(run / "metrics.csv").write_text(f"dataset,category,image_auroc\\nd,c,{value / 10}\\n")
"""


@pytest.fixture()
def stub_notebooks(tmp_path, monkeypatch):
    import nbformat
    folder = tmp_path / "notebooks"
    folder.mkdir()
    cells = {"01_prompt_training": ('run_name = "default"\nresults_dir = "../results"\nepochs = 1\nvalue = 0\n'
                                    'fail_in = ""', STUB_01),
             "02_evaluation": ('run_name = "default"\nresults_dir = "../results"\nfail_in = ""', STUB_02)}
    for name, (parameters, body) in cells.items():
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
        nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell(body)]
        nbformat.write(nb, folder / f"{name}.ipynb")
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", folder)
    monkeypatch.setenv("ADACLIP_NOTEBOOK_DIR", str(folder))        # worker processes (--jobs, submitit) too
    return tmp_path / "results"


def _runs(results, config):
    return (results / "s" / config / "runs.txt").read_text().split("\n")[:-1]


def _status(table):
    return table.drop_duplicates("config_id").set_index("config_id").status.to_dict()


def test_a_changed_base_parameter_reruns_a_finished_configuration(stub_notebooks):
    results = stub_notebooks
    spec = {"base": {"epochs": 1}, "configs": [{"value": 1}]}
    assert _status(run_sweep(spec, "s", results_dir=results)) == {"value=1": "done"}
    assert _status(run_sweep(spec, "s", results_dir=results)) == {"value=1": "skipped"}
    assert _runs(results, "value=1") == ["01 epochs=1 value=1", "02"]
    spec["base"]["epochs"] = 2                      # same configuration id, other parameters
    table = run_sweep(spec, "s", results_dir=results)
    assert _status(table) == {"value=1": "done"} and (table.epochs == 2).all()
    assert _runs(results, "value=1")[2:] == ["01 epochs=2 value=1"]        # 02 takes no epochs: still finished
    assert _status(run_sweep(spec, "s", results_dir=results)) == {"value=1": "skipped"}


def test_a_failing_configuration_does_not_stop_the_sweep(stub_notebooks):
    """The failing configuration comes first: the ones after it still run."""
    results = stub_notebooks
    spec = {"configs": [{"fail_in": "01"}, {"value": 2}, {"value": 3}]}
    table = run_sweep(spec, "s", results_dir=results)
    assert _status(table) == {"fail_in=01": "failed", "value=2": "done", "value=3": "done"}
    assert "notebook 01 fails on purpose" in table.set_index("config_id").error["fail_in=01"]
    for config in ("value=2", "value=3"):
        assert _runs(results, config) == [f"01 epochs=1 {config}", "02"]
    assert table.set_index("config_id").loc[["value=2", "value=3"], "image_auroc"].tolist() == [0.2, 0.3]


def test_a_configuration_is_finished_only_when_both_notebooks_are(stub_notebooks):
    """Notebook 01 finished and 02 failed: the next sweep runs the configuration again (its 02; the
    pipeline itself skips the finished 01) instead of counting it as done."""
    results = stub_notebooks
    spec = {"configs": [{"fail_in": "02"}]}
    assert _status(run_sweep(spec, "s", results_dir=results)) == {"fail_in=02": "failed"}
    assert _runs(results, "fail_in=02") == ["01 epochs=1 value=0", "02"]
    table = run_sweep(spec, "s", results_dir=results)
    assert _status(table) == {"fail_in=02": "failed"}
    assert "notebook 02 fails on purpose" in table.error.iloc[0]
    assert _runs(results, "fail_in=02") == ["01 epochs=1 value=0", "02", "02"]


def test_force_reruns_finished_configurations(stub_notebooks):
    results = stub_notebooks
    spec = {"configs": [{"value": 1}, {"value": 2}]}
    run_sweep(spec, "s", results_dir=results)
    assert _status(run_sweep(spec, "s", results_dir=results)) == {"value=1": "skipped", "value=2": "skipped"}
    assert _status(run_sweep(spec, "s", results_dir=results, force=True)) == {"value=1": "done", "value=2": "done"}
    assert _runs(results, "value=1") == ["01 epochs=1 value=1", "02"] * 2


@pytest.mark.slow
def test_parallel_and_submitit_sweeps_write_the_same_table_as_a_sequential_one(stub_notebooks):
    """--jobs 2 (two worker processes, the cores shared out between them) and submitit's local
    executor run every configuration with its own parameters and give the sequential sweep.csv."""
    results = stub_notebooks
    spec = {"base": {"epochs": 2}, "grid": {"value": [1, 2, 3]}}     # 3 configurations for 2 worker slots
    small = {"base": {"epochs": 2}, "grid": {"value": [1, 2]}}        # submitit: a job per configuration
    tables = {name: run_sweep(sweep, "s", results_dir=results / name, **kwargs)
              for name, sweep, kwargs in (("sequential", spec, {}), ("jobs", spec, {"jobs": 2}),
                                          ("submitit", small, {"launcher": "submitit-local"}))}
    reference = pd.read_csv(results / "sequential" / "s" / "sweep.csv")
    assert reference.image_auroc.tolist() == [0.1, 0.2, 0.3]
    for name, table in tables.items():
        assert (table.status == "done").all(), (name, table[["config_id", "status", "error"]])
        values = [1, 2, 3] if name != "submitit" else [1, 2]
        pd.testing.assert_frame_equal(pd.read_csv(results / name / "s" / "sweep.csv"), reference.head(len(values)), obj=name)
        for value in values:
            assert _runs(results / name, f"value={value}") == [f"01 epochs=2 value={value}", "02"]
    threads = (results / "jobs" / "s" / "value=1" / "value.txt").read_text().split()[1]
    assert int(threads) == max(1, __import__("os").cpu_count() // 2)             # the workers share the cores
    assert (results / "submitit" / "s" / ".submitit").is_dir()
