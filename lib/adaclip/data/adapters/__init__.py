"""Dataset adapters: official folder layouts -> manifest rows.

``ADAPTERS[name]`` is ``(function, default folder under the data root)``; every function takes
``(folder, root, dataset)`` and returns rows whose paths are relative to ``root``.
"""
from __future__ import annotations

from functools import partial

from .folder import folder_layout
from .industrial import dagm_layout, ksdd_layout
from .medical import (clinicdb_layout, colondb_layout, headct_layout, isic_layout, kvasir_layout,
                      no_yes_layout, tn3k_layout)
from .mvtec import mvtec_layout
from .visa import visa_layout

ADAPTERS = {
    "mvtec": (mvtec_layout, "mvtec"),
    "visa": (visa_layout, "visa"),
    "mpdd": (mvtec_layout, "mpdd"),
    "btad": (mvtec_layout, "btad"),
    "ksdd": (ksdd_layout, "ksdd"),
    "dagm": (dagm_layout, "dagm"),
    "dtd": (mvtec_layout, "dtd"),
    "glass": (mvtec_layout, "glass"),
    "headct": (headct_layout, "headct"),
    "brainmri": (partial(no_yes_layout, category="brain_mri"), "brainmri"),
    "br35h": (partial(no_yes_layout, category="br35h"), "br35h"),
    "isic": (isic_layout, "isic"),
    "colondb": (colondb_layout, "colondb"),
    "clinicdb": (clinicdb_layout, "clinicdb"),
    "kvasir": (kvasir_layout, "kvasir"),
    "tn3k": (tn3k_layout, "tn3k"),
    "synthetic": (mvtec_layout, "synthetic"),
    "folder": (folder_layout, None),
}

__all__ = ["ADAPTERS", "folder_layout"]
