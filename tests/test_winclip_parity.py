"""WinCLIP against an independent transcription of anomalib's re-implementation, image by image.

WinCLIP (Jeong et al., CVPR 2023) has no official code. The transcription below follows
open-edge-platform/anomalib (b723368) ``src/anomalib/models/image/winclip/{torch_model,prompting,utils}.py``
as APRILGAN_WINCLIP_SPEC.md Part 2 describes it: window index sets from ``make_masks`` (unfold over an
index grid), a per-window encoder pass over [class token, the window's k² tokens] with their own
positional embeddings (taken before ``ln_pre`` with a forward hook on ``patch_dropout``, as anomalib
does), the temperature-0.07 class score, the harmonic aggregation loop, the harmonic mean with the
image score, bilinear upsampling (``align_corners=False``), and WinCLIP+'s memory and fusion
((Z + F) / 2, image score (z0 + max F) / 2). Prompt states and templates are written out literally from
anomalib's prompting.py; text is tokenised with open_clip's plain ``tokenize``.

One deliberate departure from anomalib: its NLD -> LND permute before ``visual.transformer`` is only
right for open_clip < 2.26. The installed open_clip 3.3.0 transformer is batch-first, so the window
sequences run batch-first here (each window an independent sequence). The few-shot "raw" patch tokens
are zqhang/Accurate-WinCLIP-pytorch's (last-block residual tokens without ``ln_post``).

The transcription shares only the frozen CLIP (``m.clip``) with the code under test; it runs at batch
size 1 per query image while the model under test runs the whole batch at once.
"""
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import tokenize
from torch import nn

from adaclip import methods

BACKBONE = dict(name="adaclip-tiny", pretrained=None, image_size=32)
ATOL = 1e-4
TEMPERATURE = 0.07  # anomalib torch_model.py TEMPERATURE

# anomalib prompting.py
NORMAL_STATES = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
]
ANOMALOUS_STATES = [
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
]
TEMPLATES = [
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
]
# our "distinct" list: the duplicate (9th) replaced by the missing "a" variant
DISTINCT_TEMPLATES = TEMPLATES[:8] + ["a jpeg corrupted photo of a {}."] + TEMPLATES[9:]
TEMPLATE_LISTS = {"reference": TEMPLATES, "distinct": DISTINCT_TEMPLATES}

CLASS_NAMES = ["bottle", "metal_nut", "pipe_fryum", "screw"]


def readable(name: str) -> str:
    return name.replace("_", " ").replace("-", " ")


def create_prompt_ensemble(class_name, templates):
    """prompting.py create_prompt_ensemble (template list passed in)."""
    normal_states = [state.format(class_name) for state in NORMAL_STATES]
    normal_ensemble = [template.format(state) for state in normal_states for template in templates]
    anomalous_states = [state.format(class_name) for state in ANOMALOUS_STATES]
    anomalous_ensemble = [template.format(state) for state in anomalous_states for template in templates]
    return normal_ensemble, anomalous_ensemble


# ---------------------------------------------------------------- anomalib utils.py
def cosine_similarity(input1, input2):
    ndim = input1.ndim
    input1 = input1.unsqueeze(0) if input1.ndim == 2 else input1
    input2 = input2.repeat(input1.shape[0], 1, 1) if input2.ndim == 2 else input2
    input1_norm = nn.functional.normalize(input1, p=2, dim=-1)
    input2_norm = nn.functional.normalize(input2, p=2, dim=-1)
    similarity = torch.bmm(input1_norm, input2_norm.transpose(-2, -1))
    if ndim == 2:
        return similarity.squeeze(0)
    return similarity


def class_scores(image_embeddings, text_embeddings, temperature=1.0, target_class=None):
    scores = (cosine_similarity(image_embeddings, text_embeddings) / temperature).softmax(dim=-1)
    if target_class is not None:
        return scores[..., target_class]
    return scores


def harmonic_aggregation(window_scores, output_size, masks):
    batch_size = window_scores.shape[0]
    height, width = output_size
    scores = []
    for idx in range(height * width):
        patch_mask = torch.any(masks == idx, dim=0)  # which windows contain the patch
        scores.append(sum(patch_mask) / (1 / window_scores.T[patch_mask]).sum(dim=0))
    return torch.stack(scores).T.reshape(batch_size, height, width).nan_to_num(posinf=0.0)


def visual_association_score(embeddings, reference_embeddings):
    reference_embeddings = reference_embeddings.reshape(-1, embeddings.shape[-1])
    scores = cosine_similarity(embeddings, reference_embeddings)
    return (1 - scores).min(dim=-1)[0] / 2


