"""Parity of AnomalyCLIP and Crane with an independent transcription of their reference code.

The transcription below is written from the references (zqhang/AnomalyCLIP 45ed4dd:
``AnomalyCLIP_lib/AnomalyCLIP.py``, ``prompt_ensemble.py``, ``test.py``, ``train.py``, ``loss.py``;
AlirezaSalehy/Crane 39181f9: ``models/Crane.py``, ``models/prompt_ensemble.py``, ``train.py``,
``test.py``, ``utils/{loss,similarity}.py``) and from ANOMALYCLIP_CRANE_AACLIP_SPEC.md sections 0-2.
It shares nothing with ``adaclip.methods`` except the frozen CLIP's parameters (read as plain
tensors: every layer norm, attention, MLP, the QuickGELU and the causal mask are written out here)
and the learned prompt parameters. It runs image by image (batch size 1, as the references'
loaders at test) and is compared with our batched forward: image scores, pixel maps, text features
and training losses within 1e-4.

Reference behaviour transcribed, quirk by quirk:
- vision: original path h is plain CLIP; the side path starts at layer ``side_from`` with
  v_{side_from-1} = h_{side_from-1} and v_k = v_{k-1} + A_k(ln_1,k(h_{k-1})), no MLP, where A_k is
  per head softmax(V Vᵀ d^-½) V (AnomalyCLIP ``Attention``) or
  [softmax(Q Qᵀ d^-½) + softmax(K Kᵀ d^-½) + softmax(V Vᵀ d^-½)] V (Crane ``SelfCorAttention``,
  'qq+kk+vv', not renormalised), heads concatenated, then the block's out_proj with its bias once.
  Patch tokens: ln_post(v_k) @ proj (h_k for a layer before the side path), CLS dropped. Without
  ``.clone()`` (the references' historical aliasing) every listed side-path layer is the last one.
- global feature: AnomalyCLIP h_L[CLS] @ proj (no ln_post), Crane ln_post(h_L)[CLS] @ proj.
- text: SOT, 12 learned contexts, the frozen embeddings of "object." / "damaged object." and
  padding, + positional embedding; before text blocks 1..depth-1 positions 1..4 are overwritten by
  the deep prompt (``.half()`` in the reference: our ``round_prompts_fp16``); ln_final at the EOT
  (argmax of the token ids) @ text_projection, L2-normalised. Crane in training inserts the
  normalised global feature after the contexts (``pad_suffix``): the rest shifts by one, the last
  padding is dropped, the token-id row is shifted the same way (EOT argmax one later).
- map: softmax(P Tᵀ / 0.07) per patch, bilinear upsampling of the probabilities
  (align_corners=False), p_abn ((p_abn + 1 - p_norm)/2 in AnomalyCLIP's test.py), summed over the
  used layers (Crane: ``soft_mean`` mean), scipy gaussian_filter sigma 4. Ours divides the
  AnomalyCLIP sum by the number of layers (a monotone rescale into [0, 1]).
- score: AnomalyCLIP softmax(<g, T>/0.07)[abn]; Crane score-based pooling: P̄ = mean over entries
  of the normalised patch features, a = softmax(mean over entries of the patch logits)[abn],
  c = normalise(Σ a P̄), g' = normalise(0.5 c + 0.5 g), softmax(<g', T>/0.07)[abn] (test.py at HEAD
  uses ``calc_similarity_logits``' default 0.07 for the image logits).
- loss: AnomalyCLIP CE(<g,T>/0.07, y) + 4 Σ_layers [Focal(M) + Dice(M_abn, m) + Dice(M_norm, 1-m)];
  Crane 2 Σ_entries [Focal(M) + Dice((1 - M_norm + M_abn)/2, m)] + 0.2 CE(<g'_b, T_b>/0.01, y)
  with per-image text T_b (context token), M upsampled nearest (``--interpolation`` default) or
  bilinear. Released Crane trains ``--features_list 6 12 18 24`` whose four entries alias layer 24:
  our ``layers=(24,)``, ``seg_weight=8``. Focal (Hsuxu) and BinaryDiceLoss (VAND) as in loss.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from adaclip import methods
from helpers import three_image_targets

FIXTURES = Path(__file__).parent / "fixtures" / "crane"
RELEASED = FIXTURES / "trained_on_mvtec_crane" / "epoch_5.pth"
open_clip.add_model_config(FIXTURES / "crane-test-clip.json")
TINY = dict(backbone=dict(name="adaclip-tiny", pretrained=None, image_size=32), layers=(4,), side_from=2, deep_depth=2)
CRANE_TEST = dict(backbone=dict(name="crane-test-clip", pretrained=None, image_size=32), layers=(4,), side_from=2,
                  deep_depth=9)
ATOL = 1e-4
N_CTX, DEEP_LEN = 12, 4
SENTENCES = ["X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object."]
SOT, EOT = 49406, 49407


# ============================================================== the transcription (no adaclip code)
def layer_norm(x, mod):
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def mlp(x, blk):
    hid = quick_gelu(F.linear(x, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias))
    return F.linear(hid, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)


def heads_qkv(x, attn):
    """x (L, C) one sequence -> q, k, v (H, L, d) from the block's packed in_proj."""
    L, C = x.shape
    H = attn.num_heads
    d = C // H
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).split(C, dim=-1)
    split = lambda t: t.reshape(L, H, d).transpose(0, 1)  # noqa: E731
    return split(q), split(k), split(v), d


