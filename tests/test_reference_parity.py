"""Our batched model against a plain transcription of the reference forward at batch size 1.

The transcription follows github caoyunkang/AdaCLIP method/adaclip.py as ADACLIP_SPEC.md describes
it: sequence-first tensors, prompts concatenated as the reference does, full 77-token text with one
encoder call per state, HSF through the reference's per-cluster loop, maps upsampled per layer.
(Its fp16 rounding of prompts is left out: we compute in the model's dtype on purpose.)
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from adaclip import AdaCLIP, AdaCLIPConfig, FusionCfg, PromptCfg
from adaclip.model.fusion import kmeans
from adaclip.text import state_sentences


def block_lnd(block, x, attn_mask=None):
    """open_clip 3.3 blocks are batch-first; the reference's were sequence-first."""
    return block(x.permute(1, 0, 2), attn_mask=attn_mask).permute(1, 0, 2)


def reference_forward(m: AdaCLIP, image, cls_name):
    p, clip, v = m.cfg.prompts, m.clip, m.clip.visual
    L, J = p.length, p.depth
    with torch.no_grad():                                             # generate_and_set_dynamic_promtps
        f0 = v(image)
    dyn_v = m.visual_prompts.generate(f0) if p.dynamic else 0.0        # (1, L, W)
    dyn_t = m.text_prompts.generate(f0) if p.dynamic else 0.0          # (1, L, D)

    # encode_image
    x = v.conv1(image).reshape(1, v.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(1, 1, x.shape[-1]), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x).permute(1, 0, 2)                                  # LND
    patch_tokens = []
    for indx, r in enumerate(v.transformer.resblocks):
        if indx < J:
            static = m.visual_prompts.static[indx].unsqueeze(0).expand(x.shape[1], -1, -1) if p.static else 0.0
            ctx = (dyn_v + static).permute(1, 0, 2)
            x = torch.cat([x, ctx], 0) if indx == 0 else torch.cat([x[:x.shape[0] - L], ctx], 0)
        x = block_lnd(r, x)
        tokens = x[:x.shape[0] - L]
        if indx + 1 in m.out_layers:
            patch_tokens.append(tokens)
    x = x.permute(1, 0, 2)
    pooled = v.ln_post(x[:, 0]) @ v.proj
    patch_tokens = [t.permute(1, 0, 2) for t in patch_tokens]

    # TextEmbebddingLayer.encode_text, one call per state
    def encode_text(text):
        x = clip.token_embedding(text) + clip.positional_embedding
        x = x.permute(1, 0, 2)
        for indx, r in enumerate(clip.transformer.resblocks):
            if 1 <= indx < J:
                static = m.text_prompts.static[indx].unsqueeze(0).expand(x.shape[1], -1, -1) if p.static else 0.0
                # type "D": the reference concatenates the (1, L, D) prompt against all sentences and
                # crashes; broadcast it as its SD path does
                ctx = (dyn_t + static).expand(x.shape[1], -1, -1).permute(1, 0, 2)
                x = torch.cat([x[:1], ctx, x[1 + L:]], 0)
            x = block_lnd(r, x, clip.attn_mask)
        x = clip.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ clip.text_projection

    feats = []
    for sentences in state_sentences(cls_name):
        e = encode_text(m.tokenizer(sentences))
        e = e / e.norm(dim=-1, keepdim=True)
        e = e.mean(0)
        feats.append(e / e.norm())
    text = F.normalize(torch.stack(feats, 1)[None], dim=1)                # (1, D, 2)

    # proj_visual_tokens
    proj = [m.patch_proj[i](patch_tokens[i][:, 1:, :]) for i in range(len(patch_tokens))]
    proj = [t / t.norm(dim=-1, keepdim=True) for t in proj]
    cls = m.cls_proj(pooled)
    cls = cls / cls.norm(dim=-1, keepdim=True)

    # visual_text_similarity
    maps = [100.0 * t @ text for t in proj]
    fc = m.cfg.fusion
    if fc.use_hsf:
        amap = torch.softmax(torch.mean(torch.stack(maps, 1), 1), dim=2)[:, :, 1]
        K = min(amap.shape[1], 5 * fc.k_clusters)
        top = torch.topk(amap, k=K, dim=1).indices
        sel = [t.gather(1, top.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in proj]
        labels = kmeans(torch.cat(sel, 2), fc.k_clusters, fc.seed)[0]
        centres = [torch.cat([s[0][labels == c] for s in sel], 0).mean(0, keepdim=True)
                   for c in range(min(fc.k_clusters, K))]
        h = F.normalize(torch.cat(centres).mean(0)[None], dim=1)
        cls = F.normalize(fc.alpha * h + (1 - fc.alpha) * cls, dim=1)
    score = torch.softmax((100.0 * cls.unsqueeze(1) @ text).squeeze(1), dim=1)
    side = int(np.sqrt(maps[0].shape[1]))
    maps = [F.interpolate(a.permute(0, 2, 1).view(1, 2, side, side), size=m.image_size, mode="bilinear",
                          align_corners=True) for a in maps]
    layer_maps = [torch.softmax(a, dim=1) for a in maps]
    agg = torch.softmax(torch.mean(torch.stack(maps, 1), 1), dim=1)
    pixel = (agg[:, 1:] + 1 - agg[:, 0:1]) / 2.0
    pixel = gaussian_filter(pixel.squeeze(1)[0].detach().numpy(), sigma=4)
    return score[:, 1], pixel, layer_maps


@pytest.mark.parametrize("prompts", [dict(type="SD", branch="VL"), dict(type="S", branch="VL"),
                                     dict(type="D", branch="VL")])
def test_batched_model_equals_reference_transcription(prompts):
    cfg = AdaCLIPConfig.tiny()
    cfg.prompts = PromptCfg(depth=2, length=2, **prompts)
    cfg.fusion = FusionCfg(k_clusters=3)
    torch.manual_seed(0)
    model = AdaCLIP.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.learnable_parameters():                       # trained-looking, not init values
            p.add_(0.05 * torch.randn_like(p))
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        names = ["bottle", "metal-nut", "bottle"]
        ours = model(images, names, return_layer_maps=True)
        for i in range(3):
            score, pixel, layer_maps = reference_forward(model, images[i:i + 1], names[i])
            torch.testing.assert_close(ours.image_scores[i:i + 1], score, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(ours.pixel_scores[i].numpy(), pixel, rtol=1e-4, atol=1e-5)
            for k in range(4):
                torch.testing.assert_close(ours.layer_maps[k][i:i + 1], layer_maps[k], rtol=1e-4, atol=1e-5)
