"""The interactive explorer behind notebooks/04_explore.ipynb: any image, any class name, live map.

`inspect` runs the model once for an image and a class name and keeps everything the explorer draws
(score, map, the four layers' maps, the map before smoothing, HSF's patches and clusters);
`Explorer` puts ipywidgets around it (manifest filters or an upload, a class-name box, a threshold
slider, a save button) and caches `inspect` per image and class name, so that moving the slider
redraws without rerunning the model. Every callback is a plain method, testable without a browser.

>>> explorer = Explorer(model, manifest, root, figures_dir="results/default/figures")
>>> explorer.widget()                      # in JupyterLab (elsewhere its output shows the current figure)
>>> explorer.figure()                      # headless: the current view as a matplotlib Figure
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from . import viz
from .data import load_row

PathLike = Union[str, Path]
ALL = "(all)"


@dataclass
class Inspection:
    """One image through the model for one class name; maps at the image's own size, in [0, 1]."""
    image: np.ndarray                  # (H, W, 3) uint8
    class_name: str
    score: float                       # image score, P(abnormal)
    anomaly_map: np.ndarray            # (H, W): what evaluation scores
    raw_map: Optional[np.ndarray]      # (H, W), before the Gaussian smoothing (None: the method smooths nothing)
    layer_maps: list                   # per tapped layer (or window scale) (H, W): its P(abnormal)
    layer_names: tuple                 # "layer 6", "2x2 windows", ...
    grid: int                          # patches per side
    hsf_patches: Optional[np.ndarray]  # (K,) patch indices HSF clustered (None without HSF)
    hsf_clusters: Optional[np.ndarray]  # (K,) their k-means labels