def softmax_attn(a, b, d, mask=None):
    s = (a @ b.transpose(-1, -2)) * d ** -0.5
    if mask is not None:
        s = s + mask
    return s.softmax(dim=-1)


def out_proj(o, attn):
    H, L, d = o.shape
    return F.linear(o.transpose(0, 1).reshape(L, H * d), attn.out_proj.weight, attn.out_proj.bias)


def attention(x, attn, mask=None):
    q, k, v, d = heads_qkv(x, attn)
    return out_proj(softmax_attn(q, k, d, mask) @ v, attn)


def side_attention(x, attn, kind):
    q, k, v, d = heads_qkv(x, attn)
    if kind == "vv":              # AnomalyCLIP: Q and K replaced by V, same scale
        w = softmax_attn(v, v, d)
    elif kind == "qq+kk+vv":      # Crane E-Attn: a sum of three row-stochastic matrices, rows sum to 3
        w = softmax_attn(v, v, d) + softmax_attn(k, k, d) + softmax_attn(q, q, d)
    else:
        raise ValueError(kind)
    return out_proj(w @ v, attn)


def ref_vision(clip, image, P):
    """One image (3, S, S) -> g (D,) normalised and the normalised patch tokens (N, D) per used entry."""
    vis = clip.visual
    w = vis.conv1.weight
    x = F.conv2d(image[None], w, stride=w.shape[-1])[0].flatten(1).T           # (N, W)
    x = torch.cat([vis.class_embedding[None], x]) + vis.positional_embedding
    h = layer_norm(x, vis.ln_pre)
    hs, vs, v = {}, {}, None
    for k, blk in enumerate(vis.transformer.resblocks, start=1):
        a = layer_norm(h, blk.ln_1)                      # both paths read the original stream
        if k >= P["side_from"]:
            v = (h if v is None else v) + side_attention(a, blk.attn, P["kind"])
            vs[k] = v
        h = h + attention(a, blk.attn)
        h = h + mlp(layer_norm(h, blk.ln_2), blk)
        hs[k] = h
    last = len(vis.transformer.resblocks)
    tokens = []
    for layer in P["layers"]:
        if layer >= P["side_from"]:
            t = vs[last] if P["alias"] else vs[layer]   # no .clone(): every side entry ends as the last
        else:
            t = hs[layer]
        t = layer_norm(t, vis.ln_post) @ vis.proj
        tokens.append(F.normalize(t[1:], dim=-1))
    cls = layer_norm(h[0], vis.ln_post) if P["global_ln_post"] else h[0]
    return F.normalize(cls @ vis.proj, dim=-1), tokens


def ref_sentence(clip, ctx, tokens=None, prefix=None, suffix=None, img_token=None):
    """Input embeddings (77, W) and token ids (77,) of one sentence: SOT, contexts, frozen rest; the
    image token (Crane ``pad_suffix``) after the contexts, last padding dropped, token row shifted."""
    emb = clip.token_embedding.weight[tokens.long()]
    prefix = emb[:1] if prefix is None else prefix
    suffix = emb[1 + N_CTX:] if suffix is None else suffix
    emb = torch.cat([prefix, ctx, suffix])
    if img_token is not None:
        i = 1 + N_CTX
        emb = torch.cat([emb[:i], img_token[None], emb[i:-1]])
        tokens = torch.cat([tokens[:i], tokens[i:i + 1], tokens[i:-1]])
    return emb, tokens


