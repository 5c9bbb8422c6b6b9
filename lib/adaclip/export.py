"""ONNX export of a method's whole inference graph: ``adaclip export``.

    adaclip export --checkpoint results/default/model.pt --class-name bottle --out bottle.onnx

The graph takes ``images`` (B, 3, S, S), normalised as ``model.transform`` does, at a fixed input
size and batch size, and returns ``image_scores`` (B,) and ``anomaly_maps`` (B, S, S): every visual
pass of the method, the text pass for the class name when it depends on the image (AdaCLIP's dynamic
text prompts; otherwise its features are precomputed constants), the maps and the image score. HSF's k-means runs all of its Lloyd steps in the graph: once the labels stop
changing every further step repeats them, so the graph computes exactly what PyTorch does (which
stops at that point). The file's metadata records the class name, input size, normalisation,
method and this note. Needs the optional extra ``export`` (onnx, onnxruntime, onnxscript).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from .backbone import normalization
from .io import atomic_path
from .methods import Method

PathLike = Union[str, Path]
HSF_NOTE = ("HSF exported exactly: k-means runs its full max_iter Lloyd steps (steps after convergence "
            "change nothing), with the seeding's uniform draws as constants")


class InferenceGraph(nn.Module):
    """``model`` for one class name: images in, (image scores, anomaly maps) out."""

    def __init__(self, model: Method, class_name: str):
        super().__init__()
        self.model, self.class_name = model.eval(), class_name
        self.text_is_dynamic = model.text_depends_on_image
        with torch.no_grad():
            text = None if self.text_is_dynamic else model.text_features([class_name]).detach()   # (1, D, 2)
        self.register_buffer("text", text, persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text = None if self.text is None else self.text.expand(images.shape[0], -1, -1)
        out = self.model(images, [self.class_name] * images.shape[0], text_features=text)
        return out.image_scores, out.pixel_scores


def uses_hsf(model: Method) -> bool:
    """AdaCLIP with Hybrid Semantic Fusion (its k-means is exported step by step)."""
    return bool(getattr(getattr(model.cfg, "fusion", None), "use_hsf", False))


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the optional packages onnx, onnxruntime and onnxscript: "
                          f"pip install -e '.[export]' (make test installs them)") from e


def export_onnx(model: Method, class_name: str, path: PathLike, batch_size: int = 1, opset: int = 18) -> Path:
    """Write the inference graph of ``model`` for ``class_name`` to ``path`` (atomically)."""
    onnx = _require("onnx")
    _require("onnxscript")
    path = Path(path)
    graph = InferenceGraph(model, class_name)
    size = model.image_size
    example = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        graph(example)                     # fills the caches (tokens, k-means draws): constants in the graph
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset, verbose=False,
                                    input_names=["images"], output_names=["image_scores", "anomaly_maps"])
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        mean, std = normalization(model.cfg.backbone)
        meta = {"class_name": class_name, "image_size": str(size), "batch_size": str(batch_size),
                "method": model.name, "mean": json.dumps(mean), "std": json.dumps(std),
                "input": "images (B, 3, S, S): RGB resized to S x S (bicubic), scaled to [0, 1], normalised",
                "outputs": "image_scores (B,) P(abnormal); anomaly_maps (B, S, S) in [0, 1]",
                "hsf": HSF_NOTE if uses_hsf(model) else "HSF off in this model",
                "text": "computed in the graph (dynamic text prompts)" if graph.text_is_dynamic else
                        "precomputed constants (no dynamic text prompt)",
                "config": json.dumps(model.cfg.to_dict()),
                "backbone_weights": "random" if model.random_weights else str(model.cfg.backbone.pretrained)}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
    return path


def compare_with_torch(path: PathLike, model: Method, images: torch.Tensor, session=None) -> dict:
    """Run the exported file with onnxruntime and PyTorch on ``images``: largest absolute differences.
    ``session``: an onnxruntime session of the file already open (else one is opened)."""
    ort = _require("onnxruntime")
    session = session or ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    scores, maps = session.run(None, {"images": images.cpu().numpy().astype(np.float32)})
    with torch.no_grad():
        ref_scores, ref_maps = InferenceGraph(model, meta["class_name"])(images.to(model.device))
    return {"image_scores": float(np.abs(scores - ref_scores.cpu().numpy()).max()),
            "anomaly_maps": float(np.abs(maps - ref_maps.cpu().numpy()).max())}
