"""The smallest complete method: a linear probe that maps the frozen CLIP's last-layer patch tokens
into the joint space, compared with "a photo of a {name}" / "a photo of a damaged {name}".

Not part of the library: it lives outside `lib/`, registers itself with `@methods.register` (or, from
an installed package, under the ``adaclip.methods`` entry point; see the README, "Adding a method"),
and from then on `adaclip train --method patchprobe`, `adaclip evaluate`, the notebooks and sweeps
run it like the built-in ones. `tests/test_method_contract.py` checks it as it checks them.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adaclip import methods
from adaclip.backbone import encode_image
from adaclip.config import BackboneCfg, ConfigBase
from adaclip.methods.losses import dice_loss, focal_loss
from adaclip.methods.shared import StateEnsemble, clip_class_probs, mean_logit_map
from adaclip.precision import full_precision


@dataclass
class PatchProbeConfig(ConfigBase):
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    smoothing_sigma: float = 4.0


@methods.register
class PatchProbe(methods.Method):
    name = "patchprobe"
    config_class = PatchProbeConfig
    paper = "an example method: a linear probe of the last layer's patch tokens"
    reference = "examples/patch_probe.py in the adaclip repository (MIT)"
    learns = "one linear map, last-layer patch tokens -> the joint space"
    train_defaults = dict(epochs=1, batch_size=8, lr=1e-3, betas=(0.9, 0.999), optimizer="adam")

    def __init__(self, cfg=None, clip=None, device=None):
        super().__init__(cfg if cfg is not None else PatchProbeConfig(), clip, device)
        visual = self.clip.visual
        self.proj = nn.Linear(visual.transformer.width, visual.output_dim)
        self.text = StateEnsemble(self.clip, self.cfg.backbone.name,
                                  lambda c: ([f"a photo of a {c}."], [f"a photo of a damaged {c}."]))

    def forward(self, images, class_names, targets=None, text_features=None, return_tokens=False, **unused):
        names = self.check_inputs(images, class_names)
        with torch.no_grad():                                   # the frozen CLIP
            feature, (tokens,) = encode_image(self.clip.visual, images, (len(self.clip.visual.transformer.resblocks),))
        text = self.text(names) if text_features is None else text_features        # (B, D, 2)
        with full_precision(images.device):
            patch = F.normalize(self.proj(tokens).float(), dim=-1)                 # (B, N, D)
            logits = 100.0 * torch.einsum("bnd,bdc->bnc", patch, text.float())
            pixel, _, maps = mean_logit_map([logits], self.image_size, self.cfg.smoothing_sigma)
            probs = clip_class_probs(feature.float(), text.float())
        out = methods.MethodOutput(probs[:, 1], pixel, probs, patch_tokens=[tokens] if return_tokens else None)
        if targets is not None:                                 # focal + Dice on the map (images with masks)
            has = targets.has_mask
            m = torch.softmax(maps[0][has], dim=1)
            seg = focal_loss(m, targets.masks[has]) + dice_loss(m[:, 1], targets.masks[has], targets.dice) \
                if bool(has.any()) else 0.0 * patch.sum()
            out.loss, out.loss_parts = seg, {"segmentation": float(seg.detach())}
        return out