def ref_encode_text(clip, emb, tokens, deep, half, truncate=True):
    """``truncate``: only positions 0..EOT, exact under the causal mask (no position sees a later
    one), and 4-5x less work than 77 (the 768-wide tower of the released-prompts test)."""
    eot = int(tokens.argmax())
    L = eot + 1 if truncate else emb.shape[0]
    mask = torch.full((L, L), float("-inf")).triu(1)
    x = emb[:L] + clip.positional_embedding[:L]
    for i, blk in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep):                         # overwrite, before text blocks 1..depth-1
            p = deep[i - 1]
            x = torch.cat([x[:1], p.half().float() if half else p, x[1 + DEEP_LEN:]])
        x = x + attention(layer_norm(x, blk.ln_1), blk.attn, mask)
        x = x + mlp(layer_norm(x, blk.ln_2), blk)
    return F.normalize(layer_norm(x[eot], clip.ln_final) @ clip.text_projection, dim=-1)


def ref_text(clip, prompts, P, img_token=None, truncate=True):
    """(2, D): [normal, abnormal], each sentence through the text tower on its own."""
    feats = []
    for s in range(2):
        emb, tok = ref_sentence(clip, prompts["ctx"][s], prompts["tokens"][s], prompts["prefix"][s],
                                prompts["suffix"][s], img_token)
        feats.append(ref_encode_text(clip, emb, tok, prompts["deep"], P["half"], truncate))
    return torch.stack(feats)


def upsample(p, S, mode):
    """(N, 2) patch probabilities -> (2, S, S)."""
    G = int(round(p.shape[0] ** 0.5))
    grid = p.T.reshape(1, 2, G, G)
    kw = dict(align_corners=False) if mode == "bilinear" else {}
    return F.interpolate(grid, (S, S), mode=mode, **kw)[0]


def ref_image(clip, image, prompts, P, T=None):
    """One image at test: (score, smoothed map (S, S), raw map, g, text used)."""
    S = image.shape[-1]
    g, tokens = ref_vision(clip, image, P)
    if T is None:
        T = ref_text(clip, prompts, P, img_token=g if P["context_at_test"] else None)
    logits = [t @ T.T / P["temp"] for t in tokens]                      # (N, 2) per entry
    maps = [upsample(lg.softmax(-1), S, "bilinear") for lg in logits]
    if P["pooling"]:        # Crane: soft_mean True, score-based pooling
        raw = torch.stack(maps).mean(0)[1]
        pbar = torch.stack(tokens).mean(0)
        a = torch.stack(logits).mean(0).softmax(-1)[:, 1:]
        c = F.normalize((pbar * a).sum(0), dim=-1)
        g2 = F.normalize(P["pool_w"] * c + (1 - P["pool_w"]) * g, dim=-1)
        score = (g2 @ T.T / P["temp"]).softmax(-1)[1]
    else:                   # AnomalyCLIP: sum over the layers of (p_abn + 1 - p_norm) / 2
        raw = sum((m[1] + 1 - m[0]) / 2 for m in maps) / len(maps)
        score = (g @ T.T / P["temp"]).softmax(-1)[1]
    smooth = torch.from_numpy(gaussian_filter(raw.detach().numpy().astype(np.float32), sigma=P["sigma"]))
    return score, smooth, raw, g, T


def focal_loss(p, target):
    """Hsuxu FocalLoss as in loss.py: probabilities in, gamma 2, alpha 1, smooth 1e-5."""
    B, C = p.shape[:2]
    logit = p.reshape(B, C, -1).permute(0, 2, 1).reshape(-1, C)
    idx = target.reshape(-1, 1).long()
    one_hot = torch.zeros(idx.shape[0], C).scatter_(1, idx, 1).clamp(1e-5 / (C - 1), 1.0 - 1e-5)
    pt = (one_hot * logit).sum(1) + 1e-5
    return (-1 * torch.pow(1 - pt, 2) * pt.log()).mean()


def dice_loss(inp, target):
    N = target.shape[0]
    a, b = inp.reshape(N, -1), target.reshape(N, -1)
    return 1 - ((2 * (a * b).sum(1) + 1) / (a.sum(1) + b.sum(1) + 1)).sum() / N


