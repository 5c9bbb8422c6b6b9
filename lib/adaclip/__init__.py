"""Zero-shot anomaly detection on a frozen CLIP: AdaCLIP (Cao et al., ECCV 2024) and the methods it is
compared with, side by side on the same data, metric code and harness.

>>> from adaclip import methods
>>> methods.available()                                # ['adaclip', 'aprilgan', 'clip', 'linear', 'winclip']
>>> model = methods.create("adaclip")                  # ViT-L-14-336 @ 518, openai weights, the paper's setting
>>> out = model(images, ["bottle"] * len(images))      # images from model.transform
>>> out.image_scores, out.pixel_scores                 # (B,), (B, 518, 518)

Layout: `methods/` (one module per method), `backbone/` (the frozen CLIP and the block loops the
methods hook into), `data/` (manifests, adapters, loading), and the harness at the top level
(`train`, `evaluate`, `metrics`, `analysis`, `viz`, `predict`, `export`, `explore`, `pipeline`, `sweep`,
`benchmark`, `cli`).
"""
import importlib

# name -> (module, attribute; None: the module itself). Imported on first use (PEP 562), so that the
# parts that need no model (manifests, analysis, the sweep and pipeline runners, `adaclip sources`)
# start without torch and open_clip.
_LAZY = {
    "methods": (".methods", None), "Method": (".methods", "Method"), "MethodOutput": (".methods", "MethodOutput"),
    "AdaCLIP": (".methods", "AdaCLIP"), "AdaCLIPConfig": (".methods", "AdaCLIPConfig"),
    "PromptCfg": (".methods", "PromptCfg"), "FusionCfg": (".methods", "FusionCfg"),
    "CheckpointError": (".methods", "CheckpointError"), "AdaCLIPOutput": (".methods.adaclip", "AdaCLIPOutput"),
    "build_model": (".methods.adaclip", "build_model"), "WeightsUnavailableError": (".backbone", "WeightsUnavailableError"),
    "build_transform": (".backbone", "build_transform"), "BackboneCfg": (".config", "BackboneCfg"),
    "EvalCfg": (".config", "EvalCfg"), "TrainCfg": (".config", "TrainCfg"),
    "AdaCLIPPredictor": (".predictor", "AdaCLIPPredictor"), "Predictor": (".predictor", "Predictor"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'adaclip' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module, __name__)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = [
    "methods", "Method", "MethodOutput", "AdaCLIP", "AdaCLIPConfig", "AdaCLIPPredictor", "Predictor", "AdaCLIPOutput",
    "BackboneCfg", "PromptCfg", "FusionCfg", "TrainCfg", "EvalCfg", "build_model", "build_transform", "CheckpointError",
    "WeightsUnavailableError",
]
__version__ = "0.2.0"
