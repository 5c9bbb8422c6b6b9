"""Text prompt ensembles: each reference's normal / abnormal state words inside its templates.

AdaCLIP: 7 normal and 5 abnormal states in 4 templates (28 + 20 sentences). APRIL-GAN: the same
states in 35 templates (245 + 175). WinCLIP: 7 normal and 4 anomalous states (no "broken") in 21
templates (147 + 84); both re-implementations list "a jpeg corrupted photo of the {}." twice and
never the "a" variant (APRILGAN_WINCLIP_SPEC.md, Part 2), which ``winclip_templates("reference")``
keeps and the default replaces.
"""
from __future__ import annotations

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                 "{} without defect", "{} without damage")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
             "a cropped photo of the {}.")

APRILGAN_TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.", "a photo of a large {}.",
    "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a photo of the small {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "a dark photo of a {}.", "a photo of a cool {}.", "a photo of a small {}.", "there is a {} in the scene.",
    "there is the {} in the scene.", "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.")

WINCLIP_ABNORMAL_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
_WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.")


def winclip_templates(kind: str = "distinct") -> tuple[str, ...]:
    """WinCLIP's 21 templates: ``"reference"`` as both re-implementations list them (template 9
    repeats template 8), ``"distinct"`` with the missing "a jpeg corrupted photo of a {}." instead."""
    if kind == "reference":
        return _WINCLIP_TEMPLATES
    if kind == "distinct":
        return _WINCLIP_TEMPLATES[:8] + ("a jpeg corrupted photo of a {}.",) + _WINCLIP_TEMPLATES[9:]
    raise ValueError(f"winclip templates must be 'distinct' or 'reference', got {kind!r}")


def class_text(class_name: str, mode: str) -> str:
    """The words a class name becomes in the prompts: ``"adaclip"`` replaces "-" with a space (its
    reference), ``"readable"`` also "_" ("metal_nut" -> "metal nut"), ``"verbatim"`` keeps the folder
    name as APRIL-GAN and WinCLIP's references do."""
    if mode == "adaclip":
        return class_name.replace("-", " ")
    if mode == "readable":
        return class_name.replace("_", " ").replace("-", " ")
    if mode == "verbatim":
        return class_name
    raise ValueError(f"class-name mode must be 'adaclip', 'readable' or 'verbatim', got {mode!r}")


def sentences(class_name: str, normal_states, abnormal_states, templates) -> tuple[list[str], list[str]]:
    """(normal, abnormal) sentences: every state inside every template, states outermost."""
    normal = [t.format(s.format(class_name)) for s in normal_states for t in templates]
    abnormal = [t.format(s.format(class_name)) for s in abnormal_states for t in templates]
    return normal, abnormal


def state_sentences(class_name: str) -> tuple[list[str], list[str]]:
    """AdaCLIP's (normal, abnormal) sentences for one class: 7·4 = 28 and 5·4 = 20.

    `-` in class names becomes a space, as in the reference (e.g. "pcb-board" -> "pcb board").
    """
    return sentences(class_text(class_name, "adaclip"), NORMAL_STATES, ABNORMAL_STATES, TEMPLATES)
