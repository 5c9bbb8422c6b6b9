"""AA-CLIP (CVPR 2025, arXiv 2503.06661) against an independent transcription of its reference code.

The transcription below follows Mwxinnn/AA-CLIP (commit 53db195) and ANOMALYCLIP_CRANE_AACLIP_SPEC.md
section 3, step by step:

- ``model/adapter.py`` ``AdaptedCLIP.forward``: after vision block i < image_adapt_until, on all
  tokens, a = LeakyReLU(W_i x), a <- a·‖x‖/‖a‖ per token, x <- w·a + (1 − w)·x (w = 0.1); the
  residual stream after the tapped blocks (patches only) -> ``ln_post`` -> ``seg_proj[l]`` ->
  normalise; ``det`` = mean over patches of normalise(det_proj(ln_post(last tap))), not renormalised.
- ``AdaptedCLIP.encode_text``: adapters after text blocks i < text_adapt_until, ``ln_final`` at the
  EOT (argmax) token, ``text_adapter[-1]`` = Linear + LeakyReLU (CLIP's text_projection unused).
- ``forward_utils.py``: ``get_adapted_single_class_text_embedding`` (PROMPTS of
  ``dataset/constants.py``, 6 normal / 10 abnormal sentences, normalise / mean / renormalise),
  ``calculate_similarity_map`` (100·f T; test: (s_abn + 1 − s_norm)/2, kornia ``gaussian_blur2d``
  at the patch grid (reflect), bilinear ``align_corners=True``; train: softmax over the 2 channels
  after upsampling), ``calculate_seg_loss`` (Focal + Dice(normal, 1 − m) + Dice(abnormal, m)),
  ``metrics_eval``'s image score (per-class min-max normalisation of maps and image scores;
  Industrial 0.5·max(map) + 0.5·image score, Medical max(map)).
- ``test.py:get_predictions``: image score (⟨det, t_abn⟩ + 1)/2; the maps of the levels summed.
- ``train.py``: stage 1 (``train_text_adapter``): the ``clip_surgery`` teacher (``model/transformer.py``
  ``Attention`` + ``DAPM_replace``: the block's attention replaced by softmax(V Vᵀ·scale) V -> out_proj
  from layer ``surgery_from`` on, residual and MLP kept), taps normalise(ln_post(patches) @ proj) +
  normalise(plain CLIP's class feature), the loss of the last layer only (the reference assigns
  ``loss =`` inside its loop) or, our default, summed over the layers, plus one orthogonality term
  0.1·(mean_b ⟨t_n, t_a⟩)²; stage 2 (``train_image_adapter``): CE(det·T, y) without temperature +
  Σ_layers seg loss.

The blocks, attention (per-head matmuls from ``in_proj`` / ``out_proj``), exact GELU MLP, layer norms
and kornia's blur are written out here. It shares nothing with ``adaclip.methods.aaclip`` except the
frozen CLIP's parameters (``m.clip``) and the learned adapter / projection weights (read as tensors,
so the gradients can be compared too). Our model is called batched, with different class names in
one batch; the reference transcription runs image by image, as ``test.py`` does per class.

The reference's stage-1 teacher feeds its V-V ``Attention`` (written for (B, N, C) input) the
sequence-first (L, B, C) stream, so in the literal code the V-V softmax runs over the *images of the
batch* at each token position, not over the tokens. Our default is the intended token-wise V-V
attention (as CLIP Surgery, whose ``Attention`` AA-CLIP copied, transposes first); the literal
behaviour is the option ``teacher_vv_axis="batch"`` (``test_stage1_literal_batch_axis_vv_teacher``).
"""
import numpy as np
import open_clip
import pytest
import torch
from torch.nn import functional as F

from adaclip import methods
from helpers import assert_close_to_scale

