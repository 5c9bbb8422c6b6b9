"""Parity of GlocalCLIP with an independent transcription of its reference code.

The transcription below is written from the reference, YUL-git/GlocalCLIP b58563a (2025-03-19):
``glocal_prompt_generator.py`` (``GlocalCLIP_PromptLearner``, ``TripletLoss``),
``GlocalCLIP_lib/GlocalCLIP.py`` (``VisionTransformer.DAPM_replace/forward``, ``Attention``,
``ResidualAttentionBlock``, ``Transformer.AnomalyCLIP_forward``, ``ResidualAttentionBlock_learnable_token``,
``encode_text_learn``), ``GlocalCLIP_lib/model_load.py`` (``compute_similarity``, ``get_similarity_map``),
``train.py`` (the loss), ``test.py`` (maps and image score), ``loss.py`` (``FocalLoss``,
``BinaryDiceLoss``), and from GLOCALCLIP_SPEC.md sections 3, 5, 6, 7 and 11. It shares nothing with
``adaclip`` except the frozen CLIP's parameters (read as plain tensors: every layer norm, attention,
MLP, the QuickGELU, the causal mask and the V-V side path are written out here) and the learned prompt
tensors. It runs image by image (batch size 1, as the reference's test loader) and is compared with our
batched forward (3 images): image scores, raw and smoothed pixel maps, text features, the training loss,
its parts, and its gradient with respect to every learned tensor.

Reference behaviour transcribed, quirk by quirk:
- vision: ``DAPM_replace(DPAM_layer)`` replaces ``resblocks[-i]``, i = 1..DPAM_layer-1 (ViT-L: 20 ->
  layers 6..24; the tiny 4-block ViT with our side_from 1: DPAM_layer 5 -> layers 1..4). The first
  replaced block starts the pair: h_k = h_{k-1} + A(ln_1(h_{k-1})), then + MLP(ln_2(h_k)), and
  v_k = h_{k-1} + VV(ln_1(h_{k-1})) written **in place** into h_{k-1}; later blocks v += VV(ln_1(h)) in
  place, no MLP, no norm of its own. VV per head softmax(V Vᵀ d^-½) V, heads concatenated, the block's
  out_proj with its bias. ``AnomalyCLIP_forward`` appends v **without** ``.clone()``: every stored entry
  is one tensor that ends as v_last (the transcription keeps the in-place updates and lets the aliasing
  happen; ``clone=True`` is AnomalyCLIP's later fix, our un-aliased layers). Tokens ln_post(v) @ proj.
- global feature: h_last[CLS] @ proj, no ln_post (``global_ln_post=True``: standard CLIP, our option).
- text: four sentences [G×n "object.", G×n G×m "damaged object.", the same with L]; input embeddings
  [SOT, ctx_*_pos, frozen suffix] and [SOT, ctx_*_pos, ctx_*_neg, frozen suffix] (the abnormal sentence
  shares its branch's n normal contexts), + positional embedding, causal mask; before text blocks
  1..depth-1 positions 1..t are overwritten by the deep prompt cast with ``.half()`` (our
  ``round_prompts_fp16``; our default keeps fp32); ln_final at argmax(token ids) @ text_projection,
  ``.float()``, chunk/stack to (1, 4, D), L2-normalised. T_g = rows 0, 1 (score), T_l = rows 2, 3 (map).
- map (test.py): per entry of ``features_list``: patch tokens normalised, ``compute_similarity``
  (elementwise product summed, /0.07, softmax over {normal, abnormal}, CLS included then dropped),
  ``get_similarity_map`` (bilinear, align_corners False) of the probabilities, (p_abn + 1 - p_norm)/2,
  **summed** over the E entries, scipy ``gaussian_filter`` sigma 8 (train.sh). Ours is that map / E: with
  our default layers=(4,) the reference is the literal ``features_list`` of four aliased entries
  (E = 4, 4·p_abn) and ours p_abn; with real layers E = len(layers).
- score: softmax(image_features @ T_gᵀ / 0.07)[:, 0, 1] (the first image of a batch; batch size 1).
- loss (train.py): CE((B, 2) logits <g, T_g>/0.07, y) + Σ_entries [Focal(M) + Dice(M_abn, m) +
  Dice(M_norm, 1-m)] (M: the (B, 2, S, S) upsampled probabilities from T_l) + alpha·(Triplet(g_n, l_n, l_a)
  + Triplet(g_a, l_a, l_n)), Triplet = mean(d(a, p)² + clamp(margin - d(a, n), 0)²),
  d = ``torch.pairwise_distance`` (‖x - y + 1e-6‖). Our seg_weight × Σ_layers equals the reference's
  Σ over entries: 4 for the four aliased entries of layers=(4,), 1 for the real layers. Focal (Hsuxu,
  gamma 2, smooth 1e-5) and BinaryDiceLoss (smooth 1, per image) as in loss.py.
"""
from __future__ import annotations

