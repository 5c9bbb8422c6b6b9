"""APRIL-GAN (VAND, arXiv 2305.17382) against an independent transcription of its reference code.

The transcription below follows ByChelsea/VAND-APRIL-GAN (commit f13b8a6; code unchanged since
f7967a4) step by step: ``prompt_ensemble.py`` (the 7 normal and 5 abnormal states, the 35 templates,
normalise / average / renormalise), ``model.py`` (``LinearLayer``: one ``nn.Linear`` per tapped
layer on the patch tokens without the class token), the vendored ``open_clip`` ViT forward (the
residual stream after each tapped block, class token included, no ``ln_post``; the pooled feature
``ln_post(x[:, 0]) @ proj``), ``test.py`` (batch size 1: image score softmax(100·ĝ @ T)[1]; per
layer 100·P @ T, bilinear ``align_corners=True`` upsampling, softmax over the 2 channels after
upsampling, channel 1; maps summed over layers; few-shot: raw residual tokens, 1 − max cosine via
sklearn, bilinear ``align_corners=True``, summed over layers and added to the zero-shot map; the
transductive image score 0.5·(s + minmax over the category of max(map))), ``few_shot.py`` (the
memory) and ``train.py`` / ``loss.py`` (Σ_k Focal(softmax map, mask) + Dice(abnormal, mask)).

It shares nothing with ``adaclip.methods.aprilgan`` except the frozen CLIP's parameters (``m.clip``)
and the heads' parameters (copied into the reference's own ``LinearLayer``). Our model is called
batched, with different class names in one batch; the reference is run image by image, as it does.
"""
import numpy as np
import open_clip
import pytest
import torch
from sklearn.metrics import pairwise
from torch import nn
from torch.nn import functional as F

from adaclip import methods
from helpers import assert_close_to_scale

S = 32                      # image side of adaclip-tiny
FEATURES_LIST = [1, 2, 3, 4]  # 1-based tapped blocks: adaclip-tiny has 4 visual layers
TOL = dict(rtol=1e-4, atol=1e-4)
SEED = 1234

# ---------------------------------------------------------------------------------------------
# The reference, transcribed
# ---------------------------------------------------------------------------------------------

# prompt_ensemble.py, written out literally
PROMPT_NORMAL = ['{}', 'flawless {}', 'perfect {}', 'unblemished {}', '{} without flaw', '{} without defect',
                 '{} without damage']
PROMPT_ABNORMAL = ['damaged {}', 'broken {}', '{} with flaw', '{} with defect', '{} with damage']
PROMPT_TEMPLATES = [
    'a bad photo of a {}.', 'a low resolution photo of the {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a bright photo of a {}.', 'a dark photo of the {}.', 'a photo of my {}.',
    'a photo of the cool {}.', 'a close-up photo of a {}.', 'a black and white photo of the {}.',
    'a bright photo of the {}.', 'a cropped photo of a {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a photo of one {}.',
    'a close-up photo of the {}.', 'a photo of a {}.', 'a low resolution photo of a {}.',
    'a photo of a large {}.', 'a blurry photo of a {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a photo of the small {}.', 'a photo of the large {}.',
    'a black and white photo of a {}.', 'a dark photo of a {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'there is a {} in the scene.', 'there is the {} in the scene.',
    'this is a {} in the scene.', 'this is the {} in the scene.', 'this is one {} in the scene.']


def encode_text_with_prompt_ensemble(model, objs, tokenizer):
    """prompt_ensemble.py: {obj: (D, 2)}, column 0 normal, column 1 abnormal."""
    text_prompts = {}
    for obj in objs:
        text_features = []
        for states in (PROMPT_NORMAL, PROMPT_ABNORMAL):
            prompted_state = [state.format(obj) for state in states]
            prompted_sentence = []
            for s in prompted_state:
                for template in PROMPT_TEMPLATES:
                    prompted_sentence.append(template.format(s))
            class_embeddings = model.encode_text(tokenizer(prompted_sentence))
            class_embeddings = class_embeddings / class_embeddings.norm(dim=-1, keepdim=True)
            class_embedding = class_embeddings.mean(dim=0)
            class_embedding = class_embedding / class_embedding.norm()
            text_features.append(class_embedding)
        text_prompts[obj] = torch.stack(text_features, dim=1)
    return text_prompts