S = 32                     # adaclip-tiny's image side: 4x4 patch grid
N_VISION_BLOCKS = 4
LEVELS = [1, 2, 3, 4]      # quarter depths of 4 blocks (the reference's 6, 12, 18, 24 of 24), 1-based
IMAGE_ADAPT_UNTIL = 3      # adapters after vision blocks 0, 1, 2 (0-based)
TEXT_ADAPT_UNTIL = 2       # adapters after text blocks 0, 1
SURGERY_FROM = 2           # V-V attention in layers 2..4 (1-based), as 6..24 of 24 in the reference
ADAPT_W = 0.1
TEXT_NORM_WEIGHT = 0.1
TINY = dict(backbone=dict(name="adaclip-tiny", pretrained=None, image_size=S), surgery_from=SURGERY_FROM,
            text_adapt_until=TEXT_ADAPT_UNTIL, image_adapt_until=IMAGE_ADAPT_UNTIL)
TOL = dict(rtol=1e-4, atol=1e-4)
SEED = 2503

# ---------------------------------------------------------------------------------------------
# dataset/constants.py, written out literally (the parts used here)
# ---------------------------------------------------------------------------------------------
PROMPTS = {
    "prompt_normal": ["{}", "a {}", "the {}"],
    "prompt_abnormal": ["a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage"],
    "prompt_templates": ["{}.", "a photo of {}."],
}
REAL_NAMES = {
    "MVTec": {"bottle": "dark bottle", "metal_nut": "metal nut which has four notched edges"},
    "VisA": {"pcb1": "dual ultrasonic distance sensor pcb module"},
}
# forward_utils.calculate_similarity_map: domain -> (kernel_size, sigma)
BLUR = {"Industrial": (7, 1.0), "Medical": (9, 1.5)}


def real_name(class_name):
    for names in REAL_NAMES.values():
        if class_name in names:
            return names[class_name]
    raise KeyError(class_name)


def readable(class_name):
    return class_name.replace("_", " ")


# ---------------------------------------------------------------------------------------------
# kornia.filters.gaussian_blur2d, written out (kornia is not installed)
# ---------------------------------------------------------------------------------------------

def get_gaussian_kernel1d(kernel_size, sigma):
    x = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
    if kernel_size % 2 == 0:
        x = x + 0.5
    gauss = torch.exp(-x.pow(2.0) / (2 * sigma ** 2))
    return gauss / gauss.sum()