def make_masks(grid_size, kernel_size, stride=1):
    height, width = grid_size
    grid = torch.arange(height * width).reshape(1, height, width)
    return nn.functional.unfold(grid.float(), kernel_size=kernel_size, stride=stride).int()


# ---------------------------------------------------------------- anomalib torch_model.py
# encoder outputs by (clip, input): the tests share one frozen CLIP, and these CPUs are slow and shared
_CACHE = {}


class ReferenceWinClip:
    """anomalib's WinClipModel around a given open_clip CLIP (batch-first window pass, see the module doc)."""

    def __init__(self, clip, class_name, templates=DISTINCT_TEMPLATES, text_norm="mean", patch_tokens="ln_post",
                 scales=(2, 3), temperature=TEMPERATURE):
        self.clip = clip
        self.templates = templates
        self.text_norm = text_norm
        self.patch_tokens = patch_tokens
        self.scales = scales
        self.temperature = temperature
        self.grid_size = tuple(clip.visual.grid_size)
        self.masks = [make_masks(self.grid_size, scale, 1) for scale in self.scales]
        self.k_shot = 0
        self.text_embeddings = self._collect_text_embeddings(class_name)

    def _encode_text(self, prompts):
        key = (id(self.clip), tuple(prompts))
        if key not in _CACHE:
            _CACHE[key] = self.clip.encode_text(tokenize(prompts))
        return _CACHE[key]

    @torch.no_grad()
    def _collect_text_embeddings(self, class_name):
        normal_prompts, anomalous_prompts = create_prompt_ensemble(class_name, self.templates)
        normal_embeddings = self._encode_text(normal_prompts)
        anomalous_embeddings = self._encode_text(anomalous_prompts)
        if self.text_norm == "per_sentence":  # CLIP-style option (not in anomalib)
            normal_embeddings = F.normalize(normal_embeddings, dim=-1)
            anomalous_embeddings = F.normalize(anomalous_embeddings, dim=-1)
        normal_embeddings = torch.mean(normal_embeddings, dim=0, keepdim=True)
        anomalous_embeddings = torch.mean(anomalous_embeddings, dim=0, keepdim=True)
        return torch.cat((normal_embeddings, anomalous_embeddings))

    @torch.no_grad()
    def setup_reference(self, reference_images):
        """_collect_visual_embeddings, one reference image at a time (anomalib batches them: same result)."""
        encoded = [self.encode_image(image[None]) for image in reference_images]
        self.k_shot = reference_images.shape[0]
        self.visual_embeddings = [torch.cat([e[1][i] for e in encoded]) for i in range(len(self.scales))]
        self.patch_embeddings = torch.cat([e[2] for e in encoded])

    def encode_image(self, batch):
        key = (id(self.clip), self.patch_tokens, batch.numpy().tobytes())
        if key not in _CACHE:
            _CACHE[key] = self._encode_image(batch)
        return _CACHE[key]

    @torch.no_grad()
    def _encode_image(self, batch):
        visual = self.clip.visual
        outputs = {}

        def get_feature_map(_model, inputs, _outputs):
            outputs["feature_map"] = inputs[0].detach()

        def get_last_block(_model, _inputs, out):
            outputs["last_block"] = out.detach()

        hooks = [visual.patch_dropout.register_forward_hook(get_feature_map),
                 visual.transformer.register_forward_hook(get_last_block)]
        output_tokens = visual.output_tokens
        visual.output_tokens = True
        try:
            image_embeddings, patch_embeddings = self.clip.encode_image(batch)
        finally:
            visual.output_tokens = output_tokens
            for hook in hooks:
                hook.remove()
        if self.patch_tokens == "raw":  # zqhang: last-block residual tokens, no ln_post
            patch_embeddings = outputs["last_block"][:, 1:]
        feature_map = outputs["feature_map"]
        window_embeddings = [self._get_window_embeddings(feature_map, masks) for masks in self.masks]
        return image_embeddings, window_embeddings, patch_embeddings

    def _get_window_embeddings(self, feature_map, masks, permute=False):
        visual = self.clip.visual
        batch_size = feature_map.shape[0]
        n_masks = masks.shape[1]
        class_index = torch.zeros(1, n_masks, dtype=int)
        masks = torch.cat((class_index, masks + 1)).T  # +1 for the class token
        masked = torch.cat([torch.index_select(feature_map, 1, mask) for mask in masks])
        masked = visual.patch_dropout(masked)
        masked = visual.ln_pre(masked)
        if permute:  # anomalib verbatim (open_clip < 2.26); on a batch-first transformer windows mix
            masked = visual.transformer(masked.permute(1, 0, 2)).permute(1, 0, 2)
        else:
            masked = visual.transformer(masked)  # batch-first: one independent sequence per window
        masked = visual.ln_post(masked)
        pooled, _ = visual._global_pool(masked)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled.reshape((n_masks, batch_size, -1)).permute(1, 0, 2)

    @torch.no_grad()
    def forward(self, batch):
        image_embeddings, window_embeddings, patch_embeddings = self.encode_image(batch)
        image_scores = class_scores(image_embeddings, self.text_embeddings, self.temperature, target_class=1)
        multi_scale_scores = self._compute_zero_shot_scores(image_scores, window_embeddings)
        if self.k_shot:
            few_shot_scores = self._compute_few_shot_scores(patch_embeddings, window_embeddings)
            multi_scale_scores = (multi_scale_scores + few_shot_scores) / 2
            image_scores = (image_scores + few_shot_scores.amax(dim=(-2, -1))) / 2
        pixel_scores = nn.functional.interpolate(multi_scale_scores.unsqueeze(1), size=batch.shape[-2:],
                                                 mode="bilinear")
        return image_scores, pixel_scores.squeeze(1)

    def _compute_zero_shot_scores(self, image_scores, window_embeddings):
        multi_scale_scores = [image_scores.view(-1, 1, 1).repeat(1, self.grid_size[0], self.grid_size[1])]
        for window_embedding, mask in zip(window_embeddings, self.masks, strict=True):
            scores = class_scores(window_embedding, self.text_embeddings, self.temperature, target_class=1)
            multi_scale_scores.append(harmonic_aggregation(scores, self.grid_size, mask))
        return (len(self.scales) + 1) / (1 / torch.stack(multi_scale_scores)).sum(dim=0)

    def _compute_few_shot_scores(self, patch_embeddings, window_embeddings):
        multi_scale_scores = [
            visual_association_score(patch_embeddings, self.patch_embeddings).reshape((-1, *self.grid_size)),
        ]
        for window_embedding, reference_embedding, mask in zip(window_embeddings, self.visual_embeddings,
                                                               self.masks, strict=True):
            scores = visual_association_score(window_embedding, reference_embedding)
            multi_scale_scores.append(harmonic_aggregation(scores, self.grid_size, mask))
        return torch.stack(multi_scale_scores).mean(dim=0)


