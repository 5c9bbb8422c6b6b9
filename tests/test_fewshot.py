"""Few-shot mode: the memory bank's map by hand, references drawn from the train split, refusals."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from adaclip import AdaCLIP, AdaCLIPConfig, EvalCfg, methods
from adaclip.data import AnomalyDataset, build_manifest, read_manifests
from adaclip.data.registry import resolve_manifest, resolve_root
from adaclip.data.synthetic import make_synthetic
from adaclip.evaluate import evaluate
from adaclip.fewshot import draw_references
from adaclip.methods.shared import gaussian_blur
from adaclip.pipeline import check_parameters
from adaclip.sweep import run_sweep


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root / "synthetic", categories=("stripes", "checker"), n_train=4, n_good=3, n_defect=3, size=32)
    return root, build_manifest("synthetic", root)


def _model(sigma=None):
    torch.manual_seed(0)
    cfg = AdaCLIPConfig.tiny()
    if sigma is not None:
        cfg.fusion.smoothing_sigma = sigma
    return AdaCLIP.from_config(cfg).eval()


@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_memory_map_by_hand(images, sigma):
    """The few-shot map is smoothed with the model's smoothing_sigma (4 by default; 1.5 tells a
    hard-coded default apart)."""
    model = _model(sigma)
    refs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    memory = model.few_shot_memory()
    memory.add("d/widget", refs, "widget")
    with torch.no_grad():
        out = model(images, "widget", return_tokens=True)
        ref_tokens = model(refs, "widget", return_tokens=True).patch_tokens
        dist = []
        for b in range(3):
            per_layer = []
            for t, r in zip(out.patch_tokens, ref_tokens):
                bank = F.normalize(r, dim=-1).reshape(-1, r.shape[-1])                # (k·N, W)
                per_layer.append(1 - (F.normalize(t[b], dim=-1) @ bank.T).max(-1).values)
            dist.append(torch.stack(per_layer).mean(0).clamp(0, 1))
        up = F.interpolate(torch.stack(dist).reshape(3, 1, 4, 4), size=(32, 32), mode="bilinear", align_corners=True)
        few = gaussian_blur(up[:, 0], sigma).clamp(0, 1)
        combined = memory.apply(out, ["d/widget"] * 3)
    torch.testing.assert_close(combined.pixel_scores, (out.pixel_scores + few) / 2)
    torch.testing.assert_close(combined.image_scores, (out.image_scores + few.flatten(1).max(1).values) / 2)
    # an image among its own references is at distance 0 everywhere: only the zero-shot half is left
    with torch.no_grad():
        same = memory.apply(model(refs[:1], "widget", return_tokens=True), ["d/widget"])
        zero_shot = model(refs[:1], "widget")
    torch.testing.assert_close(same.pixel_scores, zero_shot.pixel_scores / 2, atol=1e-5, rtol=0)


def test_evaluate_k_shot_draws_train_normals_and_lists_them(synthetic, tmp_path):
    root, df = synthetic
    test = df[df.split == "test"].reset_index(drop=True)
    model = _model()
    cfg = EvalCfg(batch_size=4, k_shot=2, shot_seed=3)
    result = evaluate(model, test, root, cfg, run_dir=tmp_path, progress=False, references=df)
    refs = json.loads((tmp_path / "config.json").read_text())["few_shot"]
    assert refs["k_shot"] == 2 and refs["seed"] == 3 and set(refs["references"]) == {"synthetic/stripes", "synthetic/checker"}
    for key, images in refs["references"].items():
        assert len(images) == 2 and all(f"{key.split('/')[1]}/train/good/" in p for p in images)
    zero = evaluate(model, test, root, EvalCfg(batch_size=4), progress=False)
    assert not result.scores.score.equals(zero.scores.score)           # the references changed the scores
    again = evaluate(model, test, root, cfg, progress=False, references=df)
    assert result.scores.score.equals(again.scores.score)              # same seed, same references
    assert draw_references(df, test, 2, 3)[("synthetic", "stripes")].image.tolist() == \
        refs["references"]["synthetic/stripes"]


def test_evaluate_k_shot_scores_each_row_with_its_own_category_memory(synthetic):
    """Two categories interleaved, batches of 3: each batch mixes both, and a row's position in its
    batch does not tell its category. Each image is scored against the references of its own
    dataset/category, as scoring it alone by hand does."""
    root, df = synthetic
    test = df[df.split == "test"].reset_index(drop=True)
    order = [i for pair in zip(*(test.index[test.category == c] for c in ("checker", "stripes"))) for i in pair]
    test = test.loc[order].reset_index(drop=True)                       # checker, stripes, checker, ...
    assert test.category.tolist()[:2] == ["checker", "stripes"]
    model = _model()
    cfg = EvalCfg(batch_size=3, k_shot=2, shot_seed=3)
    got = evaluate(model, test, root, cfg, progress=False, references=df).scores.score.values
    drawn = draw_references(df, test, 2, 3)
    memory = model.few_shot_memory()
    for (name, category), rows in drawn.items():
        refs = AnomalyDataset(rows, root, model.transform, model.image_size)
        memory.add(f"{name}/{category}", torch.stack([refs[i]["image"] for i in range(len(refs))]), category)
    images = AnomalyDataset(test, root, model.transform, model.image_size)
    with torch.no_grad():
        want = [float(memory.apply(model(images[i]["image"][None], test.category[i], return_tokens=True),
                                   [f"{test.dataset[i]}/{test.category[i]}"]).image_scores[0])
                for i in range(len(test))]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the two categories' references differ, so a row scored against the other's would show
    swapped = {"synthetic/stripes": "synthetic/checker", "synthetic/checker": "synthetic/stripes"}
    with torch.no_grad():
        other = [float(memory.apply(model(images[i]["image"][None], test.category[i], return_tokens=True),
                                    [swapped[f"{test.dataset[i]}/{test.category[i]}"]]).image_scores[0])
                 for i in range(len(test))]
    assert np.abs(np.array(other) - np.array(want)).max() > 1e-3


def test_references_come_from_the_train_split_and_the_seed(synthetic):
    _, df = synthetic
    test = df[df.split == "test"].reset_index(drop=True)
    key = ("synthetic", "stripes")
    drawn = {seed: tuple(draw_references(df, test, 2, seed)[key].image) for seed in range(6)}
    assert all("/train/good/" in p for images in drawn.values() for p in images)
    assert len(set(drawn.values())) > 1                                  # the seed chooses among them
    everything = draw_references(df, test, 4, 0)[key]                    # all 4 train normals, no test normal
    assert sorted(everything.image) == sorted(df[(df.split == "train") & (df.category == "stripes")].image)


def test_references_overlapping_the_test_set_are_refused(synthetic):
    root, df = synthetic
    with pytest.raises(ValueError, match="is also a test image"):
        evaluate(_model(), df, root, EvalCfg(k_shot=4), progress=False)  # train normals among the test rows


def test_category_without_normal_training_images_is_named(synthetic):
    root, df = synthetic
    test = df[df.split == "test"].reset_index(drop=True)
    with pytest.raises(ValueError, match="synthetic/checker has no normal training images"):
        evaluate(_model(), test, root, EvalCfg(k_shot=1), progress=False, references=df[df.category != "checker"])
    with pytest.raises(ValueError, match="fewer than k_shot=9"):
        draw_references(df, test, 9)


@pytest.mark.slow
def test_k_shot_is_a_notebook_parameter_and_a_sweep_axis(tmp_path):
    """A sweep configuration's k_shot and shot_seed reach notebook 02's evaluation: its run is the
    few-shot evaluation of its model with those references (listed in config.json)."""
    check_parameters({"k_shot": 2, "shot_seed": 1})
    with pytest.raises(ValueError, match=">= 0"):
        EvalCfg(k_shot=-1)
    spec = {"base": {"data_root": "sample", "train_manifests": ["sample/mvtec.csv"],
                     "test_manifests": ["sample/visa.csv"], "backbone": "adaclip-tiny", "pretrained": "random",
                     "image_size": 32, "method": "clip", "n_examples": 1, "save_maps": False, "batch_size": 8},
            "configs": [{"k_shot": 2, "shot_seed": 1}]}
    table = run_sweep(spec, "shots", results_dir=tmp_path)
    assert (table.status == "done").all(), table[["config_id", "status", "error"]]
    assert (table.k_shot == 2).all() and (table.shot_seed == 1).all()
    run = tmp_path / "shots" / "k_shot=2,shot_seed=1"
    few_shot = json.loads((run / "config.json").read_text())["few_shot"]
    rows = read_manifests([resolve_manifest("sample/visa.csv")])
    test = rows[rows.split == "test"].reset_index(drop=True)
    drawn = draw_references(rows, test, 2, 1)
    assert few_shot["k_shot"] == 2 and few_shot["seed"] == 1
    assert few_shot["references"] == {f"{d}/{c}": list(r.image) for (d, c), r in drawn.items()}
    expected = evaluate(methods.load(run / "model.pt"), test, resolve_root("sample"),
                        EvalCfg(batch_size=8, k_shot=2, shot_seed=1), progress=False, references=rows).scores
    np.testing.assert_allclose(pd.read_csv(run / "scores.csv").score, expected.score, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["aprilgan", "winclip"])
def test_each_method_evaluates_few_shot_with_its_own_memory(synthetic, tmp_path, method):
    """k-shot evaluation through the same harness with APRIL-GAN's and WinCLIP+'s own memories: the
    scores are each image's, scored alone by hand against its category's references."""
    from adaclip import methods

    root, df = synthetic
    test = df[df.split == "test"].reset_index(drop=True)
    torch.manual_seed(0)
    model = methods.create(method, backbone=dict(name="adaclip-tiny", pretrained=None, image_size=32)).eval()
    cfg = EvalCfg(batch_size=4, k_shot=2, shot_seed=1)
    got = evaluate(model, test, root, cfg, run_dir=tmp_path, progress=False, references=df).scores.score.values
    assert json.loads((tmp_path / "config.json").read_text())["transductive_image_scores"] is False
    memory, images = _memory_by_hand(model, df, test, root)
    with torch.no_grad():
        want = [float(memory.apply(model(images[i]["image"][None], test.category[i], return_tokens=True),
                                   [f"{test.dataset[i]}/{test.category[i]}"]).image_scores[0]) for i in range(len(test))]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _memory_by_hand(model, df, test, root):
    """The few-shot memory built image by image from the references evaluation draws (k=2, seed 1),
    and the test images, for comparing with `evaluate`."""
    memory = model.few_shot_memory()
    for (name, category), rows in draw_references(df, test, 2, 1).items():
        refs = AnomalyDataset(rows, root, model.transform, model.image_size)
        memory.add(f"{name}/{category}", torch.stack([refs[i]["image"] for i in range(len(refs))]), category)
    return memory, AnomalyDataset(test, root, model.transform, model.image_size)


def test_a_transductive_image_score_is_computed_per_category_and_flagged(synthetic, tmp_path):
    """APRIL-GAN's faithful few-shot score normalises each image's map maximum over its category's test
    images: evaluation applies it per category (not per batch), and says so in config.json and metrics."""
    from adaclip import methods

    root, df = synthetic
    test = df[df.split == "test"].reset_index(drop=True)
    torch.manual_seed(0)
    model = methods.create("aprilgan", backbone=dict(name="adaclip-tiny", pretrained=None, image_size=32),
                           few_shot_image_score="test_minmax").eval()
    result = evaluate(model, test, root, EvalCfg(batch_size=4, k_shot=2, shot_seed=1), run_dir=tmp_path,
                      progress=False, references=df)
    assert json.loads((tmp_path / "config.json").read_text())["transductive_image_scores"] is True
    rows = result.metrics[result.metrics.category != "mean"]
    assert len(rows) == 2 and rows.note.str.contains("transductive").all()
    memory, images = _memory_by_hand(model, df, test, root)
    with torch.no_grad():
        parts = np.array([memory.apply(model(images[i]["image"][None], test.category[i], return_tokens=True),
                                       [f"{test.dataset[i]}/{test.category[i]}"]).score_parts[0].numpy()
                          for i in range(len(test))])
    for category in ("stripes", "checker"):
        sel = (test.category == category).values
        s, m = parts[sel, 0], parts[sel, 1]
        want = 0.5 * (s + (m - m.min()) / (m.max() - m.min()))
        np.testing.assert_allclose(result.scores.score.values[sel], want, atol=1e-5, rtol=0)