class LinearLayer(nn.Module):
    """model.py (the ViT branch)."""

    def __init__(self, dim_in, dim_out, k):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(dim_in, dim_out) for _ in range(k)])

    def forward(self, tokens):
        tokens = list(tokens)
        for i in range(len(tokens)):
            tokens[i] = self.fc[i](tokens[i][:, 1:, :])
        return tokens


def encode_image(model, image, out_layers):
    """The vendored open_clip ``CLIP.encode_image(image, out_layers)``: (pooled (B, D), tokens after
    each 1-based block in ``out_layers`` (B, 1+N, W), class token included, no ln_post)."""
    v = model.visual
    x = v.conv1(image)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype),
                   x], dim=1)
    x = x + v.positional_embedding.to(x.dtype)
    x = v.ln_pre(x)
    patch_tokens = []
    for idx, r in enumerate(v.transformer.resblocks, start=1):   # open_clip 3.x blocks are batch-first
        x = r(x)
        if idx in out_layers:
            patch_tokens.append(x)
    pooled = v.ln_post(x[:, 0]) @ v.proj
    return pooled, patch_tokens


def ref_test_one(model, linearlayer, text_prompts, image, cls_name, mem_features=None):
    """test.py's loop body for one image (batch size 1): (pr_sp, anomaly_map (1, S, S) numpy)."""
    with torch.no_grad():
        image_features, patch_tokens = encode_image(model, image, FEATURES_LIST)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = torch.stack([text_prompts[cls_name]], dim=0)
        text_probs = (100.0 * image_features @ text_features[0]).softmax(dim=-1)
        pr_sp = text_probs[0][1].cpu().item()

        patch_tokens = linearlayer(patch_tokens)
        anomaly_maps = []
        for layer in range(len(patch_tokens)):
            patch_tokens[layer] = patch_tokens[layer] / patch_tokens[layer].norm(dim=-1, keepdim=True)
            anomaly_map = 100.0 * patch_tokens[layer] @ text_features
            B, L, C = anomaly_map.shape
            H = int(np.sqrt(L))
            anomaly_map = F.interpolate(anomaly_map.permute(0, 2, 1).view(B, 2, H, H),
                                        size=S, mode='bilinear', align_corners=True)
            anomaly_map = torch.softmax(anomaly_map, dim=1)[:, 1, :, :]
            anomaly_maps.append(anomaly_map.cpu().numpy())
        anomaly_map = np.sum(anomaly_maps, axis=0)

        if mem_features is not None:
            _, patch_tokens = encode_image(model, image, FEATURES_LIST)
            anomaly_maps_few_shot = []
            for idx, p in enumerate(patch_tokens):
                p = p[0, 1:, :]
                cos = pairwise.cosine_similarity(mem_features[cls_name][idx].cpu(), p.cpu())
                height = int(np.sqrt(cos.shape[1]))
                anomaly_map_few_shot = np.min((1 - cos), 0).reshape(1, 1, height, height)
                anomaly_map_few_shot = F.interpolate(torch.tensor(anomaly_map_few_shot),
                                                     size=S, mode='bilinear', align_corners=True)
                anomaly_maps_few_shot.append(anomaly_map_few_shot[0].cpu().numpy())
            anomaly_map = anomaly_map + np.sum(anomaly_maps_few_shot, axis=0)
    return pr_sp, anomaly_map


def ref_memory(model, shots):
    """few_shot.py: {obj: [per layer (K·N, W) raw tokens without the class token]}, images one by one."""
    mem_features = {}
    for obj, images in shots.items():
        features = []
        for image in images:
            with torch.no_grad():
                _, patch_tokens = encode_image(model, image[None], FEATURES_LIST)
                features.append([p[0, 1:, :] for p in patch_tokens])
        mem_features[obj] = [torch.cat([features[j][i] for j in range(len(features))], dim=0)
                             for i in range(len(features[0]))]
    return mem_features


def ref_transductive_scores(pr_sp, maps):
    """test.py's few-shot image score over one category's test images."""
    pr_sp = np.array(pr_sp)
    pr_sp_tmp = np.array([np.max(a) for a in maps])
    pr_sp_tmp = (pr_sp_tmp - pr_sp_tmp.min()) / (pr_sp_tmp.max() - pr_sp_tmp.min())
    return 0.5 * (pr_sp + pr_sp_tmp)