def reference_scores(clip, images, class_names, reference_images=None, **options):
    """The transcription image by image (batch size 1), one ReferenceWinClip per class name."""
    models, image_scores, pixel_scores = {}, [], []
    for image, name in zip(images, class_names):
        if name not in models:
            models[name] = ReferenceWinClip(clip, name, **options)
            if reference_images is not None:
                models[name].setup_reference(reference_images)
        s, p = models[name].forward(image[None])
        image_scores.append(s)
        pixel_scores.append(p)
    return torch.cat(image_scores), torch.cat(pixel_scores)


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def base():
    """The model under test; its frozen CLIP is shared with the transcription. open_clip initialises
    every LayerNorm to the identity, which would make ``ln_post`` nearly invisible to a cosine (raw vs
    ln_post patch tokens); random LayerNorm affines make every step of the computation show."""
    m = methods.create("winclip", backbone=dict(BACKBONE)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in m.clip.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    return m


_VARIANTS = {}


def variant(base, **fields):
    """Another WinCLIP config around the same frozen CLIP (built once per module: text features are
    the slow part on these CPUs)."""
    cfg = methods.config("winclip", backbone=dict(BACKBONE), **fields)
    if cfg.to_dict() == base.cfg.to_dict():
        return base
    key = (id(base.clip), tuple(sorted(fields.items())))
    if key not in _VARIANTS:
        _VARIANTS[key] = methods.WinCLIP(cfg, clip=base.clip).eval()
    return _VARIANTS[key]


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def assert_close(ours, ref, what):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs difference {diff:.3g} > {ATOL}"


def check(model, images, names, ref_names, **options):
    out = model(images, names)
    ref_image, ref_pixel = reference_scores(model.clip, images, ref_names, **options)
    assert_close(out.image_scores, ref_image, "image scores")
    assert_close(out.pixel_scores, ref_pixel, "pixel scores")
    return out


def text_directions(model, names):
    """Our (B, D, 2) text features as unit vectors, (B, 2, D)."""
    with torch.no_grad():
        return F.normalize(model.text_features(names).float().transpose(1, 2), dim=-1)


# ---------------------------------------------------------------- tests
def test_sanity_tiny_backbone(base):
    """What the rest relies on: the 4x4 grid, 9 + 4 windows, open_clip's batch-first transformer."""
    visual = base.clip.visual
    assert tuple(visual.grid_size) == (4, 4)
    assert [make_masks((4, 4), k).shape[1] for k in (2, 3)] == [9, 4]
    assert visual.transformer.batch_first and not visual.output_tokens
    assert int(open_clip.__version__.split(".")[0]) >= 3


def test_zero_shot_defaults(base, images):
    """Default config: readable names, distinct templates, raw mean of sentence features, tau 0.07."""
    out = check(base, images, CLASS_NAMES, [readable(n) for n in CLASS_NAMES])
    assert out.image_scores.shape == (4,) and out.pixel_scores.shape == (4, 32, 32)
    # different class names (hence text features) per image really matter
    swapped = base(images, CLASS_NAMES[::-1])
    assert (swapped.image_scores - out.image_scores).abs().max() > 10 * ATOL


@pytest.mark.parametrize("templates", ["reference", "distinct"])
def test_templates(base, images, templates):
    """Each template list matches the transcription with that list (text directions to 1e-5)."""
    model = variant(base, templates=templates)
    names = [readable(n) for n in CLASS_NAMES]
    check(model, images, CLASS_NAMES, names, templates=TEMPLATE_LISTS[templates])
    ref_text = torch.stack([ReferenceWinClip(base.clip, n, templates=TEMPLATE_LISTS[templates]).text_embeddings
                            for n in names])
    diff = (text_directions(model, CLASS_NAMES) - F.normalize(ref_text, dim=-1)).abs().max().item()
    assert diff < 1e-5, diff


def test_templates_reference_and_distinct_differ(base, images):
    ours = {t: variant(base, templates=t) for t in ("reference", "distinct")}
    text = {t: text_directions(m, CLASS_NAMES) for t, m in ours.items()}
    assert (text["reference"] - text["distinct"]).abs().max() > 1e-4
    outs = {t: m(images, CLASS_NAMES) for t, m in ours.items()}
    assert (outs["reference"].pixel_scores - outs["distinct"].pixel_scores).abs().max() > 10 * ATOL
    assert (outs["reference"].image_scores - outs["distinct"].image_scores).abs().max() > 10 * ATOL
    assert base.cfg.templates == "distinct"  # the default


def test_text_norm_per_sentence(base, images):
    model = variant(base, text_norm="per_sentence")
    names = [readable(n) for n in CLASS_NAMES]
    out = check(model, images, CLASS_NAMES, names, text_norm="per_sentence")
    ref_text = torch.stack([ReferenceWinClip(base.clip, n, text_norm="per_sentence").text_embeddings for n in names])
    assert (text_directions(model, CLASS_NAMES) - F.normalize(ref_text, dim=-1)).abs().max() < 1e-5
    # it is a different computation from the default
    ref_mean = torch.stack([ReferenceWinClip(base.clip, n).text_embeddings for n in names])
    assert (text_directions(model, CLASS_NAMES) - F.normalize(ref_mean, dim=-1)).abs().max() > 1e-4
    assert (out.pixel_scores - base(images, CLASS_NAMES).pixel_scores).abs().max() > ATOL


def test_default_text_is_the_raw_mean(base):
    """text_norm="mean": sentence features averaged unnormalised (both references), not per-sentence."""
    names = [readable(n) for n in CLASS_NAMES]
    ref_text = torch.stack([ReferenceWinClip(base.clip, n).text_embeddings for n in names])
    assert (text_directions(base, CLASS_NAMES) - F.normalize(ref_text, dim=-1)).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["verbatim", "readable"])
