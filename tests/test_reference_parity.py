"""Our batched model against a plain transcription of the reference forward at batch size 1.

The transcription follows github caoyunkang/AdaCLIP (method/adaclip.py, method/clip_model.py) as
ADACLIP_SPEC.md describes it, and shares nothing with the code under test but the parameters: it
rebuilds the raw CLIP from the same seed and resizes its positional embedding itself, runs its own
sequence-first transformer blocks (GELU or QuickGELU as configured), writes the prompt sentences out
literally, tokenises with open_clip's plain tokenizer at the full 77-token context, and clusters with
its own k-means (or scikit-learn's, as the reference does). Its fp16 rounding of prompts is left out:
we compute in the model's dtype on purpose.
"""
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.cluster import KMeans

from adaclip import AdaCLIP, AdaCLIPConfig, BackboneCfg, FusionCfg, PromptCfg

# method/adaclip.py, TextEmbebddingLayer
PROMPT_NORMAL = ['{}', 'flawless {}', 'perfect {}', 'unblemished {}', '{} without flaw', '{} without defect',
                 '{} without damage']
PROMPT_ABNORMAL = ['damaged {}', 'broken {}', '{} with flaw', '{} with defect', '{} with damage']
PROMPT_TEMPLATES = ['a bad photo of a {}.', 'a low resolution photo of the {}.', 'a bad photo of the {}.',
                    'a cropped photo of the {}.']


