"""Evaluation over the embedded sample: files written, undefined metrics reported as such."""
import json
import math

import numpy as np
import pandas as pd

from adaclip import AdaCLIP, AdaCLIPConfig, EvalCfg
from adaclip.data import build_manifest
from adaclip.data.registry import resolve_root
from adaclip.evaluate import evaluate


def test_evaluate_writes_metrics_scores_maps_and_config(tmp_path):
    root = resolve_root("sample")
    df = pd.concat([build_manifest(n, root) for n in ("visa", "headct", "kvasir")], ignore_index=True)
    model = AdaCLIP.from_config(AdaCLIPConfig.tiny())
    result = evaluate(model, df, root, EvalCfg(batch_size=4, save_maps=True), run_dir=tmp_path, progress=False)
    m = result.metrics.set_index(["dataset", "category"])
    assert set(m.index) == {("visa", "capsules"), ("visa", "macaroni1"), ("visa", "mean"), ("headct", "headct"),
                            ("kvasir", "kvasir"), ("all", "mean")}
    assert np.isfinite(m.loc[("visa", "capsules"), ["image_auroc", "pixel_auroc", "pixel_aupro"]]).all()
    assert math.isnan(m.loc[("headct", "headct"), "pixel_auroc"]) and "no pixel annotations" in m.loc[("headct", "headct"), "note"]
    assert math.isnan(m.loc[("kvasir", "kvasir"), "image_auroc"]) and "only anomalous" in m.loc[("kvasir", "kvasir"), "note"]
    assert np.isfinite(m.loc[("kvasir", "kvasir"), "pixel_auroc"])
    mean = m.loc[("visa", "mean")]
    assert mean.pixel_auroc == np.mean([m.loc[("visa", c), "pixel_auroc"] for c in ("capsules", "macaroni1")])
    on_disk = pd.read_csv(tmp_path / "metrics.csv")
    assert len(on_disk) == len(result.metrics)
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == len(df) and {"score", "label", "threshold", "decision"} <= set(scores.columns)
    assert scores[scores.dataset == "kvasir"].decision.isna().all()
    assert len(list((tmp_path / "maps").glob("*.npz"))) == len(df)
    with np.load(next((tmp_path / "maps").glob("*.npz"))) as f:
        assert f["map"].shape == (32, 32) and f["map"].dtype == np.float16
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone_weights"] == "random" and config["model"]["backbone"]["name"] == "adaclip-tiny"


def test_batch_size_does_not_change_results():
    root = resolve_root("sample")
    df = build_manifest("mvtec", root)
    model = AdaCLIP.from_config(AdaCLIPConfig.tiny())
    a = evaluate(model, df, root, EvalCfg(batch_size=1), progress=False)
    b = evaluate(model, df, root, EvalCfg(batch_size=5), progress=False)
    np.testing.assert_allclose(a.scores.score, b.scores.score, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.metrics.pixel_auroc, b.metrics.pixel_auroc, atol=1e-5)