import functools

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from adaclip import methods
from helpers import assert_close_to_scale, three_image_targets

ATOL = 1e-4
S = 32
SIGMA = 8.0                     # train.sh --sigma 8
TEMP = 0.07
SOT, EOT = 49406, 49407
G_ID, L_ID, DAMAGED, OBJECT, DOT = 326, 331, 13568, 14115, 269


# ============================================================== the transcription (no adaclip code)
def layer_norm(x, mod):
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def quick_gelu(x):                                   # GlocalCLIP.py:QuickGELU
    return x * torch.sigmoid(1.702 * x)


def mlp(x, blk):
    return F.linear(quick_gelu(F.linear(x, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias)), blk.mlp.c_proj.weight,
                    blk.mlp.c_proj.bias)


def attention_pair(x, attn, mask=None):
    """x (..., L, C) -> (softmax(Q Kᵀ d^-½ + mask) V, softmax(V Vᵀ d^-½) V), each through out_proj:
    ``Attention.forward`` (one qkv projection, [x, x_ori]) and, for the first, nn.MultiheadAttention."""
    *b, L, C = x.shape
    H = attn.num_heads
    d = C // H
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(*b, L, 3, H, d)
    q, k, v = (qkv[..., i, :, :].transpose(-3, -2) for i in range(3))                 # (..., H, L, d)

    def mix(a, c, m=None):
        s = (a @ c.transpose(-1, -2)) * d ** -0.5
        return (s if m is None else s + m).softmax(dim=-1) @ v

    def merge(o):                                                                     # heads, then out_proj
        return F.linear(o.transpose(-3, -2).reshape(*b, L, C), attn.out_proj.weight, attn.out_proj.bias)

    return merge(mix(q, k, mask)), merge(mix(v, v))


def ref_encode_image(clip, image, features_list, dpam_layer, clone=False, global_ln_post=False):
    """``encode_image(image[None], features_list, DPAM_layer)`` for one image: (g (D,), [tokens (1+N, D)])."""
    vis = clip.visual
    blocks = vis.transformer.resblocks
    n = len(blocks)
    dual = {n - i + 1 for i in range(1, dpam_layer)}             # resblocks[-i] replaced, as 1-based layers
    w = vis.conv1.weight
    x = F.conv2d(image[None], w, stride=w.shape[-1])[0].flatten(1).T                  # (N, W)
    x = torch.cat([vis.class_embedding[None], x]) + vis.positional_embedding
    x = layer_norm(x, vis.ln_pre)
    out_tokens = []
    for idx, blk in enumerate(blocks, start=1):
        if idx not in dual:                                       # plain CLIP block
            x = x + attention_pair(layer_norm(x, blk.ln_1), blk.attn)[0]
            x = x + mlp(layer_norm(x, blk.ln_2), blk)
        elif isinstance(x, list):                                 # the pair continues
            v, h = x
            ori, vv = attention_pair(layer_norm(h, blk.ln_1), blk.attn)
            h += ori
            h = h + mlp(layer_norm(h, blk.ln_2), blk)
            v += vv                                               # in place: every stored entry sees it
            x = [v, h]
        else:                                                     # start of the dual path
            ori, vv = attention_pair(layer_norm(x, blk.ln_1), blk.attn)
            h = x + ori
            h = h + mlp(layer_norm(h, blk.ln_2), blk)
            x += vv                                               # in place into h_{k-1}
            x = [x, h]
        if idx in features_list:
            t = x[0] if isinstance(x, list) else x
            out_tokens.append(t.clone() if clone else t)         # the reference: no .clone()
    h = x[1] if isinstance(x, list) else x
    cls = layer_norm(h[0], vis.ln_post) if global_ln_post else h[0]
    return cls @ vis.proj, [layer_norm(t, vis.ln_post) @ vis.proj for t in out_tokens]


