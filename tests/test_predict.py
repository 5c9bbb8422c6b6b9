"""`adaclip predict`: your own images in, overlays / masks / predictions.csv out, bad inputs named."""
import json
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adaclip import AdaCLIP, AdaCLIPConfig, EvalCfg, cli
from adaclip.data import build_manifest
from adaclip.data.registry import resolve_root
from adaclip.evaluate import evaluate
from adaclip.backbone.clip import _CONFIG_DIR
from adaclip.predict import stored_thresholds

SAMPLE = resolve_root("sample")
BOTTLE = SAMPLE / "mvtec" / "bottle" / "test"


def _by_hand(model, paths):
    """Image scores and maps in [0, 1] at each image's own size: one image at a time through the model,
    the map resized bilinearly (pixel centres aligned)."""
    scores, maps = [], []
    for p in paths:
        image = Image.open(p).convert("RGB")
        with torch.no_grad():
            out = model(model.transform(image)[None], "bottle")
        heat = F.interpolate(out.pixel_scores[None], size=(image.height, image.width), mode="bilinear",
                             align_corners=False)[0, 0]
        scores.append(float(out.image_scores[0]))
        maps.append(heat.clamp(0, 1).numpy())
    return np.array(scores), maps


def _assert_mask(mask, heat, threshold):
    """mask (0 / 255) is heat >= threshold, except where float noise could tip a pixel either way."""
    clear = np.abs(heat - threshold) > 1e-5
    np.testing.assert_array_equal((mask > 0)[clear], (heat >= threshold)[clear])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny model saved and evaluated on the sample's MVTec AD bottle: thresholds.json beside it."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = AdaCLIP.from_config(AdaCLIPConfig.tiny()).eval()
    model.save(run / "model.pt")
    evaluate(model, build_manifest("mvtec", SAMPLE), SAMPLE, EvalCfg(batch_size=8), run_dir=run, progress=False)
    return run