def ref_loss(clip, images, labels, masks, prompts, P):
    """The training loss of a batch, every image forwarded on its own."""
    S = images.shape[-1]
    per = []
    for img in images:
        g, tokens = ref_vision(clip, img, P)
        T = ref_text(clip, prompts, P, img_token=g if P["context_train"] else None)
        logits = [t @ T.T / P["temp"] for t in tokens]
        maps = [upsample(lg.softmax(-1), S, P["train_upsample"]) for lg in logits]
        if P["pooling"]:
            pbar = torch.stack(tokens).mean(0)
            a = torch.stack(logits).mean(0).softmax(-1)[:, 1:]
            c = F.normalize((pbar * a).sum(0), dim=-1)
            g = F.normalize(P["pool_w"] * c + (1 - P["pool_w"]) * g, dim=-1)
        per.append((g @ T.T / P["image_temp_train"], maps))
    image_logits = torch.stack([p[0] for p in per])
    ce = F.cross_entropy(image_logits, labels.long())
    seg = 0.0
    for e in range(len(per[0][1])):
        M = torch.stack([p[1][e] for p in per])                          # (B, 2, S, S)
        seg = seg + focal_loss(M, masks)
        if P["pooling"]:    # Crane: one Dice on whole_map = (1 - p_norm + p_abn) / 2
            seg = seg + dice_loss((1 - M[:, 0] + M[:, 1]) / 2, masks)
        else:               # AnomalyCLIP: both channels
            seg = seg + dice_loss(M[:, 1], masks) + dice_loss(M[:, 0], 1 - masks)
    return P["seg_w"] * seg + P["image_w"] * ce


# ============================================================== settings and fixtures
def ref_params(name, **over):
    """The reference's setting for a model built with ``over`` (our config names)."""
    crane = name == "crane"
    cfg = {**TINY, **over}
    P = dict(kind="qq+kk+vv" if crane else "vv", side_from=cfg["side_from"], layers=tuple(cfg["layers"]),
             alias=cfg.get("alias_layers", False), global_ln_post=cfg.get("global_ln_post", crane),
             temp=0.07, sigma=4.0, half=cfg.get("round_prompts_fp16", False), pooling=crane, pool_w=0.5,
             context_at_test=cfg.get("context_token_at_test", False), context_train=crane,
             image_temp_train=0.01 if crane else 0.07, image_w=0.2 if crane else 1.0,
             seg_w=cfg.get("seg_weight", 8.0 if crane else 4.0),
             train_upsample=cfg.get("train_upsample", "bilinear") if crane else "bilinear")
    return P