def ref_prompt_learner(clip, tokens, ctx, n, m):
    """``GlocalCLIP_PromptLearner.forward``: (4, 77, W) embeddings in the order [global pos, global neg,
    local pos, local neg] (``torch.cat([global_prompts, local_prompts])``) and their (4, 77) token ids."""
    emb = clip.token_embedding.weight[tokens.long()]                                  # the frozen buffers
    rows = []
    for k, side in enumerate(("global", "local")):
        pos, neg = ctx[f"ctx_{side}_pos"], ctx[f"ctx_{side}_neg"]
        normal, abnormal = emb[2 * k], emb[2 * k + 1]
        rows.append(torch.cat([normal[:1], pos, normal[1 + n:]]))                      # prefix, ctx_pos, suffix
        rows.append(torch.cat([abnormal[:1], pos, neg, abnormal[1 + n + m:]]))         # prefix, pos, neg, suffix
    return torch.stack(rows), tokens


def ref_encode_text_learn(clip, prompts, tokens, deep, t_n_ctx, half=True):
    """``encode_text_learn`` with ``ResidualAttentionBlock_learnable_token``: deep prompt ``counter``
    overwrites positions 1..t before blocks 1..len(deep), cast with ``.half()`` (promoted back by cat)."""
    x = prompts + clip.positional_embedding
    L = x.shape[1]
    mask = torch.full((L, L), float("-inf")).triu_(1)                                 # build_attention_mask
    counter = 0
    for i, blk in enumerate(clip.transformer.resblocks):
        if i != 0 and not counter > len(deep) - 1:
            ctx = deep[counter].expand(x.shape[0], -1, -1)
            ctx = ctx.half() if half else ctx
            x = torch.cat([x[:, :1], ctx, x[:, 1 + t_n_ctx:]], dim=1)
            counter += 1
        x = x + attention_pair(layer_norm(x, blk.ln_1), blk.attn, mask)[0]
        x = x + mlp(layer_norm(x, blk.ln_2), blk)
    x = layer_norm(x, clip.ln_final)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection


def ref_text_features(clip, tokens, ctx, deep, R):
    """train.py / test.py: (1, 4, D) normalised [g_n, g_a, l_n, l_a]."""
    prompts, tok = ref_prompt_learner(clip, tokens, ctx, R["n"], R["m"])
    t = ref_encode_text_learn(clip, prompts, tok, deep, R["t"], R["half"]).float()
    t = torch.stack(torch.chunk(t, dim=0, chunks=4), dim=1)
    return t / t.norm(dim=-1, keepdim=True)


def compute_similarity(image_features, text_features):
    """model_load.py:compute_similarity: (B, 1+N, 2) softmax probabilities."""
    b, n_t, n_i, c = image_features.shape[0], text_features.shape[0], image_features.shape[1], image_features.shape[2]
    feats = image_features.reshape(b, n_i, 1, c) * text_features.reshape(1, 1, n_t, c)
    return (feats.sum(-1) / TEMP).softmax(-1)