def _resize(m: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(S, S) -> (H, W) bilinear, as the predictor resizes maps."""
    return F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


@torch.no_grad()
def inspect(model, image: Image.Image, class_name: str) -> Inspection:
    """Run ``model`` (any method) on one PIL image with ``class_name`` and keep every intermediate
    result it offers: per-layer maps (or WinCLIP's per-scale maps), the map before smoothing, HSF's
    clusters."""
    model.eval()
    rgb = image.convert("RGB")
    x = model.transform(rgb)[None].to(model.device)
    out = model(x, [class_name], return_layer_maps=True, return_details=True)
    size = (rgb.height, rgb.width)
    d = out.details or {}
    if out.layer_maps is not None:
        layers = [m[0, 1] for m in out.layer_maps]
        names = tuple(f"layer {k}" for k in getattr(model, "out_layers", range(1, len(layers) + 1)))
    else:
        layers = [m[0] for m in d.get("scale_maps", [])]
        names = tuple(f"{k}x{k} windows" for k in getattr(model.cfg, "scales", ()))
    raw = d.get("raw_pixel_scores")
    return Inspection(
        image=np.asarray(rgb), class_name=class_name, score=float(out.image_scores[0]),
        anomaly_map=_resize(out.pixel_scores[0].cpu(), size),
        raw_map=_resize(raw[0].cpu(), size) if raw is not None else None,
        layer_maps=[_resize(m.cpu(), size) for m in layers], layer_names=names,
        grid=model.image_size // model.patch_size,
        hsf_patches=d["hsf_patches"][0].cpu().numpy() if "hsf_patches" in d else None,
        hsf_clusters=d["hsf_clusters"][0].cpu().numpy() if "hsf_clusters" in d else None)


def show(output, figures: list) -> None:
    """Replace what an ipywidgets ``Output`` shows by ``figures`` (PNG, 100 dpi, as the inline backend
    draws), in one update, and close them. The outputs are set directly instead of captured with
    ``with output: display(...)``: capturing re-routes the kernel's messages by request id, which
    papermill's client mishandles now and then, leaving a headless cell waiting forever."""
    import base64

    import matplotlib.pyplot as plt

    shown = []
    for fig in figures:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        shown.append({"output_type": "display_data", "metadata": {},
                      "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)}})
    output.outputs = tuple(shown)


class FigureBox(widgets.VBox):
    """A VBox whose output also carries, as a PNG, the figure ``figures`` (an ``Output``) shows when it is
    displayed. JupyterLab shows the widget; a viewer without the widgets (the executed copy papermill
    writes, GitHub, nbviewer, an untrusted notebook) shows that figure, not the widget's text
    (``VBox(children=...)``)."""

    def __init__(self, children, figures):
        super().__init__(children)
        self.figures = figures

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        pngs = [o["data"]["image/png"] for o in self.figures.outputs if "image/png" in o.get("data", {})]
        if pngs:
            bundle.update({"image/png": pngs[0], "text/plain": "the explorer: its controls need JupyterLab"})
        return bundle


class Explorer:
    """Widgets around `inspect`. ``manifest``: rows to pick from (paths relative to ``root``)."""

    def __init__(self, model, manifest: pd.DataFrame, root: PathLike, figures_dir: PathLike = "figures",
                 threshold: float = 0.5, title: str = ""):
        w = widgets
        self.model, self.root, self.figures_dir, self.title = model, Path(root), Path(figures_dir), title
        self.df = manifest.reset_index(drop=True)
        self.cache: dict = {}                  # (image key, class name) -> Inspection
        self._images: dict = {}                # image key -> (image, ground truth), read once
        self.model_calls = 0
        self.last_source = ""                  # how the shown inspection came: "model run (... s)" or "from cache"
        self._quiet = False                    # True while a callback sets a widget it redraws after itself
        self.uploads: dict = {}                # name -> PIL image
        opts = lambda col: [ALL, *sorted(self.df[col].astype(str).unique())]  # noqa: E731
        self.dataset = w.Dropdown(options=opts("dataset"), description="dataset")
        self.category = w.Dropdown(options=opts("category"), description="category")
        self.label = w.Dropdown(options=[ALL, "normal", "anomalous"], description="label")
        self.image = w.Dropdown(description="image", layout=w.Layout(width="60%"))
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="upload")
        self.class_name = w.Text(description="class name", continuous_update=False)
        self.threshold = w.FloatSlider(value=threshold, min=0.0, max=1.0, step=0.01, description="threshold",
                                       continuous_update=False)
        self.save_button = w.Button(description="save figure", icon="save")
        self.output, self.steps_output, self.status = w.Output(), w.Output(), w.HTML()
        self.steps = w.Accordion(children=[self.steps_output], selected_index=None)
        self.steps.set_title(0, "step through the method")
        self.dataset.observe(lambda _: self.on_dataset(), names="value")
        for f in (self.category, self.label):
            f.observe(lambda _: self._quiet or self.on_filter(), names="value")
        self.image.observe(lambda _: self._quiet or self.on_image(), names="value")
        self.class_name.observe(lambda _: self._quiet or self.refresh(), names="value")
        self.threshold.observe(lambda _: self.refresh(), names="value")
        self.upload.observe(lambda change: self.on_upload(change["new"]), names="value")
        self.save_button.on_click(lambda _: self.save())
        self.steps.observe(lambda _: self.refresh(), names="selected_index")
        self.on_filter()

    # ---------------------------------------------------------------- callbacks
    def filtered(self) -> pd.DataFrame:
        df = self.df
        if self.dataset.value != ALL:
            df = df[df.dataset.astype(str) == self.dataset.value]
        if self.category.value != ALL:
            df = df[df.category.astype(str) == self.category.value]
        if self.label.value != ALL:
            df = df[df.label == (1 if self.label.value == "anomalous" else 0)]
        return df

    def on_dataset(self) -> None:
        """A new dataset: the category list offers that dataset's categories only."""
        rows = self.df if self.dataset.value == ALL else self.df[self.df.dataset.astype(str) == self.dataset.value]
        options = [ALL, *sorted(rows.category.astype(str).unique())]
        with self._silently():
            keep = self.category.value if self.category.value in options else ALL
            self.category.options = options
            self.category.value = keep
        self.on_filter()

    def on_filter(self) -> None:
        """New filter values: the image list shows the matching rows (and the uploads)."""
        rows = self.filtered()
        options = [(f"upload: {name}", f"upload:{name}") for name in self.uploads]
        options += [(f"{r.dataset}/{r.category}: {r.image}" + (" (anomalous)" if r.label else ""), f"row:{i}")
                    for i, r in rows.iterrows()]
        before = self.image.value
        value = before if before in [v for _, v in options] else (options[0][1] if options else None)
        with self._silently():
            self.image.options = options
            self.image.value = value
        if value != before or value is None:       # the same image stays as it is (its class name too)
            self.on_image()

    def on_image(self) -> None:
        """A new image: its category fills the class-name box (any free text works there); one redraw."""
        key = self.image.value
        if key and key.startswith("row:"):
            with self._silently():
                self.class_name.value = str(self.df.at[int(key[4:]), "category"])
        self.refresh()

    @contextlib.contextmanager
    def _silently(self):
        """Set widgets without their observers redrawing (the caller redraws once, afterwards)."""
        quiet, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = quiet

    def on_upload(self, value) -> None:
        """An uploaded file joins the image list and is selected."""
        files = value if isinstance(value, (list, tuple)) else list(value.values())
        for f in files:
            name = f["name"] if isinstance(f, dict) else f.name
            content = f["content"] if isinstance(f, dict) else f.content
            self.uploads[name] = Image.open(io.BytesIO(bytes(content))).convert("RGB")
            self.on_filter()
            self.image.value = f"upload:{name}"

    # ---------------------------------------------------------------- model, cached
    def current(self) -> tuple[Optional[Inspection], Optional[np.ndarray]]:
        """The inspection of the selected image with the typed class name (cached), and its mask."""
        key, name = self.image.value, self.class_name.value.strip()
        if not key or not name:
            return None, None
        image, mask = self._image(key)
        if (key, name) in self.cache:
            self.last_source = "from cache"
        else:
            start = time.perf_counter()
            self.model_calls += 1
            self.cache[(key, name)] = inspect(self.model, image, name)
            self.last_source = f"model run ({time.perf_counter() - start:.2f} s)"
        return self.cache[(key, name)], mask

    def _image(self, key: str) -> tuple[Image.Image, Optional[np.ndarray]]:
        """The image and its ground truth (None without one), read once per image."""
        if key.startswith("upload:"):
            return self.uploads[key[7:]], None
        if key not in self._images:
            row = self.df.loc[int(key[4:])]
            image, mask = load_row(self.root, row)
            # a normal image has no anomalous pixels, annotated or not; an anomalous one without a mask has no ground truth
            self._images[key] = (image, mask if row["mask"] or row.label == 0 else None)
        return self._images[key]

    # ---------------------------------------------------------------- drawing
    def figure(self, found: Optional[Inspection] = None, mask: Optional[np.ndarray] = None):
        """The current view (or ``found``'s): image, map overlay, mask at the threshold, ground truth,
        score and decision."""
        if found is None:
            found, mask = self.current()
        if found is None:
            return None
        return viz.explorer_view(found, self.threshold.value, mask, title=self.title)

    def step_figures(self, found: Optional[Inspection] = None) -> dict:
        """The intermediate results of the current image (or ``found``): per-layer (or per-scale) maps,
        smoothing, HSF's clusters, as far as the method has them."""
        if found is None:
            found, _ = self.current()
        if found is None:
            return {}
        figures = {}
        if found.layer_maps:
            figures["layers"] = viz.layer_maps_figure(found)
        if found.raw_map is not None:
            figures["smoothing"] = viz.smoothing_figure(found)
        if found.hsf_patches is not None:
            figures["hsf"] = viz.hsf_figure(found)
        return figures

    def empty_reason(self) -> str:
        """Why there is nothing to draw, and what to change; "" when there is something."""
        if not self.image.value:
            filters = ", ".join(f"{w.description}={w.value}" for w in (self.dataset, self.category, self.label)
                                if w.value != ALL)
            return (f"no image matches {filters}: change a filter or upload an image" if filters else
                    "no images: give manifests or upload an image")
        if not self.class_name.value.strip():
            return "type a class name (any words: the prompts take them)"
        return ""

    def refresh(self) -> None:
        """Redraw into the widgets' output areas (the model runs only for a new image or class name)."""
        reason = self.empty_reason()
        found, mask = self.current() if not reason else (None, None)
        source = self.last_source                                  # of this inspection: a model run or the cache
        fig = self.figure(found, mask) if found is not None else None
        show(self.output, [fig] if fig is not None else [])      # nothing to draw: no stale figure either
        if self.steps.selected_index == 0:
            show(self.steps_output, list(self.step_figures(found).values()) if found is not None else [])
        self.status.value = reason or source

    def save(self) -> Optional[Path]:
        """Save the current view (PNG and PDF) under ``figures_dir``; returns the PNG path."""
        import matplotlib.pyplot as plt

        fig = self.figure()
        if fig is None:
            return None
        key = self.image.value.split(":", 1)[1]
        name = Path(self.df.at[int(key), "image"]).stem if self.image.value.startswith("row:") else Path(key).stem
        path = viz.save(fig, self.figures_dir / f"04_explore_{name}_{self.class_name.value.strip().replace(' ', '_')}.png")
        plt.close(fig)                    # a button's figure: nothing else shows it (it would reach the log console)
        self.status.value = f"saved {path}"
        return path

    def widget(self) -> FigureBox:
        """The controls above the current figure (the figure alone where widgets cannot run)."""
        self.refresh()
        row = widgets.HBox
        return FigureBox([row([self.dataset, self.category, self.label]), row([self.image, self.upload]),
                          row([self.class_name, self.threshold, self.save_button]),
                          self.status,                   # a row of its own: long messages squeeze no control
                          self.output, self.steps], figures=self.output)