def test_class_names(base, images, mode):
    model = variant(base, class_names=mode)
    names = ["metal_nut", "pipe-fryum", "metal_nut", "screw"]
    ref_names = names if mode == "verbatim" else [readable(n) for n in names]
    check(model, images, names, ref_names)


def test_class_names_verbatim_and_readable_differ(base, images):
    names = ["metal_nut"] * 4
    verbatim = variant(base, class_names="verbatim")(images, names)
    readable_ = variant(base, class_names="readable")(images, names)
    assert (verbatim.pixel_scores - readable_.pixel_scores).abs().max() > 10 * ATOL
    assert (verbatim.image_scores - readable_.image_scores).abs().max() > 10 * ATOL


@pytest.mark.parametrize("tokens", ["ln_post", "raw"])
def test_few_shot(base, images, tokens):
    """WinCLIP+ with K=2: memory of patch tokens and window features, (Z + F)/2, (z0 + max F)/2."""
    model = variant(base, few_shot_patch_tokens=tokens)
    refs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    mem = model.few_shot_memory()
    mem.add("key", refs, "metal_nut")
    fs = mem.apply(model(images, CLASS_NAMES, return_tokens=True), ["key"] * len(images))
    ref_image, ref_pixel = reference_scores(base.clip, images, [readable(n) for n in CLASS_NAMES],
                                            reference_images=refs, patch_tokens=tokens)
    assert_close(fs.image_scores, ref_image, "few-shot image scores")
    assert_close(fs.pixel_scores, ref_pixel, "few-shot pixel scores")
    # the other patch-token choice gives another map (so the option is really exercised)
    other = "raw" if tokens == "ln_post" else "ln_post"
    _, other_pixel = reference_scores(base.clip, images, [readable(n) for n in CLASS_NAMES],
                                      reference_images=refs, patch_tokens=other)
    assert (other_pixel - ref_pixel).abs().max() > 10 * ATOL
    # and few-shot changes the zero-shot result
    zero = model(images, CLASS_NAMES)
    assert (fs.pixel_scores - zero.pixel_scores).abs().max() > 10 * ATOL