def get_similarity_map(sm, shape):
    """model_load.py:get_similarity_map: (B, N, 2) -> (B, S, S, 2), bilinear (align_corners False)."""
    side = int(sm.shape[1] ** 0.5)
    sm = sm.reshape(sm.shape[0], side, side, -1).permute(0, 3, 1, 2)
    sm = F.interpolate(sm, (shape, shape), mode="bilinear", align_corners=False)
    return sm.permute(0, 2, 3, 1)


def ref_test_image(clip, image, text, R):
    """test.py for one image (batch size 1): (score, raw summed map (S, S), smoothed map (S, S))."""
    g, patch_features = ref_encode_image(clip, image, R["features_list"], R["dpam"], R["clone"], R["ln_post"])
    image_features = g[None] / g[None].norm(dim=-1, keepdim=True)                      # (1, D)
    global_text, local_text = text[:, :2, :], text[:, 2:, :]
    text_probs = ((image_features @ global_text.permute(0, 2, 1)) / TEMP).softmax(-1)[:, 0, 1]
    anomaly_map_list = []
    for patch_feature in patch_features:                       # --feature_map_layer 0 1 2 3: every entry
        patch_feature = patch_feature[None]
        patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
        similarity = compute_similarity(patch_feature, local_text[0])
        similarity_map = get_similarity_map(similarity[:, 1:, :], image.shape[-1])
        anomaly_map_list.append((similarity_map[..., 1] + 1 - similarity_map[..., 0]) / 2.0)
    raw = torch.stack(anomaly_map_list).sum(dim=0)[0]
    smooth = torch.from_numpy(gaussian_filter(raw.detach().numpy().astype(np.float32), sigma=R["sigma"]))
    return text_probs[0], raw, smooth


def focal_loss(logit, target):
    """loss.py:FocalLoss() on probabilities: alpha None (ones), gamma 2, smooth 1e-5, mean."""
    num_class = logit.shape[1]
    logit = logit.reshape(logit.size(0), num_class, -1).permute(0, 2, 1).reshape(-1, num_class)
    target = torch.squeeze(target, 1).reshape(-1, 1)
    alpha = torch.ones(num_class, 1)
    idx = target.long()
    one_hot_key = torch.zeros(target.size(0), num_class).scatter_(1, idx, 1)
    one_hot_key = torch.clamp(one_hot_key, 1e-5 / (num_class - 1), 1.0 - 1e-5)
    pt = (one_hot_key * logit).sum(1) + 1e-5
    alpha = torch.squeeze(alpha[idx])
    return (-1 * alpha * torch.pow(1 - pt, 2) * pt.log()).mean()


def dice_loss(inp, targets):
    """loss.py:BinaryDiceLoss."""
    N = targets.size()[0]
    a, b = inp.reshape(N, -1), targets.reshape(N, -1)
    return 1 - ((2 * (a * b).sum(1) + 1) / (a.sum(1) + b.sum(1) + 1)).sum() / N


def triplet_loss(anchor, positive, negative, margin):
    """glocal_prompt_generator.py:TripletLoss."""
    pos_dist = torch.pairwise_distance(anchor, positive, keepdim=True)
    neg_dist = torch.pairwise_distance(anchor, negative, keepdim=True)
    return torch.mean(pos_dist ** 2 + torch.clamp(margin - neg_dist, min=0.0) ** 2)


