"""The baselines: training-free zero-shot CLIP and learned linear projections (AdaCLIP's recipe
without prompts and HSF), each what it says it is. (Through training, evaluation and run folders like
every method: tests/test_method_contract.py.)"""
import open_clip
import pytest
import torch
import torch.nn.functional as F

from adaclip import methods
from adaclip.methods.shared import gaussian_blur
from adaclip.methods.ensembles import state_sentences


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