def raw_clip(cfg: BackboneCfg):
    """The frozen CLIP as open_clip builds it from the seed, before any resizing."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return open_clip.create_model(cfg.name, pretrained=None, force_quick_gelu=bool(cfg.quick_gelu)).eval()


def resize_pos_embed(pos, grid):
    """method/clip_model.py resize_pos_embed: bicubic, align_corners=False, class position kept."""
    tok, img = pos[:1], pos[1:]
    old = int(math.sqrt(len(img)))
    if old == grid:
        return pos
    img = img.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([tok, img.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


def block(r, x, quick_gelu, attn_mask=None):
    """One residual attention block, sequence-first (L, N, W): x + attn(ln_1 x), then x + mlp(ln_2 x)."""
    L, N, W = x.shape
    heads = r.attn.num_heads
    h = r.ln_1(x)
    q, k, v = F.linear(h, r.attn.in_proj_weight, r.attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(L, N * heads, W // heads).transpose(0, 1) for t in (q, k, v))  # (N·h, L, W/h)
    att = (q * (W // heads) ** -0.5) @ k.transpose(1, 2)
    if attn_mask is not None:
        att = att + attn_mask[:L, :L]
    out = (att.softmax(-1) @ v).transpose(0, 1).reshape(L, N, W)
    x = x + F.linear(out, r.attn.out_proj.weight, r.attn.out_proj.bias)
    h = F.linear(r.ln_2(x), r.mlp.c_fc.weight, r.mlp.c_fc.bias)
    h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)
    return x + F.linear(h, r.mlp.c_proj.weight, r.mlp.c_proj.bias)


def reference_kmeans(x, k, seed):
    """k-means of one image's tokens (K, C), as FusionCfg documents ours: k-means++ seeding by
    inverse-CDF draws of the uniform numbers torch.rand(k, Generator(seed)) over D² weights, then
    Lloyd iterations (empty clusters keep their centre) until the labels stop changing."""
    K = x.shape[0]
    u = torch.rand(k, generator=torch.Generator().manual_seed(seed))
    centres = [x[min(int(u[0] * K), K - 1)]]
    for c in range(1, k):
        d2 = torch.stack([((x - z) ** 2).sum(-1) for z in centres]).min(0).values
        cdf = d2.cumsum(0) / d2.sum()
        centres.append(x[min(int((cdf < u[c]).sum()), K - 1)])
    centres = torch.stack(centres)
    labels = None
    for _ in range(100):
        new = torch.cdist(x, centres).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centres = torch.stack([x[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(k)])
    return labels


def reference_forward(m: AdaCLIP, clip, image, cls_name, quick_gelu):
    p, fc = m.cfg.prompts, m.cfg.fusion
    L, J = p.length, p.depth
    v = clip.visual
    visual_on, text_on = "V" in p.branch, "L" in p.branch
    grid = image.shape[-1] // v.patch_size[0]
    pos = resize_pos_embed(v.positional_embedding, grid)

    def visual(prompts=None):                                            # AdaCLIP.encode_image
        x = v.conv1(image).reshape(1, v.conv1.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([v.class_embedding + torch.zeros(1, 1, x.shape[-1]), x], dim=1) + pos
        x = v.ln_pre(x).permute(1, 0, 2)                                 # LND
        tokens = []
        for indx, r in enumerate(v.transformer.resblocks):
            if prompts is not None and indx < J:
                ctx = prompts[indx].permute(1, 0, 2)
                x = torch.cat([x, ctx], 0) if indx == 0 else torch.cat([x[:x.shape[0] - L], ctx], 0)
            x = block(r, x, quick_gelu)
            if indx + 1 in m.out_layers:
                tokens.append((x[:x.shape[0] - L] if prompts is not None else x).permute(1, 0, 2))
        return v.ln_post(x.permute(1, 0, 2)[:, 0]) @ v.proj, tokens

    dyn_v = dyn_t = 0.0
    if p.dynamic:                                                        # generate_and_set_dynamic_promtps
        with torch.no_grad():
            f0, _ = visual()
        if visual_on:
            dyn_v = torch.stack([h(f0) for h in m.visual_prompts.dynamic], dim=1)     # (1, L, W)
        if text_on:
            dyn_t = torch.stack([h(f0) for h in m.text_prompts.dynamic], dim=1)       # (1, L, D)

    def context(prompter, dyn, indx):
        static = prompter.static[indx].unsqueeze(0) if p.static else 0.0
        return dyn + static

    pooled, patch_tokens = visual([context(m.visual_prompts, dyn_v, i) for i in range(J)] if visual_on else None)

    def encode_text(text):                                               # AdaCLIP.encode_text
        x = (clip.token_embedding(text) + clip.positional_embedding).permute(1, 0, 2)
        for indx, r in enumerate(clip.transformer.resblocks):
            if text_on and 1 <= indx < J:
                # type "D": the reference concatenates the (1, L, D) prompt against all sentences and
                # crashes; broadcast it, as its SD path does
                ctx = context(m.text_prompts, dyn_t, indx).expand(x.shape[1], -1, -1).permute(1, 0, 2)
                x = torch.cat([x[:1], ctx, x[1 + L:]], 0)
            x = block(r, x, quick_gelu, clip.attn_mask)
        x = clip.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ clip.text_projection

    feats = []
    for states in (PROMPT_NORMAL, PROMPT_ABNORMAL):                      # TextEmbebddingLayer.encode_text
        name = cls_name.replace("-", " ")
        sentences = [t.format(s.format(name)) for s in states for t in PROMPT_TEMPLATES]
        e = encode_text(open_clip.tokenize(sentences, context_length=77))
        e = e / e.norm(dim=-1, keepdim=True)
        e = e.mean(0)
        feats.append(e / e.norm())
    text = F.normalize(torch.stack(feats, 1)[None], dim=1)               # (1, D, 2)

    proj = [m.patch_proj[i](patch_tokens[i][:, 1:, :]) for i in range(len(patch_tokens))]   # proj_visual_tokens
    proj = [t / t.norm(dim=-1, keepdim=True) for t in proj]
    cls = m.cls_proj(pooled)
    cls = cls / cls.norm(dim=-1, keepdim=True)

    maps = [100.0 * t @ text for t in proj]                              # visual_text_similarity
    if fc.use_hsf:                                                       # HybridSemanticFusion.forward
        amap = torch.softmax(torch.mean(torch.stack(maps, 1), 1), dim=2)[:, :, 1]
        K = min(amap.shape[1], 5 * fc.k_clusters)
        top = torch.topk(amap, k=K, dim=1).indices
        sel = [t.gather(1, top.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in proj]
        stacked = torch.cat(sel, 2)[0]
        if fc.kmeans == "sklearn":
            labels = torch.as_tensor(KMeans(n_clusters=fc.k_clusters, n_init="auto", random_state=fc.seed)
                                     .fit_predict(stacked.numpy()))
        else:
            labels = reference_kmeans(stacked, fc.k_clusters, fc.seed)
        centres = [torch.cat([s[0][labels == c] for s in sel], 0).mean(0, keepdim=True)
                   for c in range(fc.k_clusters)]
        h = F.normalize(torch.cat(centres).mean(0)[None], dim=1)
        cls = F.normalize(0.2 * h + 0.8 * cls, dim=1)
    score = torch.softmax((100.0 * cls.unsqueeze(1) @ text).squeeze(1), dim=1)
    side = int(np.sqrt(maps[0].shape[1]))
    maps = [F.interpolate(a.permute(0, 2, 1).view(1, 2, side, side), size=m.image_size, mode="bilinear",
                          align_corners=True) for a in maps]
    layer_maps = [torch.softmax(a, dim=1) for a in maps]
    agg = torch.softmax(torch.mean(torch.stack(maps, 1), 1), dim=1)
    pixel = (agg[:, 1:] + 1 - agg[:, 0:1]) / 2.0
    pixel = gaussian_filter(pixel.squeeze(1)[0].detach().numpy(), sigma=4)
    return score[:, 1], pixel, layer_maps


CASES = {
    "SD-VL": dict(),
    "S-VL": dict(type="S"),
    "D-VL": dict(type="D"),
    "SD-V": dict(branch="V"),
    "SD-L": dict(branch="L"),
    "D-V": dict(type="D", branch="V"),
    "S-L": dict(type="S", branch="L"),
    "no-prompts": dict(branch=""),
    "hsf-off": dict(use_hsf=False),
    "kmeans-sklearn": dict(kmeans="sklearn"),
    "quick-gelu": dict(quick_gelu=True),
    "quick-gelu-D-V": dict(type="D", branch="V", quick_gelu=True),
    "gelu-explicit-S-L": dict(type="S", branch="L", quick_gelu=False),
    "resized-pos-embed-48px": dict(image_size=48),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_batched_model_equals_reference_transcription(case):
    case = dict(case)
    # unset: the method's default, the reference's exact GELU (ADACLIP_SPEC.md, Backbone)
    size, quick_gelu = case.pop("image_size", 32), case.pop("quick_gelu", None)
    fusion = {k: case.pop(k) for k in ("use_hsf", "kmeans") if k in case}
    cfg = AdaCLIPConfig(backbone=BackboneCfg(name="adaclip-tiny", pretrained=None, image_size=size,
                                             quick_gelu=quick_gelu),
                        prompts=PromptCfg(depth=2, length=2, **case), fusion=FusionCfg(k_clusters=3, **fusion))
    torch.manual_seed(0)
    model = AdaCLIP.from_config(cfg).eval()
    quick_gelu = bool(quick_gelu)
    clip = raw_clip(BackboneCfg(name="adaclip-tiny", pretrained=None, quick_gelu=quick_gelu))
    activation = type(clip.visual.transformer.resblocks[0].mlp.gelu).__name__
    assert activation == ("QuickGELU" if quick_gelu else "GELU")
    assert type(model.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == activation
    assert all(torch.equal(a, b) for (n, a), (_, b) in zip(clip.named_parameters(), model.clip.named_parameters())
               if n != "visual.positional_embedding")
    with torch.no_grad():
        for p in model.learnable_parameters():                       # trained-looking, not init values
            p.add_(0.05 * torch.randn_like(p))
        images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
        names = ["bottle", "metal-nut", "bottle"]
        ours = model(images, names, return_layer_maps=True)
        for i in range(3):
            score, pixel, layer_maps = reference_forward(model, clip, images[i:i + 1], names[i], quick_gelu)
            torch.testing.assert_close(ours.image_scores[i:i + 1], score, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(ours.pixel_scores[i].numpy(), pixel, rtol=1e-4, atol=1e-5)
            for k in range(4):
                torch.testing.assert_close(ours.layer_maps[k][i:i + 1], layer_maps[k], rtol=1e-4, atol=1e-5)