def ref_train_loss(clip, imgs, label, gt, tokens, ctx, deep, R):
    """train.py for one batch: vision image by image (stacked), the four text features once.
    Returns (total, image_loss, seg, contrastive)."""
    with torch.no_grad():
        enc = [ref_encode_image(clip, img, R["features_list"], R["dpam"], R["clone"], R["ln_post"]) for img in imgs]
        image_features = torch.stack([e[0] for e in enc])
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        patch_features = [torch.stack([e[1][j] for e in enc]) for j in range(len(enc[0][1]))]
    text_features = ref_text_features(clip, tokens, ctx, deep, R)
    global_text, local_text = text_features[:, :2, :], text_features[:, 2:, :]
    text_probs = (image_features.unsqueeze(1) @ global_text.permute(0, 2, 1))[:, 0, ...] / TEMP
    image_loss = F.cross_entropy(text_probs.squeeze(), label.long())
    similarity_map_list = []
    for patch_feature in patch_features:
        patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
        similarity = compute_similarity(patch_feature, local_text[0])
        similarity_map_list.append(get_similarity_map(similarity[:, 1:, :], imgs.shape[-1]).permute(0, 3, 1, 2))
    loss_normal = triplet_loss(global_text[:, 0, :], local_text[:, 0, :], local_text[:, 1, :], R["margin"])
    loss_abnormal = triplet_loss(global_text[:, 1, :], local_text[:, 1, :], local_text[:, 0, :], R["margin"])
    contrastive = loss_normal + loss_abnormal
    seg = 0
    for sm in similarity_map_list:
        seg = seg + focal_loss(sm, gt) + dice_loss(sm[:, 1, :, :], gt) + dice_loss(sm[:, 0, :, :], 1 - gt)
    return seg + image_loss + R["alpha"] * contrastive, image_loss, seg, contrastive


def ref_sentences(n, m):
    """The prompt learner's sentences: prefix + " " + template.format("object") + "."."""
    out = []
    for side in ("G", "L"):
        pos, neg = " ".join([side] * n), " ".join([side] * m)
        out += [pos + " " + "{}".format("object") + ".", pos + " " + neg + " " + "damaged {}".format("object") + "."]
    return out


# ============================================================== settings and fixtures
CASES = [  # (our config fields, the reference's setting: features_list on the tiny ViT, .clone(), ...)
    ("default", {}, dict(features_list=(1, 2, 3, 4), clone=False)),      # 4 aliased entries, like 6 12 18 24
    ("real-4-layers", dict(layers=(1, 2, 3, 4)), dict(features_list=(1, 2, 3, 4), clone=True)),
    ("real-3-layers", dict(layers=(2, 3, 4), seg_weight=1.0), dict(features_list=(2, 3, 4), clone=True)),
    ("alias-3-layers", dict(layers=(2, 3, 4), alias_layers=True, seg_weight=1.0),
     dict(features_list=(2, 3, 4), clone=False)),
    ("alias-4-layers", dict(layers=(1, 2, 3, 4), alias_layers=True), dict(features_list=(1, 2, 3, 4), clone=False)),
    ("margin", dict(margin=1.7), dict(features_list=(1, 2, 3, 4), clone=False, margin=1.7)),   # both pushes active
    ("fp16-deep", dict(round_prompts_fp16=True), dict(features_list=(1, 2, 3, 4), clone=False, half=True)),
    ("global-ln-post", dict(global_ln_post=True), dict(features_list=(1, 2, 3, 4), clone=False, ln_post=True)),
    ("alpha", dict(glocal_weight=0.3), dict(features_list=(1, 2, 3, 4), clone=False, alpha=0.3)),
    # other lengths; margin 1.25 activates one push term of the two (the other one clamped at 0)
    ("lengths-margin-alpha", dict(n_ctx=3, ab_ctx=5, deep_length=3, margin=1.25, glocal_weight=2.0, layers=(3, 4),
                                  seg_weight=1.0), dict(features_list=(3, 4), clone=True, margin=1.25, alpha=2.0)),
]
# what flipping the case's own setting in the transcription must change by more than 10 x ATOL
CONTRAST = {"default": dict(clone=True), "real-4-layers": dict(clone=False), "real-3-layers": dict(clone=False),
            "alias-3-layers": dict(clone=True), "alias-4-layers": dict(clone=True), "margin": dict(margin=0.0),
            "fp16-deep": dict(half=False), "global-ln-post": dict(ln_post=False), "alpha": dict(alpha=1.0),
            "lengths-margin-alpha": dict(margin=0.0)}


