"""AnomalyCLIP and Crane in the harness: their learned parts, the released Crane prompts (a fixture
copied from the Crane repository) loaded into a random CLIP and producing maps, their options."""
from pathlib import Path

import open_clip
import pytest
import torch

from adaclip import methods
from adaclip.methods import CheckpointError, Targets

FIXTURES = Path(__file__).parent / "fixtures" / "crane"
open_clip.add_model_config(FIXTURES / "crane-test-clip.json")      # ViT-L/14's text tower, a tiny vision tower
TINY = dict(backbone=dict(name="adaclip-tiny", pretrained=None, image_size=32), layers=(4,), side_from=2, deep_depth=2)


def test_defaults_are_the_references():
    a, c = methods.config("anomalyclip"), methods.config("crane")
    assert (a.backbone.name, a.backbone.image_size, a.backbone.pos_embed_interp) == ("ViT-L-14-336", 518, "bilinear")
    assert (a.n_ctx, a.deep_length, a.global_ln_post, a.seg_weight) == (12, 4, False, 4.0)
    assert (c.global_ln_post, c.seg_weight, c.image_temperature, c.context_token_at_test) == (True, 8.0, 0.01, False)
    assert methods.AnomalyCLIP.default_quick_gelu(a) and methods.Crane.default_quick_gelu(c)     # QuickGELU
    assert (methods.train_config("anomalyclip").epochs, methods.train_config("crane").betas) == (15, (0.6, 0.999))
    with torch.device("meta"):
        m = methods.AnomalyCLIP(methods.config("anomalyclip", pretrained=None), device="meta")
    assert sum(p.numel() for p in m.learnable_parameters()) == 43_008                      # 2·12·768 + 8·4·768
    assert (m.cfg.layers, m.cfg.side_from, m.cfg.deep_depth) == ((24,), 6, 9)               # ViT-L-14's, recorded


def test_crane_released_prompts_load_and_produce_maps(tmp_path):
    """The shipped file (CUDA tensors in the reference; read onto the CPU) maps onto our parameters
    exactly; with a random CLIP they give finite maps in [0, 1] that differ from the untrained prompts'."""
    path = FIXTURES / "trained_on_mvtec_crane" / "epoch_5.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)["prompt_learner"]
    cfg = dict(backbone=dict(name="crane-test-clip", pretrained=None, image_size=32), layers=(4,), side_from=2)
    torch.manual_seed(0)
    untrained = methods.create("crane", **cfg).eval()
    model = methods.from_official("crane", path, **cfg).eval()
    assert model.trained_on == "mvtec"
    assert torch.equal(model.ctx[0], state["ctx_pos"].reshape(12, 768))
    assert torch.equal(model.ctx[1], state["ctx_neg"].reshape(12, 768))
    assert all(torch.equal(model.deep[i], state[f"compound_prompts_text.{i}"]) for i in range(8))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, before = model(images, "bottle"), untrained(images, "bottle")
    assert out.pixel_scores.shape == (2, 32, 32) and torch.isfinite(out.pixel_scores).all()
    assert 0 <= float(out.pixel_scores.min()) and float(out.pixel_scores.max()) <= 1
    assert (out.pixel_scores - before.pixel_scores).abs().max() > 1e-3
    text = model.text_features()
    assert text.shape == (1, 768, 2) and torch.allclose(text.norm(dim=1), torch.ones(1, 2), atol=1e-5)
    # a file of other sentences is refused, naming them
    torch.save({"prompt_learner": {**state, "tokenized_prompts_neg": state["tokenized_prompts_pos"]}},
               tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="other sentences"):
        model.load_official_checkpoint(tmp_path / "bad.pth")


@pytest.mark.parametrize("name", ["anomalyclip", "crane"])
def test_training_reaches_only_the_prompts(name):
    torch.manual_seed(0)
    model = methods.create(name, **TINY)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    masks = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)) > 0.8).float()
    out = model(images, ["a", "b", "c"], targets=Targets(torch.tensor([0, 1, 1]), masks, torch.tensor([True] * 3)))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.learnable_parameters())
    assert all(p.grad is None for p in model.clip.parameters())


def test_crane_context_token_makes_text_per_image_in_training_only():
    torch.manual_seed(0)
    model = methods.create("crane", **TINY).eval()
    feature = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    per_image = model.text_features(image_tokens=feature)
    assert per_image.shape == (2, 32, 2) and not torch.allclose(per_image[0], per_image[1])
    emb, ids = model.prompt_embeddings(feature)
    assert ids.argmax(-1).tolist() == [[16, 17], [16, 17]]              # EOT moved by the inserted token
    assert torch.equal(emb[0, 0, 13], feature[0].to(emb.dtype))
    assert model.forward_text(feature, None).shape == (1, 32, 2)        # test time: the static pair
    model.cfg.context_token_at_test = True
    assert model.forward_text(feature, None).shape == (2, 32, 2)


def test_anomalyclip_layer_options():
    """(24,) the released setting; alias_layers reads the last layer for every listed one (the historical
    bug); true multi-layer differs from both."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    base = dict(TINY, layers=(2, 3, 4))
    multi = methods.create("anomalyclip", **base).eval()
    aliased = methods.create("anomalyclip", **{**base, "alias_layers": True}).eval()
    single = methods.create("anomalyclip", **TINY).eval()
    for m in (aliased, single):
        m.load_state_dict(multi.state_dict())
    with torch.no_grad():
        a, s, mm = (m(images, "x").pixel_scores for m in (aliased, single, multi))
    torch.testing.assert_close(a, s)                                   # four copies of layer 4 = layer 4
    assert (mm - s).abs().max() > 1e-4
