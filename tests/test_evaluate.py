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


def _spied(model):
    """``model`` whose forward also records every map evaluation's loop receives, in order."""
    seen, forward = [], model.forward

    def spy(images, names, **kw):
        out = forward(images, names, **kw)
        seen.extend(out.pixel_scores.clamp(0, 1))
        return out

    model.forward = spy
    return seen


def test_metrics_at_another_size_resize_masks_nearest():
    """``pixel_metric_size``: maps resized bilinearly, masks nearest (a defect keeps its extent; a
    bilinear mask thresholded at > 0 would grow every defect by a pixel ring)."""
    import torch
    import torch.nn.functional as F

    from adaclip.data import AnomalyDataset
    from adaclip.metrics import PixelAccumulator

    root = resolve_root("sample")
    df = build_manifest("mvtec", root)
    model = AdaCLIP.from_config(AdaCLIPConfig.tiny(image_size=64))
    seen = _spied(model)
    result = evaluate(model, df, root, EvalCfg(batch_size=4, pixel_metric_size=48, aupro_cflow=False), progress=False)
    dataset = AnomalyDataset(df, root, model.transform, model.image_size)
    acc = PixelAccumulator()
    for i, m in enumerate(seen):
        mask = dataset[i]["mask"].float()
        acc.update(F.interpolate(m[None, None], size=(48, 48), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1),
                   F.interpolate(mask[None, None], size=(48, 48), mode="nearest")[0, 0])
    values, _ = acc.compute()
    row = result.metrics.set_index("category").loc["bottle"]
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1", "pixel_aupro"):
        assert abs(row[key] - values[key]) < 1e-9, key
    assert torch.isfinite(torch.tensor(values["pixel_aupro"]))


def test_a_failing_map_writer_stops_the_evaluation(tmp_path, monkeypatch):
    """An error in the writer thread (here a full disk while saving maps) is raised by evaluate,
    whether it hits an early batch (collected inside the loop) or the last one (at the end)."""
    import pytest

    import adaclip.evaluate as ev

    root = resolve_root("sample")
    df = build_manifest("mvtec", root)
    model = AdaCLIP.from_config(AdaCLIPConfig.tiny())
    save = np.savez_compressed
    for fail_at in (0, len(df) - 1):
        calls = {"n": 0}

        def savez(f, **arrays):
            calls["n"] += 1
            if calls["n"] - 1 == fail_at:
                raise OSError(28, "No space left on device")
            return save(f, **arrays)

        monkeypatch.setattr(ev.np, "savez_compressed", savez)
        with pytest.raises(OSError, match="No space left on device"):
            evaluate(model, df, root, EvalCfg(batch_size=1, save_maps=True), run_dir=tmp_path / str(fail_at),
                     progress=False)
        assert calls["n"] > fail_at