def gaussian_blur2d(x, kernel_size, sigma, border_type="reflect"):
    """kornia: separable filter2d, each pass F.pad(mode=border_type) to 'same' then a correlation."""
    (ky, kx), (sy, sx) = kernel_size, sigma
    c = x.shape[1]
    kernel_x = get_gaussian_kernel1d(kx, sx).to(x)
    kernel_y = get_gaussian_kernel1d(ky, sy).to(x)
    x = F.pad(x, [kx // 2, kx // 2, 0, 0], mode=border_type)
    x = F.conv2d(x, kernel_x.view(1, 1, 1, kx).expand(c, 1, 1, kx), groups=c)
    x = F.pad(x, [0, 0, ky // 2, ky // 2], mode=border_type)
    return F.conv2d(x, kernel_y.view(1, 1, ky, 1).expand(c, 1, ky, 1), groups=c)


# ---------------------------------------------------------------------------------------------
# The frozen CLIP, written out (open_clip's ResidualAttentionBlock with the reference's exact GELU)
# ---------------------------------------------------------------------------------------------

def layer_norm(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def attention(x, blk, attn_mask=None, vv=False):
    """x (B, L, W) -> out_proj(softmax(q kᵀ·scale) v), per head; ``vv``: q = k = v (the reference's
    ``Attention``: ``k = v; q = k``), scale head_dim^-0.5 as its ``qk_scale=None``."""
    a = blk.attn
    B, L, W = x.shape
    h = a.num_heads
    hd = W // h
    qkv = x @ a.in_proj_weight.T + a.in_proj_bias
    q, k, v = (t.reshape(B, L, h, hd).transpose(1, 2) for t in qkv.split(W, dim=-1))
    if vv:
        k = v
        q = k
    logits = (q @ k.transpose(-2, -1)) * hd ** -0.5
    if attn_mask is not None:
        logits = logits + attn_mask
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, L, W)
    return out @ a.out_proj.weight.T + a.out_proj.bias


def mlp(x, blk):
    y = x @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias
    y = F.gelu(y)                                   # exact GELU: the reference's CLIP(**cfg) has no quick_gelu
    return y @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias


def block(x, blk, attn_mask=None, vv=False):
    x = x + attention(layer_norm(x, blk.ln_1), blk, attn_mask, vv)
    return x + mlp(layer_norm(x, blk.ln_2), blk)


def adapter(x, weight, w=ADAPT_W):
    """SimpleAdapter (Linear bias-free + LeakyReLU), rescaled to the token's norm, mixed in."""
    adapt_out = F.leaky_relu(x @ weight.T)
    adapt_out = adapt_out * x.norm(dim=-1, keepdim=True) / adapt_out.norm(dim=-1, keepdim=True)
    return w * adapt_out + (1 - w) * x


def embed_image(visual, image):
    x = F.conv2d(image, visual.conv1.weight, stride=visual.conv1.stride)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = x + visual.positional_embedding
    return layer_norm(x, visual.ln_pre)


class Ref:
    """The reference's networks around our frozen CLIP and learned weights (as tensors)."""

    def __init__(self, m):
        self.clip = m.clip
        self.visual = m.clip.visual
        self.text_adapters = [a.fc.weight for a in m.text_adapters]
        self.text_proj = m.text_proj.weight
        self.image_adapters = [a.fc.weight for a in m.image_adapters]
        self.seg_proj = [p.weight for p in m.seg_proj]
        self.det_proj = m.det_proj.weight
        self.tokenizer = open_clip.get_tokenizer("adaclip-tiny")

    # ---- model/adapter.py: AdaptedCLIP.forward
    def adapted_image(self, image):
        """(seg tokens per level [(1, N, D)], det (1, D)) for one image (1, 3, S, S)."""
        v = self.visual
        x = embed_image(v, image)
        tokens = []
        for i, blk in enumerate(v.transformer.resblocks):
            x = block(x, blk)
            if i < len(self.image_adapters):
                x = adapter(x, self.image_adapters[i])
            if i + 1 in LEVELS:
                tokens.append(x[:, 1:, :])
        tokens = [layer_norm(t, v.ln_post) for t in tokens]
        seg_tokens = [F.normalize(t @ self.seg_proj[i].T, dim=-1) for i, t in enumerate(tokens)]
        det_token = F.normalize(tokens[-1] @ self.det_proj.T, dim=-1).mean(1)
        return seg_tokens, det_token

    # ---- model/adapter.py: AdaptedCLIP.encode_text
    def encode_text(self, text):
        c = self.clip
        x = c.token_embedding(text) + c.positional_embedding
        L = x.shape[1]
        causal = torch.full((L, L), float("-inf")).triu(1)      # build_attention_mask
        for i, blk in enumerate(c.transformer.resblocks):
            x = block(x, blk, attn_mask=causal)
            if i < len(self.text_adapters):
                x = adapter(x, self.text_adapters[i])
        x = layer_norm(x, c.ln_final)
        x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
        return F.leaky_relu(x @ self.text_proj.T)                # text_adapter[-1]: SimpleProj(relu=True)

    # ---- forward_utils.get_adapted_single_class_text_embedding
    def class_text_embedding(self, name):
        text_features = []
        for states in (PROMPTS["prompt_normal"], PROMPTS["prompt_abnormal"]):
            prompted_state = [state.format(name) for state in states]
            prompted_sentence = []
            for s in prompted_state:
                for template in PROMPTS["prompt_templates"]:
                    prompted_sentence.append(template.format(s))
            class_embeddings = self.encode_text(self.tokenizer(prompted_sentence))
            class_embeddings = class_embeddings / class_embeddings.norm(dim=-1, keepdim=True)
            class_embedding = class_embeddings.mean(dim=0)
            class_embedding = class_embedding / class_embedding.norm()
            text_features.append(class_embedding)
        return torch.stack(text_features, dim=1)                 # (D, 2)

    # ---- the stage-1 teacher: clip_surgery.encode_image(image, levels) and the plain CLS
    def teacher(self, image):
        """[(1, N, D)] per level: normalise(ln_post(patches) @ proj) + normalise(plain CLIP's pooled)."""
        v = self.visual
        x = embed_image(v, image)
        taps = []
        for idx, blk in enumerate(v.transformer.resblocks, start=1):
            x = block(x, blk, vv=idx >= SURGERY_FROM)
            if idx in LEVELS:
                taps.append(x)
        return self._teacher_features(image, taps)

    def plain_cls(self, image):
        v = self.visual
        x = embed_image(v, image)
        for blk in v.transformer.resblocks:
            x = block(x, blk)
        return layer_norm(x[:, 0], v.ln_post) @ v.proj

    def _teacher_features(self, image, taps):
        v = self.visual
        cls_token = self.plain_cls(image)
        cls_token = cls_token / cls_token.norm(dim=-1, keepdim=True)
        feats = [layer_norm(t[:, 1:, :], v.ln_post) @ v.proj for t in taps]
        feats = [t / t.norm(dim=-1, keepdim=True) for t in feats]
        return [t + cls_token.unsqueeze(1) for t in feats]

    def literal_teacher_batch(self, images):
        """The literal reference: the stream is (L, B, C) and ``Attention.forward`` reads it as
        (B, N, C), so the V-V softmax runs over the batch axis at each token position."""
        v = self.visual
        x = embed_image(v, images).permute(1, 0, 2)              # NLD -> LND
        taps = []
        for idx, blk in enumerate(v.transformer.resblocks, start=1):
            if idx >= SURGERY_FROM:
                x = block(x, blk, vv=True)                        # (L, B, C) taken as (B', N', C)
            else:
                x = block(x.permute(1, 0, 2), blk).permute(1, 0, 2)
            if idx in LEVELS:
                taps.append(x.permute(1, 0, 2))
        return self._teacher_features(images, taps)


# ---------------------------------------------------------------------------------------------
# forward_utils.py: maps, losses, metrics_eval's image score
# ---------------------------------------------------------------------------------------------

def calculate_similarity_map(patch_features, epoch_text_feature, img_size, test=False, domain="Medical",
                             border_type="reflect"):
    patch_anomaly_scores = 100.0 * torch.matmul(patch_features, epoch_text_feature)
    B, L, C = patch_anomaly_scores.shape
    H = int(np.sqrt(L))
    patch_pred = patch_anomaly_scores.permute(0, 2, 1).view(B, C, H, H)
    if test:
        assert C == 2
        sigma = 1 if domain == "Industrial" else 1.5
        kernel_size = 7 if domain == "Industrial" else 9
        patch_pred = (patch_pred[:, 1] + 1 - patch_pred[:, 0]) / 2
        patch_pred = gaussian_blur2d(patch_pred.unsqueeze(1), (kernel_size, kernel_size), (sigma, sigma),
                                     border_type)
    patch_preds = F.interpolate(patch_pred, size=img_size, mode="bilinear", align_corners=True)
    if not test and C > 1:
        patch_preds = torch.softmax(patch_preds, dim=1)
    return patch_preds


def focal_loss(logit, target, gamma=2, smooth=1e-5):
    """FocalLoss() with its defaults (apply_nonlin None, alpha None -> ones, balance_index 0)."""
    num_class = logit.shape[1]
    if logit.dim() > 2:
        logit = logit.view(logit.size(0), logit.size(1), -1)
        logit = logit.permute(0, 2, 1).contiguous()
        logit = logit.view(-1, logit.size(-1))
    target = torch.squeeze(target, 1)
    target = target.view(-1, 1)
    alpha = torch.ones(num_class, 1)
    idx = target.cpu().long()
    one_hot_key = torch.FloatTensor(target.size(0), num_class).zero_()
    one_hot_key = one_hot_key.scatter_(1, idx, 1)
    one_hot_key = torch.clamp(one_hot_key, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot_key * logit).sum(1) + smooth
    logpt = pt.log()
    alpha = torch.squeeze(alpha[idx])
    loss = -1 * alpha * torch.pow((1 - pt), gamma) * logpt
    return loss.mean()


def dice_loss(input, targets):
    N = targets.size()[0]
    smooth = 1
    input_flat = input.view(N, -1)
    targets_flat = targets.view(N, -1)
    intersection = input_flat * targets_flat
    N_dice_eff = (2 * intersection.sum(1) + smooth) / (input_flat.sum(1) + targets_flat.sum(1) + smooth)
    return 1 - N_dice_eff.sum() / N


def calculate_seg_loss(patch_preds, mask):
    loss = focal_loss(patch_preds, mask)
    loss += dice_loss(patch_preds[:, 0, :, :], 1 - mask)
    loss += dice_loss(patch_preds[:, 1, :, :], mask)
    return loss


def metrics_eval_image_preds(pixel_preds, image_preds, domain):
    """metrics_eval up to the image score it ranks (numpy, as the reference)."""
    if pixel_preds.max() != 1:
        pixel_preds = (pixel_preds - pixel_preds.min()) / (pixel_preds.max() - pixel_preds.min())
    if image_preds.max() != 1:
        image_preds = (image_preds - image_preds.min()) / (image_preds.max() - image_preds.min())
    pmax_pred = pixel_preds.max(axis=(1, 2))
    if domain != "Medical":
        image_preds = pmax_pred * 0.5 + image_preds * 0.5
    else:
        image_preds = pmax_pred
    return image_preds


# ---------------------------------------------------------------------------------------------
# The reference's loops, image by image
# ---------------------------------------------------------------------------------------------

def ref_texts(ref, names, name_fn):
    cache = {n: ref.class_text_embedding(name_fn(n)) for n in dict.fromkeys(names)}
    return torch.stack([cache[n] for n in names], dim=0)          # (B, D, 2)


def ref_predictions(ref, images, names, name_fn, domain="Industrial", img_size=S, **kw):
    """test.py:get_predictions per image: image scores (B,), summed maps R (B, S, S)."""
    with torch.no_grad():
        texts = ref_texts(ref, names, name_fn)
        preds_image, preds = [], []
        for image, T in zip(images, texts):
            patch_features, det_feature = ref.adapted_image(image[None])
            pred = det_feature @ T
            preds_image.append(((pred[:, 1] + 1) / 2).numpy())
            patch_preds = [calculate_similarity_map(f, T, img_size, test=True, domain=domain, **kw)
                           for f in patch_features]
            preds.append(torch.cat(patch_preds, dim=1).sum(1).numpy())
    return np.concatenate(preds_image), np.concatenate(preds)


def ref_stage1_loss(ref, images, masks, names, name_fn, last_layer_only, teacher=None):
    """train.py:train_text_adapter's loss for one batch (text features with grad)."""
    texts = {n: ref.class_text_embedding(name_fn(n)) for n in dict.fromkeys(names)}
    epoch_text_feature = torch.stack([texts[n] for n in names], dim=0)
    with torch.no_grad():
        if teacher is None:
            per_image = [ref.teacher(image[None]) for image in images]
            patch_features = [torch.cat([f[l] for f in per_image]) for l in range(len(LEVELS))]
        else:
            patch_features = teacher
    orthogonal_loss = ((epoch_text_feature[:, :, 0] * epoch_text_feature[:, :, 1]).sum(1).mean()) ** 2
    seg = [calculate_seg_loss(calculate_similarity_map(f, epoch_text_feature, S), masks) for f in patch_features]
    if last_layer_only:                       # the reference: ``loss = ...`` inside the loop
        return seg[-1] + orthogonal_loss * TEXT_NORM_WEIGHT
    return sum(seg) + orthogonal_loss * TEXT_NORM_WEIGHT


def ref_stage2_loss(ref, images, masks, labels, names, name_fn):
    """train.py:train_image_adapter's loss for one batch (fixed text anchors)."""
    with torch.no_grad():
        epoch_text_feature = ref_texts(ref, names, name_fn)
    per_image = [ref.adapted_image(image[None]) for image in images]
    patch_features = [torch.cat([p[0][l] for p in per_image]) for l in range(len(LEVELS))]
    det_feature = torch.cat([p[1] for p in per_image])
    loss = 0.0
    det_feature = det_feature.unsqueeze(1)
    cls_preds = torch.matmul(det_feature, epoch_text_feature)[:, 0]
    loss += F.cross_entropy(cls_preds, labels)
    for f in patch_features:
        patch_preds = calculate_similarity_map(f, epoch_text_feature, S)
        loss += calculate_seg_loss(patch_preds, masks)
    return loss


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def make_model(seed=SEED, **fields):
    torch.manual_seed(seed)
    cfg = {**TINY, **fields}
    m = methods.create("aaclip", **cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)                 # perturb the learned weights
    with torch.no_grad():
        for p in m.learnable_parameters():
            p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g)).add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def images_for(n, seed, side=S):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, what, **tol):
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    np.testing.assert_allclose(actual, expected, err_msg=what, **{**TOL, **tol})


def check_maps(out_pixels, R, what):
    """pixel_scores = (R + 99.5 L)/(200 L); R itself compared at a relative 1e-4 too."""
    L = len(LEVELS)
    close(out_pixels, (R + 99.5 * L) / (200 * L), what)
    close(200 * L * out_pixels - 99.5 * L, R, what + " (as R)", atol=2e-3)


def training_batch():
    """4 images, per-image class names; image 2 is normal with an all-zero mask."""
    names = ["metal_nut", "pcb1", "metal_nut", "bottle"]
    images = images_for(len(names), 31)
    g = torch.Generator().manual_seed(32)
    masks = torch.zeros(len(names), S, S)
    masks[0, 4:15, 6:20] = 1
    masks[1, 18:30, 2:11] = 1
    masks[3] = (torch.rand(S, S, generator=g) > 0.8).float()
    labels = (masks.flatten(1).amax(1) > 0).long()
    assert labels.tolist() == [1, 1, 0, 1] and masks[2].sum() == 0
    return names, images, masks, labels


def our_loss(m, images, names, masks, labels, stage):
    targets = methods.Targets(labels, masks, torch.ones(len(names), dtype=torch.bool), stage=stage)
    m.zero_grad(set_to_none=True)
    m.train()
    try:
        out = m(images, names, targets=targets)
    finally:
        m.eval()
    return out.loss


NAMES = ["metal_nut", "pcb1", "bottle", "metal_nut", "pcb1"]


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def fusion_model():
    return make_model(image_score="aaclip_minmax_fusion", class_names="aaclip_real_names")


@pytest.fixture(scope="module")
def medical_model():
    """grid 6 at 48 px: kornia's reflect padding of the 9-tap kernel needs a side > 4."""
    return make_model(image_score="aaclip_minmax_fusion", domain="medical",
                      backbone=dict(name="adaclip-tiny", pretrained=None, image_size=48))


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_transcription_guards(model):
    """The written-out blocks equal open_clip's own towers (no adapters, no V-V); the blur is kornia's."""
    m = model
    assert m.cfg.backbone.quick_gelu is False                              # exact GELU, as the reference
    assert len(m.clip.visual.transformer.resblocks) == N_VISION_BLOCKS
    assert all(isinstance(b.ls_1, torch.nn.Identity) and isinstance(b.ls_2, torch.nn.Identity)
               for b in list(m.clip.visual.transformer.resblocks) + list(m.clip.transformer.resblocks))
    assert len(m.image_adapters) == IMAGE_ADAPT_UNTIL and len(m.text_adapters) == TEXT_ADAPT_UNTIL
    ref = Ref(m)
    x = images_for(2, 7)
    with torch.no_grad():
        close(ref.plain_cls(x), m.clip.encode_image(x), "plain pooled feature", atol=1e-5, rtol=1e-5)
        v = m.clip.visual
        h = embed_image(v, x)
        out = v.forward_intermediates(x, indices=[i - 1 for i in LEVELS], output_fmt="NLC")
        for i, blk in enumerate(v.transformer.resblocks):
            h = block(h, blk)
            close(h[:, 1:], out["image_intermediates"][i], f"vision block {i}", atol=1e-5, rtol=1e-5)
        tok = ref.tokenizer(["a photo of a damaged metal nut.", "the bottle."])
        c = m.clip
        t = c.token_embedding(tok) + c.positional_embedding
        for blk in c.transformer.resblocks:
            t = block(t, blk, attn_mask=torch.full((77, 77), float("-inf")).triu(1))
        t = layer_norm(t, c.ln_final)[torch.arange(2), tok.argmax(-1)] @ c.text_projection
        close(t, c.encode_text(tok), "plain text tower", atol=1e-5, rtol=1e-5)
    # kornia's kernel: get_gaussian_kernel1d(7, 1) and a constant image is left unchanged (reflect)
    k = get_gaussian_kernel1d(7, 1.0)
    close(k, np.exp(-np.arange(-3, 4) ** 2 / 2) / np.exp(-np.arange(-3, 4) ** 2 / 2).sum(), "gaussian kernel")
    close(gaussian_blur2d(torch.full((1, 1, 4, 4), 3.0), (7, 7), (1.0, 1.0)), np.full((1, 1, 4, 4), 3.0), "blur")
    assert len([s for st in (PROMPTS["prompt_normal"], PROMPTS["prompt_abnormal"]) for s in st]) * 2 == 16


def test_text_features(model, fusion_model):
    """m.text_features == get_adapted_single_class_text_embedding per class, both name settings."""
    for m, name_fn in ((model, readable), (fusion_model, real_name)):
        ref = Ref(m)
        with torch.no_grad():
            ours = m.text_features(NAMES)
            expected = ref_texts(ref, NAMES, name_fn)
        assert ours.shape == (len(NAMES), 32, 2)
        close(ours, expected, f"text features ({m.cfg.class_names})", atol=1e-5)


def test_maps_readable_names(model):
    images = images_for(len(NAMES), 11)
    with torch.no_grad():
        out = model(images, NAMES)
    _, R = ref_predictions(Ref(model), images, NAMES, readable)
    assert out.pixel_scores.shape == (len(NAMES), S, S)
    check_maps(out.pixel_scores, R, "test maps, readable names")


def test_maps_and_score_parts_real_names(fusion_model):
    m = fusion_model
    assert m.transductive
    images = images_for(len(NAMES), 12)
    with torch.no_grad():
        out = m(images, NAMES)
    image_preds, R = ref_predictions(Ref(m), images, NAMES, real_name)
    check_maps(out.pixel_scores, R, "test maps, REAL_NAMES")
    assert out.score_parts.shape == (len(NAMES), 3)
    close(out.score_parts[:, 0], image_preds, "score_parts[:, 0] = (<det, t_abn> + 1)/2")
    close(out.score_parts[:, 1], R.max(axis=(1, 2)), "score_parts[:, 1] = max R", rtol=1e-5, atol=2e-3)
    close(out.score_parts[:, 2], R.min(axis=(1, 2)), "score_parts[:, 2] = min R", rtol=1e-5, atol=2e-3)
    # the real names matter: the readable names give other maps for every class here
    m_readable = make_model(image_score="aaclip_minmax_fusion")
    with torch.no_grad():
        other = m_readable(images, NAMES).pixel_scores
    assert ((other - out.pixel_scores).abs().amax(dim=(1, 2)) > 1e-3).all()


def test_maps_and_score_parts_medical(medical_model):
    m = medical_model
    names = ["pcb1", "bottle", "metal_nut", "bottle"]
    images = images_for(len(names), 13, side=48)
    with torch.no_grad():
        out = m(images, names)
    image_preds, R = ref_predictions(Ref(m), images, names, readable, domain="Medical", img_size=48)
    assert out.pixel_scores.shape == (len(names), 48, 48)
    check_maps(out.pixel_scores, R, "test maps, medical blur (9, 1.5)")
    close(out.score_parts[:, 0], image_preds, "medical score_parts[:, 0]")
    close(out.score_parts[:, 1], R.max(axis=(1, 2)), "medical max R", rtol=1e-5, atol=2e-3)
    close(out.score_parts[:, 2], R.min(axis=(1, 2)), "medical min R", rtol=1e-5, atol=2e-3)


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_finalize_scores(fusion_model, medical_model, domain):
    """metrics_eval's image score over a batch treated as one category's test set."""
    m = fusion_model if domain == "industrial" else medical_model
    side = m.image_size
    names = ["metal_nut"] * 6
    images = images_for(len(names), 14, side=side)
    with torch.no_grad():
        out = m(images, names)
    name_fn = real_name if m.cfg.class_names == "aaclip_real_names" else readable
    ref_domain = "Industrial" if domain == "industrial" else "Medical"
    image_preds, R = ref_predictions(Ref(m), images, names, name_fn, domain=ref_domain, img_size=side)
    expected = metrics_eval_image_preds(R, image_preds, ref_domain)
    ours = m.finalize_scores(out.score_parts.numpy())
    close(ours, expected, f"finalize_scores ({domain})")
    assert np.ptp(expected) > 0.1


@pytest.mark.parametrize("last_layer_only", [False, True])
def test_stage1_loss(last_layer_only):
    """train_text_adapter's loss (teacher image by image) and its gradients on the text weights."""
    m = make_model(stage1_last_layer_only=last_layer_only)
    names, images, masks, labels = training_batch()
    loss = our_loss(m, images, names, masks, labels, "text")
    ref = Ref(m)
    expected = ref_stage1_loss(ref, images, masks, names, readable, last_layer_only)
    close(loss, expected, f"stage-1 loss (last_layer_only={last_layer_only})")
    other = ref_stage1_loss(ref, images, masks, names, readable, not last_layer_only)
    assert abs(other.item() - expected.item()) > 1e-2, "the two stage-1 variants must differ here"
    params = list(m.text_adapters.parameters()) + list(m.text_proj.parameters())
    ref_grads = torch.autograd.grad(expected, params)
    loss.backward()
    for i, (p, g) in enumerate(zip(params, ref_grads)):
        assert_close_to_scale(p.grad, g, f"stage-1 grad of text weight {i}")
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.image_adapters.parameters())


