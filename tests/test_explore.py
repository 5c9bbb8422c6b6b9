"""The explorer's callbacks and intermediate-result figures, as plain functions (no browser)."""
import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from adaclip import AdaCLIP, AdaCLIPConfig, FusionCfg
from adaclip.data import build_manifest
from adaclip.data.registry import resolve_root
from adaclip.explore import Explorer, inspect
from adaclip.methods.shared import gaussian_blur

ROOT = resolve_root("sample")


def _model(**fusion):
    torch.manual_seed(0)
    cfg = AdaCLIPConfig.tiny()
    if fusion:
        cfg.fusion = FusionCfg(k_clusters=3, **fusion)
    return AdaCLIP.from_config(cfg).eval()


def test_inspect_keeps_every_intermediate_result():
    model = _model()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    found = inspect(model, image, "bottle")
    with torch.no_grad():
        out = model(model.transform(image)[None], ["bottle"], return_layer_maps=True)
    assert found.score == pytest.approx(float(out.image_scores[0]), abs=1e-6)
    np.testing.assert_allclose(found.anomaly_map, out.pixel_scores[0].numpy(), atol=1e-6)   # same size: no resize
    # the smoothed map is the raw map through the Gaussian filter
    np.testing.assert_allclose(found.anomaly_map, gaussian_blur(torch.from_numpy(found.raw_map)[None], 4.0)[0].numpy(),
                               atol=1e-5)
    assert len(found.layer_maps) == 4 and found.layer_names == ("layer 1", "layer 2", "layer 3", "layer 4")
    np.testing.assert_allclose(found.layer_maps[2], out.layer_maps[2][0, 1].numpy(), atol=1e-6)
    assert found.grid == 4 and len(found.hsf_patches) == 15 and set(found.hsf_clusters) <= {0, 1, 2}
    assert len(set(found.hsf_patches.tolist())) == 15                        # the top 5·k distinct patches
    assert inspect(_model(use_hsf=False), image, "bottle").hsf_patches is None
    big = inspect(model, image.resize((50, 40)), "bottle")
    assert big.anomaly_map.shape == big.raw_map.shape == big.layer_maps[0].shape == (40, 50)


def test_explorer_callbacks(tmp_path):
    df = build_manifest("visa", ROOT)
    explorer = Explorer(_model(), df, ROOT, figures_dir=tmp_path)
    assert len(explorer.image.options) == len(df) and explorer.class_name.value in {"capsules", "macaroni1"}
    explorer.category.value = "macaroni1"
    explorer.label.value = "anomalous"
    assert len(explorer.image.options) == 5 and all("macaroni1" in label for label, _ in explorer.image.options)
    assert explorer.class_name.value == "macaroni1"                           # the image's category fills the box
    calls = explorer.model_calls                     # each new image ran the model once (and drew it)
    assert explorer.status.value.startswith("model run (")                    # the image just ran the model
    assert explorer.figure() is not None and explorer.model_calls == calls
    explorer.threshold.value = 0.2                                            # slider: redraw from the cache
    assert explorer.model_calls == calls and explorer.status.value == "from cache"
    explorer.class_name.value = "pasta with a crack"                          # free text: one new model run
    assert explorer.model_calls == calls + 1 and explorer.status.value.startswith("model run (")
    explorer.class_name.value = "macaroni1"
    assert explorer.model_calls == calls + 1 and explorer.status.value == "from cache"   # back to a cached pair
    explorer.label.value = "(all)"                   # the same image stays selected: its class name too
    assert explorer.class_name.value == "macaroni1" and explorer.model_calls == calls + 1
    explorer.steps.selected_index = 0                                         # open "step through the method"
    assert len(explorer.steps_output.outputs) == 3 and explorer.model_calls == calls + 1
    explorer.class_name.value = "macaroni with a dent"          # with the steps open: a model run still says so
    assert explorer.model_calls == calls + 2 and explorer.status.value.startswith("model run (")
    explorer.class_name.value = "macaroni1"
    figures = explorer.step_figures()
    assert set(figures) == {"layers", "smoothing", "hsf"}
    assert [ax.get_title() for ax in figures["layers"].axes[:4]] == [f"layer {k}" for k in (1, 2, 3, 4)]
    path = explorer.save()
    assert path.parent == tmp_path and path.is_file() and path.with_suffix(".pdf").is_file()
    assert explorer.status.value.startswith("saved")


def test_upload_joins_the_list(tmp_path):
    explorer = Explorer(_model(), build_manifest("kvasir", ROOT), ROOT, figures_dir=tmp_path)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    explorer.on_upload([{"name": "mine.png", "content": buf.getvalue()}])
    assert explorer.image.value == "upload:mine.png" and explorer.image.options[0][1] == "upload:mine.png"
    explorer.class_name.value = "tomato"
    found, mask = explorer.current()
    assert found.image.shape == (30, 40, 3) and mask is None
    view = explorer.figure()
    assert "'tomato'" in view.texts[0].get_text() and view.axes[3].texts[0].get_text() == "no ground truth"
    assert explorer.save().name == "04_explore_mine_tomato.png"


