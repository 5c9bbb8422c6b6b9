import pytest
import torch

from adaclip import AdaCLIP, AdaCLIPConfig, BackboneCfg, FusionCfg, PromptCfg


def _model(**prompts) -> AdaCLIP:
    torch.manual_seed(0)
    cfg = AdaCLIPConfig.tiny()
    cfg.prompts = PromptCfg(**{**cfg.prompts.to_dict(), **prompts})
    return AdaCLIP.from_config(cfg).eval()


def test_output_shapes_and_ranges(tiny_model, images):
    out = tiny_model(images, ["bottle"] * 3, return_layer_maps=True)
    assert out.image_scores.shape == (3,) and out.pixel_scores.shape == (3, 32, 32)
    assert out.image_probs.shape == (3, 2)
    assert len(out.layer_maps) == 4 and all(m.shape == (3, 2, 32, 32) for m in out.layer_maps)
    for t in (out.image_scores, out.pixel_scores):
        assert torch.all((t >= 0) & (t <= 1))
    torch.testing.assert_close(out.image_probs.sum(-1), torch.ones(3))
    torch.testing.assert_close(out.layer_maps[0].sum(1), torch.ones(3, 32, 32))


@pytest.mark.parametrize("prompts", [dict(type="SD", branch="VL"), dict(type="S", branch="VL"),
                                     dict(type="D", branch="VL"), dict(type="SD", branch="V"),
                                     dict(type="SD", branch="L"), dict(branch="")])