class FocalLoss(nn.Module):
    """loss.py's FocalLoss with its defaults (apply_nonlin None, alpha None, gamma 2, smooth 1e-5)."""

    def __init__(self, gamma=2, smooth=1e-5):
        super().__init__()
        self.gamma, self.smooth = gamma, smooth

    def forward(self, logit, target):
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
        if self.smooth:
            one_hot_key = torch.clamp(one_hot_key, self.smooth / (num_class - 1), 1.0 - self.smooth)
        pt = (one_hot_key * logit).sum(1) + self.smooth
        logpt = pt.log()
        alpha = torch.squeeze(alpha[idx])
        loss = -1 * alpha * torch.pow((1 - pt), self.gamma) * logpt
        return loss.mean()


class BinaryDiceLoss(nn.Module):
    """loss.py's BinaryDiceLoss."""

    def forward(self, input, targets):
        N = targets.size()[0]
        smooth = 1
        input_flat = input.view(N, -1)
        targets_flat = targets.view(N, -1)
        intersection = input_flat * targets_flat
        N_dice_eff = (2 * intersection.sum(1) + smooth) / (input_flat.sum(1) + targets_flat.sum(1) + smooth)
        return 1 - N_dice_eff.sum() / N


def ref_train_loss(model, linearlayer, text_prompts, image, cls_name, img_mask):
    """train.py's loss for one batch (the training forward is batched; the CLIP pass is no_grad)."""
    with torch.no_grad():
        _, patch_tokens = encode_image(model, image, FEATURES_LIST)
        text_features = torch.stack([text_prompts[cls] for cls in cls_name], dim=0)
    patch_tokens = linearlayer(patch_tokens)
    anomaly_maps = []
    for layer in range(len(patch_tokens)):
        patch_tokens[layer] = patch_tokens[layer] / patch_tokens[layer].norm(dim=-1, keepdim=True)
        anomaly_map = 100.0 * patch_tokens[layer] @ text_features
        B, L, C = anomaly_map.shape
        H = int(np.sqrt(L))
        anomaly_map = F.interpolate(anomaly_map.permute(0, 2, 1).view(B, 2, H, H),
                                    size=S, mode='bilinear', align_corners=True)
        anomaly_maps.append(torch.softmax(anomaly_map, dim=1))
    gt = img_mask.squeeze().clone()
    gt[gt > 0.5], gt[gt <= 0.5] = 1, 0
    loss_focal, loss_dice = FocalLoss(), BinaryDiceLoss()
    loss = 0
    for num in range(len(anomaly_maps)):
        loss += loss_focal(anomaly_maps[num], gt)
        loss += loss_dice(anomaly_maps[num][:, 1, :, :], gt)
    return loss


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------

def readable(name):
    return name.replace("_", " ").replace("-", " ")


def make_model(**fields):
    torch.manual_seed(SEED)
    return methods.create("aprilgan", backbone=dict(name="adaclip-tiny", pretrained=None, image_size=S),
                          **fields).eval()


def perturb_heads(m, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.learnable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def reference_heads(m):
    """The reference's LinearLayer holding our heads' weights (copies, not shared)."""
    clip = m.clip
    layer = LinearLayer(clip.visual.conv1.out_channels, clip.visual.proj.shape[1], len(FEATURES_LIST))
    layer.fc.load_state_dict({k: v.detach().clone() for k, v in m.heads.state_dict().items()})
    return layer.eval()


def same_module_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def model():
    m = make_model()
    perturb_heads(m)
    return m


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("adaclip-tiny")


@pytest.fixture(scope="module")
def text_cache(model, tokenizer):
    """Reference text features per literal class string, computed once (the reference does per class)."""
    cache = {}

    def get(objs):
        todo = [o for o in dict.fromkeys(objs) if o not in cache]
        if todo:
            with torch.no_grad():
                cache.update(encode_text_with_prompt_ensemble(model.clip, todo, tokenizer))
        return cache
    return get


NAMES = ["metal_nut", "pipe_fryum", "bottle", "metal_nut", "juice-bottle"]


def images_for(n, seed):
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def run_reference(m, text_cache, images, names, mem_features=None):
    heads = reference_heads(m)
    prompts = text_cache(names)
    scores, maps = [], []
    for image, name in zip(images, names):
        s, a = ref_test_one(m.clip, heads, prompts, image[None], name, mem_features)
        scores.append(s)
        maps.append(a[0])
    return np.array(scores), np.stack(maps)


def close(actual, expected, what):
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, err_msg=what, **TOL)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_transcription_taps_match_open_clip(model):
    """Guard on the transcription itself: its block loop equals open_clip's forward_intermediates."""
    x = images_for(2, 7)
    with torch.no_grad():
        pooled, taps = encode_image(model.clip, x, FEATURES_LIST)
        out = model.clip.visual.forward_intermediates(x, indices=[i - 1 for i in FEATURES_LIST], output_fmt="NLC")
    torch.testing.assert_close(pooled, out["image_features"], rtol=1e-5, atol=1e-5)
    for t, o in zip(taps, out["image_intermediates"]):
        torch.testing.assert_close(t[:, 1:], o, rtol=1e-5, atol=1e-5)
    assert len(PROMPT_TEMPLATES) == len(set(PROMPT_TEMPLATES)) == 35