def test_stage2_loss():
    """train_image_adapter's loss (CE without temperature + Σ layers seg loss) and its gradients."""
    m = make_model()
    names, images, masks, labels = training_batch()
    loss = our_loss(m, images, names, masks, labels, "image")
    ref = Ref(m)
    expected = ref_stage2_loss(ref, images, masks, labels, names, readable)
    close(loss, expected, "stage-2 loss")
    params = (list(m.image_adapters.parameters()) + list(m.seg_proj.parameters())
              + list(m.det_proj.parameters()))
    ref_grads = torch.autograd.grad(expected, params)
    loss.backward()
    for i, (p, g) in enumerate(zip(params, ref_grads)):
        assert_close_to_scale(p.grad, g, f"stage-2 grad of image weight {i}")


def test_stage1_literal_batch_axis_vv_teacher():
    """teacher_vv_axis="batch": the reference's literal teacher (V-V over the batch's images at each
    token position); the default (token-wise) gives another loss on the same batch."""
    m = make_model(stage1_last_layer_only=True, teacher_vv_axis="batch")
    names, images, masks, labels = training_batch()
    loss = our_loss(m, images, names, masks, labels, "text")
    ref = Ref(m)
    with torch.no_grad():
        literal = ref.literal_teacher_batch(images)
    expected = ref_stage1_loss(ref, images, masks, names, readable, True, teacher=literal)
    close(loss, expected, "stage-1 loss with the literal (batch-axis) V-V teacher")
    tokenwise = ref_stage1_loss(ref, images, masks, names, readable, True)
    assert abs(tokenwise.item() - expected.item()) > 1e-2, "the two teachers must differ here"