def test_batch_equals_single_image_calls(prompts, images):
    model = _model(**prompts)
    names = ["bottle", "screw", "bottle"]
    with torch.no_grad():
        batch = model(images, names, return_layer_maps=True)
        singles = [model(images[i:i + 1], [names[i]], return_layer_maps=True) for i in range(3)]
    torch.testing.assert_close(batch.image_scores, torch.cat([s.image_scores for s in singles]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch.pixel_scores, torch.cat([s.pixel_scores for s in singles]), atol=1e-5, rtol=1e-4)
    for k in range(4):
        torch.testing.assert_close(batch.layer_maps[k], torch.cat([s.layer_maps[k] for s in singles]),
                                   atol=1e-5, rtol=1e-4)


def test_only_learnable_parts_get_gradients(tiny_model, images):
    tiny_model.train()
    out = tiny_model(images, "bottle", return_layer_maps=True)
    (out.image_probs[:, 1].sum() + sum(m[:, 1].mean() for m in out.layer_maps)).backward()
    for name, p in tiny_model.clip.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    learnable = dict(tiny_model.named_parameters())
    learnable = {n: p for n, p in learnable.items() if not n.startswith("clip.")}
    assert {n.split(".")[0] for n in learnable} == {"visual_prompts", "text_prompts", "patch_proj", "cls_proj"}
    # the reference allocates a layer-0 text prompt but never uses it (text layer 0 is untouched)
    assert learnable.pop("text_prompts.static.0").grad is None
    for name, p in learnable.items():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_default_config_trainable_count():
    # the reference reports about 10.7 M; built on the meta device (no memory, no weights)
    with torch.device("meta"):
        model = AdaCLIP(AdaCLIPConfig(backbone=BackboneCfg(pretrained=None)), device="meta")
    n = sum(p.numel() for p in model.learnable_parameters())
    print(f"trainable parameters, default config (ViT-L-14-336 @ 518): {n:,}")
    assert n == 10_665_472
    assert model.out_layers == (6, 12, 18, 24) and tuple(model.clip.visual.grid_size) == (37, 37)


def test_prompts_change_the_output(images):
    model = _model()
    with torch.no_grad():
        before = model(images, "bottle").pixel_scores
        # random perturbations: LayerNorm would cancel a constant shift
        model.visual_prompts.static[0].add_(torch.randn_like(model.visual_prompts.static[0]))
        mid = model(images, "bottle").pixel_scores
        model.text_prompts.static[1].add_(torch.randn_like(model.text_prompts.static[1]))
        after = model(images, "bottle").pixel_scores
    assert not torch.allclose(before, mid) and not torch.allclose(mid, after)


def test_layer0_text_prompt_is_unused(images):
    # reference: text layer 0 is untouched, prompts replace tokens from layer 1 on
    model = _model(type="S")
    with torch.no_grad():
        before = model(images, "bottle").pixel_scores
        model.text_prompts.static[0].add_(torch.randn_like(model.text_prompts.static[0]))
        after = model(images, "bottle").pixel_scores
    torch.testing.assert_close(before, after)


def test_hsf_off_uses_class_feature_only(images):
    """use_hsf=False: the image score is softmax(100 · normalize(cls_proj(f)) · T)[abnormal], where f is
    the prompted pass's pooled feature, computed here by hand from the model's parts; the patch
    projections (HSF's input) then no longer move it."""
    from adaclip.backbone import encode_image
    torch.manual_seed(0)
    cfg = AdaCLIPConfig.tiny()
    cfg.fusion = FusionCfg(use_hsf=False, k_clusters=3)
    model = AdaCLIP.from_config(cfg).eval()
    with torch.no_grad():
        out = model(images, "bottle")
        f0, _ = encode_image(model.clip.visual, images, ())
        dyn_v, dyn_t = model.visual_prompts.generate(f0), model.text_prompts.generate(f0)
        f, _ = encode_image(model.clip.visual, images, (), model.visual_prompts.layer_prompts(dyn_v))
        g = torch.nn.functional.normalize(model.cls_proj(f), dim=-1)                       # (B, D)
        text = model.text_features(["bottle"] * 3, dyn_t)                                   # (B, D, 2)
        by_hand = torch.softmax(100 * torch.einsum("bd,bdc->bc", g, text), dim=-1)[:, 1]
        torch.testing.assert_close(out.image_scores, by_hand, rtol=1e-5, atol=1e-6)
        for proj in model.patch_proj:
            proj.weight.add_(torch.randn_like(proj.weight))
        moved = model(images, "bottle")
    torch.testing.assert_close(moved.image_scores, out.image_scores)
    assert not torch.allclose(moved.pixel_scores, out.pixel_scores)
    # with HSF on, the same change to the patch projections does move the image score
    cfg.fusion = FusionCfg(use_hsf=True, k_clusters=3)
    torch.manual_seed(0)
    hsf = AdaCLIP.from_config(cfg).eval()
    with torch.no_grad():
        before = hsf(images, "bottle").image_scores
        for proj in hsf.patch_proj:
            proj.weight.add_(torch.randn_like(proj.weight))
        assert not torch.allclose(hsf(images, "bottle").image_scores, before)


def test_text_features_match_stock_encoder(images):
    # with the text tower unprompted, features are the reference's normalised ensembles of
    # stock open_clip text features
    model = _model(branch="V")
    from adaclip.methods.ensembles import state_sentences
    normal, abnormal = state_sentences("metal-nut")
    with torch.no_grad():
        ours = model.text_features(["metal-nut"])[0]
        stock = []
        for sents in (normal, abnormal):
            f = model.clip.encode_text(model.tokenizer(sents), normalize=True).mean(0)
            stock.append(f / f.norm())
    torch.testing.assert_close(ours, torch.stack(stock, dim=1))


@pytest.mark.parametrize("bad, match", [
    (lambda x: x[:, :1], "RGB"),
    (lambda x: (x * 255).to(torch.uint8), "floating point"),
    (lambda x: torch.nn.functional.pad(x, (0, 4, 0, 4)), "multiple of the patch size"),
    (lambda x: torch.nn.functional.pad(x, (0, 8, 0, 8)), "must be 32x32"),
    (lambda x: x[0], r"\(B, 3, 32, 32\)"),
    (lambda x: x.numpy(), "torch.Tensor"),
])
def test_bad_images(tiny_model, images, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(bad(images), "bottle")


def test_mismatched_class_names(tiny_model, images):
    with pytest.raises(ValueError, match="one per image"):
        tiny_model(images, ["bottle", "screw"])


def test_prompts_deeper_than_the_encoders_are_refused():
    cfg = AdaCLIPConfig.tiny()
    cfg.prompts = PromptCfg(depth=9, length=2)
    with pytest.raises(ValueError, match=r"prompt depth 9 exceeds the encoder depth \(4 visual, 2 text\)"):
        AdaCLIP.from_config(cfg)


@pytest.mark.parametrize("name, size, layers, trainable", [
    ("ViT-B-16", 240, (3, 6, 9, 12), 5_146_368), ("ViT-B-32", 224, (3, 6, 9, 12), 5_146_368),
    ("ViT-L-14", 336, (6, 12, 18, 24), 10_665_472), ("ViT-L-14-336", 518, (6, 12, 18, 24), 10_665_472)])
def test_real_architectures_shapes_on_meta_device(name, size, layers, trainable):
    """The real open_clip ViTs at non-native sizes: shapes through the whole forward, no weights."""
    cfg = AdaCLIPConfig(backbone=BackboneCfg(name=name, pretrained=None, image_size=size),
                        fusion=FusionCfg(use_hsf=False, smoothing_sigma=0))
    with torch.device("meta"):
        model = AdaCLIP(cfg, device="meta")
        out = model(torch.empty(2, 3, size, size), ["bottle", "screw"], return_layer_maps=True)
    assert model.out_layers == layers
    assert out.pixel_scores.shape == (2, size, size) and out.image_scores.shape == (2,)
    assert all(m.shape == (2, 2, size, size) for m in out.layer_maps)
    assert sum(p.numel() for p in model.learnable_parameters()) == trainable


def test_mixed_precision_keeps_float32_maps_and_trains(tiny_model, images):
    """CUDA runs under bf16 autocast; CPU autocast exercises the same dtype mixing here."""
    with torch.no_grad():
        ref = tiny_model(images, "bottle")
    tiny_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(images, "bottle", return_layer_maps=True)
    assert out.pixel_scores.dtype == out.image_probs.dtype == out.layer_maps[0].dtype == torch.float32
    torch.testing.assert_close(out.pixel_scores, ref.pixel_scores, atol=0.05, rtol=0)
    (out.image_probs[:, 1].sum() + out.layer_maps[0][:, 1].mean()).backward()
    assert tiny_model.cls_proj.weight.grad is not None


def test_activation_checkpointing_gives_the_same_gradients(images, monkeypatch):
    """Frozen blocks recomputed in backward instead of stored: identical gradients, less memory."""
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    grads = []
    for checkpointing in (False, True):
        model = _model()
        model.checkpoint_activations = checkpointing
        model.train()
        out = model(images, ["bottle", "screw", "bottle"], return_layer_maps=True)
        (out.image_probs[:, 1].sum() + sum(m[:, 1].mean() for m in out.layer_maps)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 4 + 2       # the prompted visual pass: 4 blocks; the text tower: block 1, per class name
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-7, msg=name)
