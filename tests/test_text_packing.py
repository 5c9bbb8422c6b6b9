"""The packed text pass (shared prefix, cached layer 0, no padding) equals the plain one."""
import pytest
import torch

from adaclip import AdaCLIP, AdaCLIPConfig, PromptCfg
from adaclip.backbone import text_packing
from adaclip.backbone import encode_text


def _model(length, depth=2, type="SD"):
    torch.manual_seed(0)
    cfg = AdaCLIPConfig.tiny()
    cfg.prompts = PromptCfg(depth=depth, length=length, type=type)
    model = AdaCLIP.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.learnable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("length, depth", [(2, 2), (5, 2), (9, 2)])
def test_packed_equals_plain_text_pass(length, depth):
    """L = 9 puts some sentences' end token inside the prompt (their feature is the prefix's)."""
    model = _model(length, depth)
    names = ["bottle", "metal-nut", "bottle"]
    with torch.no_grad():
        dyn = model.text_prompts.generate(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)))
        prompts = model.text_prompts.layer_prompts(dyn)                             # (3, L, Wt) per layer
        packed = model._encode_packed(names, prompts)
        tokens = torch.stack([model._tokens_for(c) for c in names])
        plain = encode_text(model.clip, tokens, prompts)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    if length == 9:
        assert any(e <= 9 for e in model._tokens_for("bottle").argmax(-1).tolist())


def test_packed_equals_plain_at_the_paper_depth():
    """A 12-layer text tower (ViT-B-32, random weights) with the paper's prompts: depth 4, length 5."""
    from adaclip import BackboneCfg, FusionCfg
    torch.manual_seed(0)
    cfg = AdaCLIPConfig(backbone=BackboneCfg(name="ViT-B-32", pretrained=None, image_size=32),
                        fusion=FusionCfg(use_hsf=False))
    model = AdaCLIP.from_config(cfg).eval()
    with torch.no_grad():
        prompts = model.text_prompts.layer_prompts(model.text_prompts.generate(torch.randn(2, 512)))
        packed = model._encode_packed(["bottle", "pill"], prompts)
        plain = encode_text(model.clip, torch.stack([model._tokens_for(c) for c in ("bottle", "pill")]), prompts)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)


def test_packing_keeps_each_distinct_token_prefix_once():
    model = _model(5)
    tokens = model._tokens_for("bottle")
    packing = text_packing.Packing.build(tokens, 5)
    ids, eot = tokens.tolist(), tokens.argmax(-1).tolist()
    distinct = {tuple(ids[s][:p + 1]) for s, e in enumerate(eot) for p in range(6, e + 1)}
    assert packing.mask.shape[0] == 6 + len(distinct)
    assert packing.mask.shape[0] < sum(e + 1 for e in eot) / 2          # far fewer than the sentences' tokens
    for s, e in enumerate(eot):                                         # the end token sees the prompt prefix
        row = packing.mask[packing.eot_index[s]]                        # and exactly its own e - 5 tokens
        assert row[:6].all() and int(row[6:].sum()) == e - 5
    # two sentences that start alike share those positions
    a, b = next((s, t) for s in range(len(ids)) for t in range(s + 1, len(ids))
                if ids[s][:9] == ids[t][:9] and min(eot[s], eot[t]) > 9)
    shared = packing.mask[packing.eot_index[a], 6:] & packing.mask[packing.eot_index[b], 6:]
    assert int(shared.sum()) >= 9 - 6


def test_layer0_is_computed_once_per_class_name():
    model = _model(2)
    calls = []
    original = text_packing.layer0
    text_packing.layer0 = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            for seed in range(3):
                model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)), ["bottle", "screw"])
    finally:
        text_packing.layer0 = original
    assert len(calls) == 2                                  # bottle and screw, once each


def _grads(model, images, names):
    model.train()
    out = model(images, names, return_layer_maps=True)
    (out.image_probs[:, 1].sum() + out.layer_maps[0][:, 1].mean()).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_packed_pass_trains(images):
    """The packed pass gives the plain text pass's gradients (not only some gradient): every
    learnable parameter, two class names in one batch. (With recomputation in backward the same:
    test_model's activation-checkpointing test.)"""
    names = ["bottle", "screw", "bottle"]
    packed, plain = _model(3), _model(3)
    plain._packable = False                                 # the plain pass: backbone.encode_text
    calls = []
    original = text_packing.encode_text_packed
    text_packing.encode_text_packed = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        got = _grads(packed, images, names)
    finally:
        text_packing.encode_text_packed = original
    assert calls                                            # the packed pass did run
    want = _grads(plain, images, names)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] is None) == (want[name] is None), name
        if want[name] is not None:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
    assert packed.text_prompts.static[1].grad.abs().sum() > 0
    assert packed.text_prompts.dynamic[0].weight.grad.abs().sum() > 0


def _layer0_float32(clip, tokens):
    """Layer 0 of the unprompted text tower over the full context, in float32 (no autocast, no
    truncation: attention is causal, so the first positions equal the truncated pass's)."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        x = clip.token_embedding(tokens).float() + clip.positional_embedding.float()
        return clip.transformer.resblocks[0](x, attn_mask=clip.attn_mask)


def test_cached_layer0_serves_autocast_and_full_precision(images):
    """The cache filled under (CPU) bf16 autocast still serves a float32 call, and the reverse."""
    model = _model(2)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(images, "bottle").pixel_scores
        full = model(images, "bottle").pixel_scores
    assert full.dtype == mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full, atol=0.05, rtol=0)


def test_layer0_cached_under_autocast_is_the_float32_one(images):
    """A first call under bf16 autocast fills the layer-0 cache: it must hold the float32 layer 0
    (bf16 there would be off by ~3e-2 and then serve every later float32 call)."""
    model = _model(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images, "bottle")
    (first, _), = model._packed.values()
    tokens = model._tokens_for("bottle")
    expected = _layer0_float32(model.clip, tokens)[:, :first.shape[1]]
    assert first.dtype == torch.float32
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    # and the float32 call after it equals one on a model whose cache never saw autocast
    with torch.no_grad():
        after = model(images, "bottle").pixel_scores
        fresh = _model(2)(images, "bottle").pixel_scores
    torch.testing.assert_close(after, fresh, atol=1e-5, rtol=1e-5)