def build(over, seed=0):
    """A tiny GlocalCLIP with every learned tensor far from its init and non-trivial frozen biases and
    norms (a random open_clip init has zero attention biases and unit norms, which would hide bugs)."""
    cls = methods.get("glocalclip")
    cfg = cls.tiny_config()
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(1234)
    m = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.ctx_global_pos, m.ctx_global_neg, m.ctx_local_pos, m.ctx_local_neg):
            p.add_(0.4 * torch.randn(p.shape, generator=gen))
        # deep prompts on a common offset that ln_1 removes: fp16's spacing at 100 (2^-4) is large against
        # the spread that remains (std 2), so the reference's .half() rounding moves the text features
        for p in m.deep:
            p.copy_(100.0 + 2.0 * torch.randn(p.shape, generator=gen))
        for name, p in m.clip.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return m.eval()


def ref_setting(m, R):
    cfg, n_vis = m.cfg, len(m.clip.visual.transformer.resblocks)
    dpam = n_vis - cfg.side_from + 2                      # resblocks[-1..-(dpam-1)]: layers side_from..n_vis
    assert cfg.side_from == 1 and dpam == 5               # the tiny ViT's quarter, as 6 of 24
    out = dict(n=cfg.n_ctx, m=cfg.ab_ctx, t=cfg.deep_length, dpam=dpam, sigma=SIGMA, half=False, ln_post=False,
               margin=0.0, alpha=1.0)
    out.update(R)
    return out


def learned(m, grad=False):
    """The learned tensors as the reference's prompt learner would hold them (fresh leaves)."""
    take = lambda p: p.detach().clone().requires_grad_(grad)  # noqa: E731
    ctx = {k: take(getattr(m, k)) for k in ("ctx_global_pos", "ctx_global_neg", "ctx_local_pos", "ctx_local_neg")}
    return ctx, [take(p) for p in m.deep]


@functools.lru_cache(maxsize=None)
def tokenizer():
    return open_clip.get_tokenizer("adaclip-tiny")


def ref_tokens(m):
    return tokenizer()(ref_sentences(m.cfg.n_ctx, m.cfg.ab_ctx))


def images(n=3, seed=1):
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def batch_targets(S=S):
    return three_image_targets(S)


def ref_eval(m, imgs, R):
    tokens = ref_tokens(m)
    ctx, deep = learned(m)
    with torch.no_grad():
        text = ref_text_features(m.clip, tokens, ctx, deep, R)
        per = [ref_test_image(m.clip, img, text, R) for img in imgs]
    return text, torch.stack([p[0] for p in per]), torch.stack([p[1] for p in per]), torch.stack([p[2] for p in per])