def test_few_shot_query_equal_to_a_shot(base, images):
    """A query that is one of the shots: its windows' association scores are exactly 0, which the
    references' loops turn into 0 at the covered patches (no NaN: only covering windows are summed)."""
    refs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    mem = base.few_shot_memory()
    mem.add("key", refs, "bottle")
    queries = torch.stack([refs[0], images[1]])
    fs = mem.apply(base(queries, ["bottle"] * 2, return_tokens=True), ["key"] * 2)
    ref_image, ref_pixel = reference_scores(base.clip, queries, ["bottle"] * 2, reference_images=refs)
    assert torch.isfinite(ref_pixel).all() and torch.isfinite(ref_image).all()
    assert_close(fs.image_scores, ref_image, "few-shot image scores, query = a shot")
    assert_close(fs.pixel_scores, ref_pixel, "few-shot pixel scores, query = a shot")


def single_window_features(clip, image, k):
    """Each k x k window on its own: one encoder pass over [cls, its k² tokens] (positions kept)."""
    visual = clip.visual
    with torch.no_grad():
        x = visual.conv1(image[None]).flatten(2).transpose(1, 2)                        # (1, N, W)
        x = torch.cat([visual.class_embedding.reshape(1, 1, -1), x], dim=1) + visual.positional_embedding
        feats = []
        for window in make_masks(tuple(visual.grid_size), k).T.long():                  # (k²,) patch indices
            seq = torch.cat([x[:, :1], x[:, 1 + window]], dim=1)                        # (1, 1 + k², W)
            seq = visual.transformer(visual.ln_pre(seq))
            feats.append(visual.ln_post(seq[:, 0]) @ visual.proj)
        return torch.cat(feats)                                                         # (n_win, D)


def test_windows_do_not_interact(base, images):
    """Our packed window pass equals one encoder pass per window, image per image, every scale."""
    out = base(images, CLASS_NAMES, return_details=True)
    windows = out.details["window_features"]
    assert [tuple(w.shape) for w in windows] == [(4, 9, 32), (4, 4, 32)]
    for b, image in enumerate(images):
        for w, k in zip(windows, (2, 3)):
            single = single_window_features(base.clip, image, k)
            diff = (w[b].float() - single).abs().max().item()
            assert diff < 1e-4, f"image {b}, scale {k}: window features differ by {diff:.3g}"
    # the test can see interaction: anomalib's verbatim LND permute on this batch-first transformer
    # lets the windows attend to each other and changes the features far beyond the tolerance
    ref = ReferenceWinClip(base.clip, "bottle")
    with torch.no_grad():
        visual = base.clip.visual
        x = visual.conv1(images[:1]).flatten(2).transpose(1, 2)
        fmap = torch.cat([visual.class_embedding.reshape(1, 1, -1), x], dim=1) + visual.positional_embedding
        mixed = ref._get_window_embeddings(fmap, ref.masks[0], permute=True)[0]
        apart = ref._get_window_embeddings(fmap, ref.masks[0])[0]
    assert (apart - single_window_features(base.clip, images[0], 2)).abs().max() < 1e-4
    assert (mixed - apart).abs().max() > 1e-2