def test_text_features_match_reference_ensemble(model, text_cache):
    """Our (B, D, 2) text features equal the reference's 245/175-sentence ensemble per class."""
    names = ["metal_nut", "bottle"]
    prompts = text_cache([readable(n) for n in names])
    with torch.no_grad():
        ours = model.text_features(names)
    for i, n in enumerate(names):
        close(ours[i], prompts[readable(n)].numpy(), f"text features of {n!r}")


def test_zero_shot_readable_names(model, text_cache):
    images = images_for(len(NAMES), 11)
    with torch.no_grad():
        out = model(images, NAMES)
    scores, maps = run_reference(model, text_cache, images, [readable(n) for n in NAMES])
    assert out.pixel_scores.shape == (len(NAMES), S, S)
    assert maps.max() > 1.0, "the reference map is a sum over 4 layers (range [0, 4])"
    close(out.image_scores, scores, "zero-shot image scores")
    close(out.pixel_scores, maps / 4, "zero-shot pixel maps (reference sum / 4)")


def test_zero_shot_verbatim_names(model, text_cache):
    m = make_model(class_names="verbatim")
    assert same_module_params(m.clip, model.clip), "same init seed must give the same frozen CLIP"
    m.heads.load_state_dict(model.heads.state_dict())
    images = images_for(len(NAMES), 11)
    with torch.no_grad():
        out = m(images, NAMES)
        out_readable = model(images, NAMES)
    scores, maps = run_reference(m, text_cache, images, NAMES)
    close(out.image_scores, scores, "zero-shot image scores, verbatim names")
    close(out.pixel_scores, maps / 4, "zero-shot pixel maps, verbatim names")
    # the names with "_" / "-" must differ between the two settings; "bottle" must not
    diff = (out.pixel_scores - out_readable.pixel_scores).abs().amax(dim=(1, 2))
    for n, d in zip(NAMES, diff.tolist()):
        if n == readable(n):
            assert d == 0.0, n
        else:
            assert d > 1e-3, f"class_names='verbatim' should change the map of {n!r} (max diff {d})"


def _few_shot_setup(m):
    shots = {"metal_nut": images_for(2, 21), "pipe_fryum": images_for(2, 22)}
    mem = m.few_shot_memory()
    for key, imgs in shots.items():
        mem.add(key, imgs, key)
    names = ["metal_nut", "pipe_fryum", "metal_nut", "pipe_fryum", "metal_nut", "pipe_fryum"]
    images = images_for(len(names), 23)
    with torch.no_grad():
        fs = mem.apply(m(images, names, return_tokens=True), names)
    return shots, names, images, fs


def test_few_shot_fixed(model, text_cache):
    shots, names, images, fs = _few_shot_setup(model)
    mem_features = ref_memory(model.clip, {readable(k): v for k, v in shots.items()})
    scores, maps = run_reference(model, text_cache, images, [readable(n) for n in names], mem_features)
    assert maps.max() > 4.0, "few-shot reference map adds the distance map to the [0, 4] zero-shot one"
    close(fs.pixel_scores, maps / 12, "few-shot pixel maps (reference / 12)")
    close(fs.score_parts[:, 0], scores, "score_parts[:, 0] = zero-shot image score")
    close(fs.score_parts[:, 1], maps.max(axis=(1, 2)), "score_parts[:, 1] = max of the reference map")
    close(fs.image_scores, 0.5 * (scores + maps.max(axis=(1, 2)) / 12), "few-shot 'fixed' image scores")


