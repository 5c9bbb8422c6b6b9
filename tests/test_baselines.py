"""The baselines: training-free zero-shot CLIP and learned linear projections (AdaCLIP's recipe
without prompts and HSF), each a method module, through the same training, evaluation and run folders."""
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from adaclip import EvalCfg, TrainCfg, methods
from adaclip.data import build_manifest
from adaclip.data.registry import resolve_root
from adaclip.evaluate import evaluate
from adaclip.methods.shared import gaussian_blur
from adaclip.methods.ensembles import state_sentences
from adaclip.train import load_log, train


def _cfg(method):
    return methods.config(method, backbone=dict(name="adaclip-tiny", pretrained=None, image_size=32))


def _stock_text_features(model, name):
    normal, abnormal = state_sentences(name)
    tokenizer = open_clip.get_tokenizer("adaclip-tiny")
    feats = []
    for sentences in (normal, abnormal):
        f = model.clip.encode_text(tokenizer(sentences), normalize=True).mean(0)
        feats.append(f / f.norm())
    return torch.stack(feats, dim=1)                                          # (D, 2)


def test_clip_baseline_is_zero_shot_clip(images):
    """Last-layer patch tokens through CLIP's own ln_post and projection against the same text
    ensemble, maps upsampled and smoothed as AdaCLIP's; image score from the class token."""
    torch.manual_seed(0)
    model = methods.CLIPBaseline(_cfg("clip")).eval()
    assert model.learnable_parameters() == [] and model.out_layers == (4,) and model.cfg.backbone.quick_gelu
    with torch.no_grad():
        out = model(images, "bottle", return_layer_maps=True)
        v = model.clip.visual
        text = _stock_text_features(model, "bottle")
        tokens = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(3, 1, -1), tokens], 1) + v.positional_embedding
        x = v.transformer(v.ln_pre(x))                                          # the stock, unprompted tower
        patches = F.normalize(v.ln_post(x[:, 1:]) @ v.proj, dim=-1)            # (B, N, D)
        image = F.normalize(model.clip.encode_image(images), dim=-1)           # class token, ln_post, proj
        score = torch.softmax(100 * image @ text, dim=-1)[:, 1]
        logits = (100 * patches @ text).transpose(1, 2).reshape(3, 2, 4, 4)
        up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=True).softmax(1)
        pixel = gaussian_blur((up[:, 1] + 1 - up[:, 0]) / 2, 4.0)
    torch.testing.assert_close(out.image_scores, score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pixel_scores, pixel, rtol=1e-5, atol=1e-6)
    assert len(out.layer_maps) == 1


def test_linear_baseline_learns_patch_projections_only(images):
    torch.manual_seed(0)
    model = methods.LinearBaseline(_cfg("linear")).eval()
    names = {n.split(".")[0] for n, _ in model.named_parameters() if not n.startswith("clip.")}
    assert names == {"patch_proj"} and model.out_layers == (1, 2, 3, 4)
    with torch.no_grad():
        out = model(images, "bottle")
        image = F.normalize(model.clip.encode_image(images), dim=-1)            # frozen class feature
        score = torch.softmax(100 * image @ _stock_text_features(model, "bottle"), dim=-1)[:, 1]
    torch.testing.assert_close(out.image_scores, score, rtol=1e-5, atol=1e-6)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method 'patchcore'; available"):
        methods.create("patchcore")


@pytest.mark.parametrize("method", ["clip", "linear"])
def test_baselines_are_runs_like_any_other(tmp_path, method):
    """Training (nothing to learn for clip), checkpoint, evaluation and config.json as for AdaCLIP."""
    root = resolve_root("sample")
    model = train(_cfg(method), TrainCfg(epochs=1, batch_size=8), build_manifest("mvtec", root), root, tmp_path,
                  progress=False)
    log = load_log(tmp_path)
    assert (len(log) == 0) == (method == "clip")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == method and config["backbone_weights"] == "random"
    reloaded = methods.load(tmp_path / "model.pt")
    assert reloaded.name == method and type(reloaded) is methods.get(method)
    result = evaluate(reloaded, build_manifest("visa", root), root, EvalCfg(batch_size=8), run_dir=tmp_path,
                      progress=False)
    assert result.metrics.pixel_auroc.notna().all()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(reloaded.eval()(x, "capsules").pixel_scores, model.eval()(x, "capsules").pixel_scores)