def perturb(m, seed=0):
    """Learned prompts far from their N(0, 0.02²) init, and non-trivial biases / norms in the frozen
    CLIP (a random open_clip init has zero attention biases and unit norms, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.ctx.copy_(0.4 * torch.randn(m.ctx.shape, generator=gen))
        for p in m.deep:
            p.copy_(0.4 * torch.randn(p.shape, generator=gen))
        for name, p in m.clip.named_parameters():
            if name.endswith("bias") or "ln_" in name:          # every bias, every layer norm
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return m


def build(name, seed=0, **over):
    torch.manual_seed(1234)
    m = methods.create(name, **{**TINY, **over})
    return perturb(m, seed).eval()


def our_prompts(m):
    tok = open_clip.get_tokenizer("adaclip-tiny")(SENTENCES)
    return dict(ctx=[m.ctx[0].detach(), m.ctx[1].detach()], deep=[p.detach() for p in m.deep],
                tokens=[tok[0], tok[1]], prefix=[None, None], suffix=[None, None])


def images(n, seed=1, S=32):
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def batch_targets(S=32):
    return three_image_targets(S)


def compare_eval(m, P, prompts, imgs, ref_T=None):
    with torch.no_grad():
        out = m(imgs, ["object"] * len(imgs))
        refs = [ref_image(m.clip, img, prompts, P, ref_T) for img in imgs]
    score = torch.stack([r[0] for r in refs])
    smooth = torch.stack([r[1] for r in refs])
    raw = torch.stack([r[2] for r in refs])
    # the comparison means something: maps that vary, scores off the 0/1 rails
    assert float(raw.std()) > 1e-2 and 1e-3 < float(score.min()) and float(score.max()) < 1 - 1e-3, (raw.std(), score)
    torch.testing.assert_close(out.image_scores.float(), score, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pixel_scores.float(), smooth, atol=ATOL, rtol=0)
    return out, refs


def our_loss(m, imgs, targets):
    m.train()
    out = m(imgs, ["object"] * len(imgs), targets=targets)
    m.eval()
    return out.loss


# ============================================================== tests
def case_id(v):
    if isinstance(v, str):
        return v
    txt = lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else str(x)  # noqa: E731
    return ",".join(f"{k}={txt(x)}" for k, x in v.items()) or "default"


@pytest.mark.parametrize("name,over", [
    ("anomalyclip", {}),
    ("anomalyclip", dict(global_ln_post=True)),
    ("anomalyclip", dict(layers=(2, 3, 4))),
    ("anomalyclip", dict(layers=(2, 3, 4), alias_layers=True)),
    ("anomalyclip", dict(round_prompts_fp16=True)),
    ("crane", {}),
    ("crane", dict(global_ln_post=False)),
    ("crane", dict(layers=(2, 3, 4), alias_layers=True)),
    ("crane", dict(layers=(2, 3, 4))),
    ("crane", dict(context_token_at_test=True)),
], ids=case_id)
def test_zero_shot_scores_and_maps(name, over):
    m = build(name, **over)
    P = ref_params(name, **over)
    compare_eval(m, P, our_prompts(m), images(3))


@pytest.mark.parametrize("name,over", [
    ("anomalyclip", {}),
    ("anomalyclip", dict(layers=(2, 3, 4))),
    ("anomalyclip", dict(layers=(2, 3, 4), alias_layers=True)),
    ("anomalyclip", dict(global_ln_post=True)),
    ("crane", {}),
    ("crane", dict(train_upsample="nearest")),
    ("crane", dict(global_ln_post=False)),
    # the reference's literal --features_list 6 12 18 24: entries aliased to the last, 2 x Σ entries
    ("crane", dict(layers=(2, 3, 4), alias_layers=True, seg_weight=2.0, train_upsample="nearest")),
    ("crane", dict(layers=(2, 3, 4), seg_weight=2.0)),
], ids=case_id)
def test_training_loss(name, over):
    m = build(name, **over)
    P = ref_params(name, **over)
    imgs = images(3, seed=2)
    labels, masks, targets = batch_targets()
    loss = our_loss(m, imgs, targets)
    with torch.no_grad():
        ref = ref_loss(m.clip, imgs, labels, masks, our_prompts(m), P)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach().float(), ref, atol=ATOL, rtol=0)


def test_static_text_features_and_tokens():
    """The sentences' token ids are the references' (EOT at 15 / 16), and the static text features
    (SOT, contexts, deep prompts at 1..4 before blocks 1..depth-1, EOT pooling) match."""
    tok = open_clip.get_tokenizer("adaclip-tiny")(SENTENCES)
    assert tok[0, :16].tolist() == [SOT] + [343] * 12 + [14115, 269, EOT]
    assert tok[1, :17].tolist() == [SOT] + [343] * 12 + [13568, 14115, 269, EOT]
    for name in ("anomalyclip", "crane"):
        m = build(name)
        with torch.no_grad():
            ours = m.text_features()
            ref = ref_text(m.clip, our_prompts(m), ref_params(name), truncate=False)     # all 77 positions
            short = ref_text(m.clip, our_prompts(m), ref_params(name))
        assert ours.shape == (1, ref.shape[1], 2)
        torch.testing.assert_close(ours[0].T.float(), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(short, ref, atol=1e-6, rtol=0)          # the transcription's shortcut


def test_crane_context_token_text_features():
    """Training text of Crane: the image feature after the 12 contexts, the rest shifted by one, the
    last padding dropped, the EOT one later; per image."""
    m = build("crane")
    P = ref_params("crane")
    prompts = our_prompts(m)
    imgs = images(3, seed=3)
    with torch.no_grad():
        g = torch.stack([ref_vision(m.clip, img, P)[0] for img in imgs])
        ours = m.text_features(image_tokens=g)
        ref = torch.stack([ref_text(m.clip, prompts, P, img_token=gb) for gb in g])
        static = ref_text(m.clip, prompts, P)
    assert ours.shape == (3, g.shape[1], 2)
    torch.testing.assert_close(ours.transpose(1, 2).float(), ref, atol=ATOL, rtol=0)
    assert (ref - static).abs().max() > 1e-2          # the token changes the text, per image
    assert (ref[0] - ref[1]).abs().max() > 1e-3


def test_crane_context_token_row_shift():
    """The transcription's token rows with the image token are those of the reference's
    ``_pad_and_concatenate_suffix``: the id after the contexts repeated, the last padding dropped,
    the EOT argmax at 16 (normal) and 17 (abnormal)."""
    tok = open_clip.get_tokenizer("adaclip-tiny")(SENTENCES)
    m = build("crane")
    expected = [[SOT] + [343] * 12 + [14115, 14115, 269, EOT],
                [SOT] + [343] * 12 + [13568, 13568, 14115, 269, EOT]]
    for s in range(2):
        emb, row = ref_sentence(m.clip, m.ctx[s].detach(), tok[s], img_token=torch.full((m.ctx.shape[-1],), 7.0))
        assert row.shape == (77,) and emb.shape == (77, m.ctx.shape[-1])
        assert row[:len(expected[s])].tolist() == expected[s] and not row[len(expected[s]):].any()
        assert int(row.argmax()) == 16 + s and bool((emb[1 + N_CTX] == 7.0).all())


def _released_state():
    if not RELEASED.is_file():
        pytest.skip(f"{RELEASED} missing (a *.pth, ignored by git: copy it from Crane 39181f9 "
                    "checkpoints/trained_on_mvtec_crane/epoch_5.pth)")
    return torch.load(RELEASED, map_location="cpu", weights_only=True)["prompt_learner"]


@pytest.mark.parametrize("half", [True, False], ids=["fp16-deep", "fp32-deep"])
def test_crane_released_prompts(half):
    """Crane's epoch_5 prompts (trained on MVTec, width 768) in a CLIP with ViT-L/14's text tower
    shape: the transcription takes the file's tensors directly: ctx_pos / ctx_neg, the eight deep
    prompts, and the SOT / suffix embedding buffers and token rows. The random text tower is given
    the file's embeddings of the tokens those buffers hold (the real ViT-L/14 rows), so that the
    buffers and our token embedding agree, as they do with the real weights."""
    state = _released_state()
    torch.manual_seed(1234)
    m = methods.create("crane", **{**CRANE_TEST, "round_prompts_fp16": half}).eval()
    rows = {  # token id -> embedding held by the file's buffers
        SOT: state["token_prefix_pos"][0, 0, 0],
        14115: state["token_suffix_pos"][0, 0, 0], 269: state["token_suffix_pos"][0, 0, 1],
        EOT: state["token_suffix_pos"][0, 0, 2], 0: state["token_suffix_pos"][0, 0, 3],
        13568: state["token_suffix_neg"][0, 0, 0],
    }
    assert abs(float(rows[SOT].norm()) - 0.6507) < 1e-3                      # the spec's SOT norm
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for n, p in m.clip.named_parameters():     # non-trivial frozen biases / norms (prompts untouched)
            if n.endswith("bias") or "ln_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for i, r in rows.items():
            m.clip.token_embedding.weight[i] = r
    m.load_official_checkpoint(RELEASED)
    tok = [state["tokenized_prompts_pos"][0, 0], state["tokenized_prompts_neg"][0, 0]]
    ours_tok = open_clip.get_tokenizer("crane-test-clip")(SENTENCES)
    assert torch.equal(ours_tok[0].int(), tok[0]) and torch.equal(ours_tok[1].int(), tok[1])
    prompts = dict(ctx=[state["ctx_pos"][0, 0], state["ctx_neg"][0, 0]],
                   deep=[state[f"compound_prompts_text.{i}"] for i in range(8)],
                   tokens=tok, prefix=[state["token_prefix_pos"][0, 0], state["token_prefix_neg"][0, 0]],
                   suffix=[state["token_suffix_pos"][0, 0], state["token_suffix_neg"][0, 0]])
    P = dict(ref_params("crane", **CRANE_TEST), half=half)
    with torch.no_grad():
        T = ref_text(m.clip, prompts, P)
        torch.testing.assert_close(m.text_features()[0].T.float(), T, atol=ATOL, rtol=0)
    compare_eval(m, P, prompts, images(2, seed=4), ref_T=T)
    if not half:
        return
    # the training loss with the released prompts (.half() deep prompts, the context token, nearest
    # upsampling: as they were trained); the second model shares the first one's frozen CLIP
    cfg = methods.config("crane", **{**CRANE_TEST, "round_prompts_fp16": True, "train_upsample": "nearest"})
    m2 = methods.get("crane")(cfg, clip=m.clip).load_official_checkpoint(RELEASED).eval()
    labels, masks, targets = batch_targets()
    imgs = images(3, seed=6)
    loss = our_loss(m2, imgs, targets)
    with torch.no_grad():
        ref = ref_loss(m2.clip, imgs, labels, masks, prompts, dict(P, train_upsample="nearest"))
    torch.testing.assert_close(loss.detach().float(), ref, atol=ATOL, rtol=0)