# ============================================================== tests
@pytest.mark.parametrize("name,over,R", CASES, ids=[c[0] for c in CASES])
def test_parity(name, over, R):
    m = build(over)
    R = ref_setting(m, R)
    E = len(R["features_list"])               # the reference's entries; ours divides their sum by E
    imgs = images()

    # ---- zero-shot: text features, image scores, pixel maps
    with torch.no_grad():
        out = m(imgs, "object", return_details=True)
        ours_text = m.text_features()
    text, score, raw, smooth = ref_eval(m, imgs, R)
    assert ours_text.shape == (1, text.shape[-1], 4)
    torch.testing.assert_close(ours_text.transpose(1, 2).float(), text, atol=ATOL, rtol=0)
    # the comparison means something: maps that vary, scores off the 0/1 rails
    assert float((raw / E).std()) > 1e-2 and 1e-3 < float(score.min()) and float(score.max()) < 1 - 1e-3, (raw, score)
    assert float(raw.max()) <= E and float(out.pixel_scores.max()) <= 1
    torch.testing.assert_close(out.image_scores.float(), score, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.details["raw_pixel_scores"].float(), raw / E, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pixel_scores.float(), smooth / E, atol=ATOL, rtol=0)

    # ---- training: loss, its parts, its gradient with respect to every learned tensor
    labels, masks, targets = batch_targets()
    params = [m.ctx_global_pos, m.ctx_global_neg, m.ctx_local_pos, m.ctx_local_neg, *m.deep]
    m.train()
    out = m(imgs, "object", targets=targets)
    m.eval()
    grads = torch.autograd.grad(out.loss, params)
    ctx, deep = learned(m, grad=True)
    total, image_loss, seg, contrastive = ref_train_loss(m.clip, imgs, labels, masks, ref_tokens(m), ctx, deep, R)
    ref_grads = torch.autograd.grad(total, [*ctx.values(), *deep])
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.detach().float(), total.detach(), atol=ATOL, rtol=0)
    parts = out.loss_parts
    assert abs(parts["image_focal"] - float(image_loss.detach())) < ATOL
    assert abs(m.cfg.seg_weight * parts["segmentation"] - float(seg.detach())) < ATOL
    assert abs(parts["glocal"] - float(contrastive.detach())) < ATOL
    names = [*ctx] + [f"deep.{i}" for i in range(len(deep))]
    for what, g, r in zip(names, grads, ref_grads):
        assert float(r.abs().max()) > 0, what                      # every learned tensor receives a gradient
        # the reference's .half() also rounds the deep prompts' gradient to fp16 (the cast's backward):
        # per sentence there (expand, then .half()), once after the sum over the four sentences here, so
        # the two agree to fp16's resolution (2^-10 relative), not to float32's
        rel = 2e-3 if R["half"] and what.startswith("deep") else 1e-4
        assert_close_to_scale(g, r, f"{name}: d loss / d {what}", rel=rel)

    # ---- the case's own setting matters at this tolerance: flipped in the transcription, it moves
    # the scores, maps or loss by far more than ATOL
    if name in CONTRAST:
        R2 = {**R, **CONTRAST[name]}
        text2, score2, raw2, _ = ref_eval(m, imgs, R2)
        ctx, deep = learned(m)
        with torch.no_grad():
            total2 = ref_train_loss(m.clip, imgs, labels, masks, ref_tokens(m), ctx, deep, R2)[0]
        moved = max(float((score2 - score).abs().max()), float((raw2 - raw).abs().max()) / E,
                    float((text2 - text).abs().max()), abs(float(total2) - float(total.detach())))
        assert moved > 10 * ATOL, (name, moved)


def test_tokens_and_sentences():
    """The four sentences' ids are the reference's: SOT, n x G (326), 'object.', EOT at n + 3; SOT,
    (n + m) x G, 'damaged object.', EOT at n + m + 4; the same with L (331)."""
    for over in ({}, dict(n_ctx=3, ab_ctx=5, deep_length=3)):
        m = build(over)
        n, k = m.cfg.n_ctx, m.cfg.ab_ctx
        tok = ref_tokens(m)
        assert torch.equal(m.tokens.long(), tok.long())
        for row, side in ((0, G_ID), (2, L_ID)):
            assert tok[row, :n + 4].tolist() == [SOT] + [side] * n + [OBJECT, DOT, EOT]
            assert tok[row + 1, :n + k + 5].tolist() == [SOT] + [side] * (n + k) + [DAMAGED, OBJECT, DOT, EOT]
            assert int(tok[row].argmax()) == n + 3 and int(tok[row + 1].argmax()) == n + k + 4
            assert not tok[row, n + 4:].any() and not tok[row + 1, n + k + 5:].any()