def test_predict_a_folder_with_a_corrupt_image(evaluated, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(BOTTLE / "broken_large", images / "a")
    (images / "b").mkdir()
    shutil.copy(BOTTLE / "good" / "000.png", images / "b" / "000.png")
    (images / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    code = cli.main(["predict", str(images), "--checkpoint", str(evaluated / "model.pt"), "--class-name", "bottle",
                     "--out", str(out), "--batch-size", "2", "--masks"])
    captured = capsys.readouterr()
    assert code == 1                                             # one file failed, the rest were scored
    assert "broken.png cannot be decoded" in captured.err and "skipped" in captured.err
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(table) == 4 and not table.path.str.endswith("broken.png").any()
    stored = json.loads((evaluated / "thresholds.json").read_text())
    t_image, t_pixel = stored["image"]["mvtec/bottle"], stored["pixel"]["mvtec/bottle"]
    assert (table.threshold == t_image).all() and f"from {evaluated / 'thresholds.json'} (mvtec/bottle)" in captured.out
    assert (table.decision == (table.image_score >= t_image).astype(int)).all()
    # scores and maps are the model's (computed here without the predictor), at each image's own size
    paths = [images / "a" / "000.png", images / "a" / "001.png", images / "a" / "002.png", images / "b" / "000.png"]
    scores, maps = _by_hand(AdaCLIP.load(evaluated / "model.pt"), paths)
    np.testing.assert_allclose(table.image_score, scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table.max_pixel_score, [m.max() for m in maps], rtol=1e-5, atol=1e-6)
    for row, p, heat in zip(table.itertuples(), paths, maps):
        image = np.asarray(Image.open(p).convert("RGB"), np.float32)
        overlay = np.asarray(Image.open(row.overlay), np.float32)
        assert overlay.shape == image.shape
        jet = matplotlib.colormaps["jet"](heat)[..., :3] * 255                # the map blended over the image
        off = np.abs(overlay - (0.55 * image + 0.45 * jet))       # rounding; a few pixels a colour-table step off
        assert off.max() < 3 and (off > 1.01).mean() < 1e-3
        mask = np.asarray(Image.open(row.mask))
        assert mask.shape == heat.shape and set(np.unique(mask)) <= {0, 255}
        _assert_mask(mask, heat, t_pixel)
    # two 000.png files: named by their place below the common folder
    assert sorted(Path(o).name for o in table.overlay) == ["a_000.png", "a_001.png", "a_002.png", "b_000.png"]


def test_a_category_keeps_its_own_pixel_threshold(evaluated, tmp_path, capsys):
    """thresholds.json with a pixel threshold for the category that differs from the pooled one (the
    sample's evaluation has one category, where they are equal): the category's own makes the mask."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(evaluated / "model.pt", run / "model.pt")
    image = BOTTLE / "broken_large" / "000.png"
    heat = _by_hand(AdaCLIP.load(run / "model.pt"), [image])[1][0]
    own, pooled = float(np.quantile(heat, 0.5)), float(heat.max()) + 0.01   # pooled: an empty mask
    (run / "thresholds.json").write_text(json.dumps({
        "image": {"mvtec/bottle": 0.25, "visa/candle": 0.75, "headct/brain": 0.3},
        "pixel": {"mvtec/bottle": own, "visa/candle": 0.2},                 # headct: image level only
        "image_pooled": 0.5, "pixel_pooled": pooled}))
    out = tmp_path / "out"
    assert cli.main(["predict", str(image), "--checkpoint", str(run / "model.pt"), "--class-name", "bottle",
                     "--out", str(out), "--masks"]) == 0
    assert f"pixel threshold {own:.4g}" in capsys.readouterr().out
    table = pd.read_csv(out / "predictions.csv")
    assert table.threshold.tolist() == [0.25]
    mask = np.asarray(Image.open(table["mask"].iloc[0]))
    _assert_mask(mask, heat, own)
    assert 0 < (mask > 0).mean() < 1
    stored = {c: stored_thresholds(run / "model.pt", c) for c in ("bottle", "candle", "brain", "transistor")}
    assert {c: (t.image, t.pixel) for c, t in stored.items()} == {
        "bottle": (0.25, own), "candle": (0.75, 0.2),
        "brain": (0.3, pooled),                   # evaluated at image level only: the pooled pixel threshold
        "transistor": (0.5, pooled)}              # never evaluated: both pooled


def test_threshold_is_required_without_an_evaluation(tmp_path, capsys):
    torch.manual_seed(0)
    AdaCLIP.from_config(AdaCLIPConfig.tiny()).save(tmp_path / "model.pt")
    args = ["predict", str(BOTTLE / "good"), "--checkpoint", str(tmp_path / "model.pt"), "--class-name", "bottle",
            "--out", str(tmp_path / "out")]
    assert cli.main(args) == 2
    assert "pass --threshold" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert cli.main(args + ["--threshold", "0.5"]) == 0
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(table) == 6 and (table.threshold == 0.5).all()


def test_unseen_class_uses_the_pooled_threshold(evaluated, tmp_path, capsys):
    assert cli.main(["predict", str(BOTTLE / "good" / "000.png"), "--checkpoint", str(evaluated / "model.pt"),
                     "--class-name", "transistor", "--out", str(tmp_path)]) == 0
    stored = json.loads((evaluated / "thresholds.json").read_text())
    assert pd.read_csv(tmp_path / "predictions.csv").threshold.iloc[0] == stored["image_pooled"]
    assert "'transistor' was not evaluated" in capsys.readouterr().out


def test_bad_paths_are_named(evaluated, tmp_path, capsys):
    assert cli.main(["predict", str(tmp_path / "nowhere.png"), "--checkpoint", str(evaluated / "model.pt"),
                     "--class-name", "bottle"]) == 2
    assert "nowhere.png does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(tmp_path / "empty"), "--checkpoint", str(evaluated / "model.pt"),
                     "--class-name", "bottle"]) == 2
    assert "holds no image files" in capsys.readouterr().err
    assert cli.main(["predict", str(BOTTLE / "good"), "--checkpoint", str(tmp_path / "missing.pt"),
                     "--class-name", "bottle", "--threshold", "0.5"]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err


def test_official_file_of_another_backbone_is_a_clear_error(tmp_path, capsys):
    """An official-format file made for one backbone, loaded for another: which keys do not fit."""
    cfg = json.loads((_CONFIG_DIR / "adaclip-tiny.json").read_text())
    cfg["vision_cfg"]["width"] = 96
    cfg["text_cfg"]["layers"] = 4                       # deep enough for the paper's prompt depth
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "adaclip-tiny-wide.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    model = AdaCLIP.from_config(AdaCLIPConfig.tiny())
    official = {"clip_model.visual_prompter.static_prompts.0": model.visual_prompts.static[0].detach()}
    official.update({f"clip_model.patch_token_layer.head.{k}.weight": p.weight.detach()
                     for k, p in enumerate(model.patch_proj)})
    torch.save(official, tmp_path / "pretrained_tiny.pth")
    code = cli.main(["predict", str(BOTTLE / "good" / "000.png"), "--checkpoint", str(tmp_path / "pretrained_tiny.pth"),
                     "--official", "--backbone", "adaclip-tiny-wide", "--pretrained", "none", "--image-size", "32",
                     "--class-name", "bottle", "--threshold", "0.5", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit this model" in err
    assert "visual_prompts.static.0: file (2, 64) vs model (5, 96)" in err
    assert "missing keys" in err and "adaclip-tiny-wide" in err


@pytest.mark.parametrize("method", ["aprilgan", "winclip"])
def test_predict_with_any_method(tmp_path, capsys, method):
    """A checkpoint names its method: `adaclip predict` scores with it as with AdaCLIP."""
    from adaclip import methods

    torch.manual_seed(0)
    model = methods.create(method, backbone=dict(name="adaclip-tiny", pretrained=None, image_size=32)).eval()
    model.save(tmp_path / "model.pt")
    code = cli.main(["predict", str(BOTTLE / "good"), "--checkpoint", str(tmp_path / "model.pt"), "--class-name",
                     "bottle", "--out", str(tmp_path / "out"), "--threshold", "0.5", "--pixel-threshold", "0.5"])
    assert code == 0
    table = pd.read_csv(tmp_path / "out" / "predictions.csv").sort_values("path")
    scores, _ = _by_hand(model, sorted(BOTTLE.joinpath("good").glob("*.png")))
    np.testing.assert_allclose(table.image_score.values, scores, atol=1e-5)