def _overlapping_texts(fig) -> list:
    """Pairs of visible texts (suptitle, axes titles, texts in axes) whose drawn boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in [fig._suptitle, *(a.title for a in fig.axes), *(t for a in fig.axes for t in a.texts)]
             if t is not None and t.get_text() and t.get_visible()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    return [(a, b) for i, (a, p) in enumerate(boxes) for b, q in boxes[i + 1:] if p.overlaps(q)]


def test_explorer_figure_fills_the_width_and_nothing_overlaps(tmp_path):
    """The figure is as wide as a JupyterLab output area (1150 px at 100 dpi, the inline backend's);
    a normal image (an empty ground truth) and an upload (none) with the two-line warning title."""
    from adaclip import viz

    df = build_manifest("visa", ROOT)
    explorer = Explorer(_model(), df, ROOT, figures_dir=tmp_path, title=viz.RANDOM_WEIGHTS)
    explorer.label.value = "normal"
    fig = explorer.figure()
    assert fig.get_size_inches()[0] * 100 == pytest.approx(1150)
    assert fig.axes[3].get_title() == "ground truth" and "normal" in fig.axes[3].texts[0].get_text()
    assert _overlapping_texts(fig) == []
    buf = io.BytesIO()
    Image.new("RGB", (60, 40), (200, 10, 10)).save(buf, format="PNG")
    explorer.on_upload([{"name": "mine.png", "content": buf.getvalue()}])
    fig = explorer.figure()
    assert fig.axes[3].texts[0].get_text() == "no ground truth" and _overlapping_texts(fig) == []
    for step in explorer.step_figures().values():
        assert _overlapping_texts(step) == []


def test_categories_follow_the_dataset_and_empty_selections_say_what_to_change(tmp_path):
    df = pd.concat([build_manifest("visa", ROOT), build_manifest("kvasir", ROOT)], ignore_index=True)
    explorer = Explorer(_model(), df, ROOT, figures_dir=tmp_path)
    assert set(explorer.category.options) == {"(all)", "capsules", "macaroni1", "kvasir"}
    explorer.dataset.value = "kvasir"
    assert explorer.category.options == ("(all)", "kvasir")
    assert all(label.startswith("kvasir/") for label, _ in explorer.image.options)
    assert [list(o["data"]) for o in explorer.output.outputs] == [["image/png", "text/plain"]]   # drawn
    explorer.label.value = "normal"                                           # Kvasir has no normal images
    assert explorer.image.options == () and explorer.figure() is None
    assert explorer.status.value == "no image matches dataset=kvasir, label=normal: change a filter or upload an image"
    assert explorer.output.outputs == ()                                      # the previous figure is gone
    explorer.dataset.value = "visa"
    assert set(explorer.category.options) == {"(all)", "capsules", "macaroni1"}
    assert explorer.image.options and explorer.figure() is not None


@pytest.mark.parametrize("method, steps", [("aprilgan", {"layers"}), ("winclip", {"layers"}), ("clip", {"layers", "smoothing"})])
def test_every_method_is_explored_with_what_it_has(tmp_path, method, steps):
    """Any method in the explorer: its map and score, and the intermediate maps it has (APRIL-GAN's
    layers, WinCLIP's window scales, the clip baseline's layer and smoothing)."""
    from adaclip import methods

    torch.manual_seed(0)
    model = methods.create(method, backbone=dict(name="adaclip-tiny", pretrained=None, image_size=32)).eval()
    explorer = Explorer(model, build_manifest("visa", ROOT), ROOT, figures_dir=tmp_path)
    assert explorer.status.value.startswith("model run (") and explorer.figure() is not None
    figures = explorer.step_figures()
    assert set(figures) == steps
    if method == "winclip":
        assert [ax.get_title() for ax in figures["layers"].axes[:2]] == ["2x2 windows", "3x3 windows"]


def test_widget_output_carries_the_figure(tmp_path):
    """Where the widgets cannot run (the executed copy papermill writes, GitHub) the explorer's output
    shows its figure, not ``VBox(children=...)``; JupyterLab still gets the widget."""
    explorer = Explorer(_model(), build_manifest("kvasir", ROOT), ROOT, figures_dir=tmp_path)
    bundle = explorer.widget()._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    png = Image.open(io.BytesIO(base64.b64decode(bundle["image/png"])))
    assert png.width >= 1000 and not bundle["text/plain"].startswith("VBox(")