def test_few_shot_test_minmax(model, text_cache):
    m = make_model(few_shot_image_score="test_minmax")
    m.heads.load_state_dict(model.heads.state_dict())
    assert m.transductive
    shots, names, images, fs = _few_shot_setup(m)
    mem_features = ref_memory(m.clip, {readable(k): v for k, v in shots.items()})
    scores, maps = run_reference(m, text_cache, images, [readable(n) for n in names], mem_features)
    close(fs.pixel_scores, maps / 12, "few-shot pixel maps (test_minmax config)")
    parts = fs.score_parts.detach().cpu().numpy()
    for cls in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == cls]
        expected = ref_transductive_scores(scores[idx], list(maps[idx]))
        close(m.finalize_scores(parts[idx]), expected, f"transductive image scores of {cls!r}")


def test_training_loss(model, text_cache):
    names = ["metal_nut", "pipe_fryum", "bottle", "juice-bottle"]
    images = images_for(len(names), 31)
    g = torch.Generator().manual_seed(32)
    masks = torch.zeros(len(names), S, S)
    masks[0, 4:15, 6:20] = 1
    masks[1, 20:30, 2:9] = 1
    masks[3] = (torch.rand(S, S, generator=g) > 0.8).float()       # scattered pixels; image 2 normal
    labels = (masks.flatten(1).amax(1) > 0).long()
    targets = methods.Targets(labels, masks, torch.ones(len(names), dtype=torch.bool))

    model.zero_grad(set_to_none=True)
    model.train()
    try:
        out = model(images, names, targets=targets)
    finally:
        model.eval()
    heads = reference_heads(model)
    ref = ref_train_loss(model.clip, heads, text_cache([readable(n) for n in names]), images,
                         [readable(n) for n in names], masks[:, None])
    close(out.loss, ref.item(), "training loss")
    # the gradients reaching the heads agree too
    out.loss.backward()
    ref.backward()
    for i, fc in enumerate(heads.fc):
        assert_close_to_scale(model.heads[i].weight.grad, fc.weight.grad, f"grad of head {i} weight")
        assert_close_to_scale(model.heads[i].bias.grad, fc.bias.grad, f"grad of head {i} bias")
    model.zero_grad(set_to_none=True)


def test_official_checkpoint(model, text_cache, tmp_path):
    clip = model.clip
    torch.manual_seed(SEED + 1)
    official = LinearLayer(clip.visual.conv1.out_channels, clip.visual.proj.shape[1], len(FEATURES_LIST))
    with torch.no_grad():
        for p in official.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.clone() for k, v in official.state_dict().items()}
    assert sorted(sd) == sorted(f"fc.{i}.{w}" for i in range(4) for w in ("weight", "bias"))
    path = tmp_path / "epoch_3.pth"
    torch.save({"trainable_linearlayer": sd}, path)

    m = make_model()
    assert same_module_params(m.clip, model.clip)
    m.load_official_checkpoint(path)
    for i in range(4):
        assert torch.equal(m.heads[i].weight, sd[f"fc.{i}.weight"]), i
        assert torch.equal(m.heads[i].bias, sd[f"fc.{i}.bias"]), i

    images = images_for(len(NAMES), 41)
    with torch.no_grad():
        out = m(images, NAMES)
    prompts = text_cache([readable(n) for n in NAMES])
    scores, maps = [], []
    for image, name in zip(images, NAMES):
        s, a = ref_test_one(m.clip, official.eval(), prompts, image[None], readable(name))
        scores.append(s)
        maps.append(a[0])
    close(out.image_scores, np.array(scores), "image scores with the official heads")
    close(out.pixel_scores, np.stack(maps) / 4, "pixel maps with the official heads")

    # what each release file learned from, as its name says (mvtec_pretrained.pth: trained on MVTec AD,
    # set beside the published rows of that model); a file of another name: unknown
    assert m.trained_on is None
    for stem, data in (("mvtec_pretrained", "mvtec"), ("visa_pretrained", "visa")):
        torch.save({"trainable_linearlayer": sd}, tmp_path / f"{stem}.pth")
        assert make_model().load_official_checkpoint(tmp_path / f"{stem}.pth").trained_on == data, stem

    # the reference loads strictly: a file missing a head is refused
    bad = dict(sd)
    del bad["fc.3.bias"]
    torch.save({"trainable_linearlayer": bad}, tmp_path / "bad.pth")
    with pytest.raises(Exception):
        make_model().load_official_checkpoint(tmp_path / "bad.pth")