def test_transcription_guards():
    """The transcription's plain towers are open_clip's: its text tower (no learned contexts, no deep
    prompts) equals ``encode_text`` of an ordinary sentence, its vision (no side path, ln_post) equals
    ``encode_image``; its half cast rounds; its aliasing makes every entry the last layer."""
    m = build({})
    tok = tokenizer()(["a photo of a damaged object.", "G G G object."])
    imgs = images(2, seed=7)
    with torch.no_grad():
        emb = m.clip.token_embedding.weight[tok]
        ref = F.normalize(ref_encode_text_learn(m.clip, emb, tok, [], 0), dim=-1)
        torch.testing.assert_close(ref, m.clip.encode_text(tok, normalize=True), atol=1e-5, rtol=0)
        for img, ours in zip(imgs, m.clip.encode_image(imgs)):
            g, _ = ref_encode_image(m.clip, img, (), dpam_layer=1, global_ln_post=True)
            torch.testing.assert_close(g, ours, atol=1e-5, rtol=0)
        # with the side path the original stream is unchanged: the same global feature
        g_side, entries = ref_encode_image(m.clip, imgs[0], (1, 2, 3, 4), dpam_layer=5, global_ln_post=True)
        torch.testing.assert_close(g_side, m.clip.encode_image(imgs[:1])[0], atol=1e-5, rtol=0)
        assert all(torch.equal(e, entries[-1]) for e in entries)             # no .clone(): one tensor
        _, real = ref_encode_image(m.clip, imgs[0], (1, 2, 3, 4), dpam_layer=5, clone=True)
        torch.testing.assert_close(real[-1], entries[-1], atol=1e-6, rtol=0)
        assert min(float((r - real[-1]).abs().max()) for r in real[:-1]) > 1e-2
        # .half() in the deep prompt rounds (the prompt values are not fp16-representable)
        p = m.deep[0].detach()
        assert float((p.half().float() - p).abs().max()) > 1e-4
        assert torch.cat([p[:1], p.half()]).dtype == torch.float32


def test_settings_that_coincide():
    """Our default (layers=(4,), seg_weight 4) is the reference's four aliased entries: identical to our
    literal aliasing of (1, 2, 3, 4) with seg_weight 1, in scores, maps and loss."""
    a, b = build({}), build(dict(layers=(1, 2, 3, 4), alias_layers=True))
    assert a.cfg.layers == (4,) and a.cfg.seg_weight == 4.0 and b.cfg.seg_weight == 1.0
    imgs = images()
    _, _, targets = batch_targets()
    with torch.no_grad():
        oa, ob = a(imgs, "object"), b(imgs, "object")
        torch.testing.assert_close(oa.image_scores, ob.image_scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(oa.pixel_scores, ob.pixel_scores, atol=1e-6, rtol=0)
        a.train(), b.train()
        la, lb = a(imgs, "object", targets=targets).loss, b(imgs, "object", targets=targets).loss
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)


@pytest.mark.parametrize("margin", [0.0, 0.5, 3.0])
def test_glocal_term_in_float64(margin):
    """Our glocal term is the reference's TripletLoss to float64 precision, including pairwise_distance's
    eps (1e-6 added to the difference: invisible at the loss' float32 tolerance, visible here) and the
    squared clamp of the push term (inactive at margin 0 and 0.5, the distances being ~1.4; active at 3)."""
    m = build({})
    m.cfg.margin = margin
    gen = torch.Generator().manual_seed(11)
    a, p, n = (F.normalize(torch.randn(1, 32, generator=gen, dtype=torch.float64), dim=-1) + 0.3 for _ in range(3))
    ours = m.glocal_term(a, p, n)
    ref = triplet_loss(a, p, n, margin)
    assert abs(float(ours) - float(ref)) < 1e-12
    no_eps = torch.mean((a - p).norm(dim=-1) ** 2 + torch.clamp(margin - (a - n).norm(dim=-1), min=0.0) ** 2)
    assert abs(float(ref) - float(no_eps)) > 1e-9                 # the eps is resolved at this precision
    pull = torch.mean(torch.pairwise_distance(a, p, keepdim=True) ** 2)
    assert (float(ref) > float(pull) + 0.1) == (margin > 2)       # the push term: active only at margin 3
