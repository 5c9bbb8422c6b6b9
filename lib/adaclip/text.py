"""Text prompt ensembles: the reference's normal / abnormal state words inside its templates."""
from __future__ import annotations

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                 "{} without defect", "{} without damage")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
             "a cropped photo of the {}.")


def state_sentences(class_name: str) -> tuple[list[str], list[str]]:
    """(normal, abnormal) sentences for one class: 7·4 = 28 and 5·4 = 20.

    `-` in class names becomes a space, as in the reference (e.g. "pcb-board" -> "pcb board").
    """
    name = class_name.replace("-", " ")
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal
