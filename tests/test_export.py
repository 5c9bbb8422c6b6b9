"""ONNX export: the whole inference graph, run with onnxruntime, equals PyTorch on the tiny model."""
import json

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from adaclip import AdaCLIP, AdaCLIPConfig, FusionCfg, PromptCfg, cli, methods
from adaclip.export import InferenceGraph, compare_with_torch

onnx = pytest.importorskip("onnx", reason="the optional extra 'export' (make test installs it)")
ort = pytest.importorskip("onnxruntime", reason="the optional extra 'export' (make test installs it)")


def _model(**prompts):
    torch.manual_seed(0)
    cfg = AdaCLIPConfig.tiny()
    if prompts:
        cfg.prompts = PromptCfg(depth=2, length=2, **prompts)
    model = AdaCLIP.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.learnable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_cli_export_with_dynamic_text_matches_pytorch(tmp_path, capsys):
    """`adaclip export` on hybrid prompts in both branches (the text pass is in the graph). HSF's exact
    export (every Lloyd step in the graph) is checked by the method contract (tests/test_method_contract.py
    exports AdaCLIP's tiny model, HSF on) and below, without the cost of a second export."""
    model = _model()
    model.cfg.fusion = FusionCfg(use_hsf=False, k_clusters=3)
    model.save(tmp_path / "model.pt")
    out = tmp_path / "bottle.onnx"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--class-name", "bottle", "--out", str(out),
                     "--batch-size", "2"]) == 0
    assert "largest difference from PyTorch" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["class_name"] == "bottle" and meta["image_size"] == "32" and meta["batch_size"] == "2"
    assert "HSF off" in meta["hsf"] and "computed in the graph" in meta["text"] and meta["backbone_weights"] == "random"
    proto = onnx.load(str(out))
    assert (128, 32) in [tuple(t.dims) for t in proto.graph.initializer]    # the text blocks' MLP is in the graph
    assert json.loads(meta["config"])["fusion"]["use_hsf"] is False
    for seed in (1, 2):                                    # inputs other than the one traced
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        diffs = compare_with_torch(out, model, images, session)
        assert diffs["image_scores"] < 1e-4 and diffs["anomaly_maps"] < 1e-4, diffs
        # the same by hand: onnxruntime's outputs against the PyTorch model's own
        scores, maps = session.run(None, {"images": images.numpy()})
        assert scores.shape == (2,) and maps.shape == (2, 32, 32)
        with torch.no_grad():
            ref = model(images, "bottle")
        np.testing.assert_allclose(scores, ref.image_scores.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(maps, ref.pixel_scores.numpy(), rtol=0, atol=1e-4)
    # the parity check compares with PyTorch: a model other than the exported one shows its differences
    other = _model()
    with torch.no_grad():
        for p in other.learnable_parameters():
            p.add_(0.5 * torch.randn_like(p))
        ref = other(images, "bottle")
    diffs = compare_with_torch(out, other, images, session)
    assert diffs["image_scores"] == pytest.approx(np.abs(scores - ref.image_scores.numpy()).max(), abs=1e-4)
    assert diffs["anomaly_maps"] == pytest.approx(np.abs(maps - ref.pixel_scores.numpy()).max(), abs=1e-4)
    assert diffs["image_scores"] > 1e-3 and diffs["anomaly_maps"] > 1e-3, diffs
    # the normalisation in the metadata is the model's (OpenAI's for these weights): a consumer that
    # preprocesses by it feeds the graph what model.transform feeds the model
    assert json.loads(meta["mean"]) == pytest.approx(OPENAI_DATASET_MEAN)
    assert json.loads(meta["std"]) == pytest.approx(OPENAI_DATASET_STD)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)      # already S x S
    by_metadata = (rgb / 255.0 - json.loads(meta["mean"])) / json.loads(meta["std"])
    np.testing.assert_allclose(by_metadata.transpose(2, 0, 1), model.transform(Image.fromarray(rgb)).numpy(),
                               rtol=0, atol=1e-5)


def test_static_text_is_precomputed(tmp_path):
    """Without dynamic text prompts the text features are constants: no text tower in the graph."""
    from adaclip.export import export_onnx
    model = _model(type="S")
    graph = InferenceGraph(model, "screw")
    assert graph.text is not None and graph.text.shape == (1, 32, 2)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(graph(images)[1], model(images, "screw").pixel_scores)
    model.cfg.fusion = FusionCfg(use_hsf=False, k_clusters=3)
    path = export_onnx(model, "screw", tmp_path / "screw.onnx")
    proto = onnx.load(str(path))
    assert "HSF off" in {p.key: p.value for p in proto.metadata_props}["hsf"]
    # the text tower would bring its blocks (the MLP's 32 -> 128 weight) into the file
    shapes = [tuple(t.dims) for t in proto.graph.initializer]
    assert (128, 32) not in shapes and "precomputed" in {p.key: p.value for p in proto.metadata_props}["text"]
    diffs = compare_with_torch(path, model, images)
    assert diffs["image_scores"] < 1e-4 and diffs["anomaly_maps"] < 1e-4


def test_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--class-name", "bottle"]) == 2
    assert "none.pt does not exist" in capsys.readouterr().err


def test_crane_with_its_image_token_at_test_exports_its_text_pass(tmp_path):
    """Every method's graph is checked by the method contract (tests/test_method_contract.py); Crane's
    option of the image token at test puts its text pass into the graph, which the CLI exports too."""
    torch.manual_seed(0)
    extra, method = {"context_token_at_test": True}, "crane"
    model = methods.create(method, backbone=dict(name="adaclip-tiny", pretrained=None, image_size=32), **extra).eval()
    with torch.no_grad():
        for p in model.learnable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save(tmp_path / "model.pt")
    out = tmp_path / f"{method}.onnx"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--class-name", "metal_nut", "--out",
                     str(out), "--batch-size", "2"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["method"] == method and "computed in the graph" in meta["text"]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    scores, maps = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        ref = model(images, "metal_nut")
    np.testing.assert_allclose(scores, ref.image_scores.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(maps, ref.pixel_scores.numpy(), rtol=0, atol=1e-4)


def test_hsf_runs_every_lloyd_step_in_an_exported_graph(monkeypatch):
    """While exporting, k-means runs all max_iter steps instead of stopping at convergence (a graph has
    no early exit), and the labels are those of the early stop: the exported HSF is exact."""
    import adaclip.methods.adaclip_hsf as hsf

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2, 20, 4, generator=g), torch.randn(2, 20, 4, generator=g) + 6], dim=1)
    steps = {"n": 0}
    one_hot = hsf.F.one_hot

    def counted(*a, **k):
        steps["n"] += 1
        return one_hot(*a, **k)

    monkeypatch.setattr(hsf.F, "one_hot", counted)
    stopped = hsf.kmeans(x, 3, seed=0, max_iter=50)
    assert 0 < steps["n"] < 50
    steps["n"] = 0
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert torch.equal(hsf.kmeans(x, 3, seed=0, max_iter=50), stopped) and steps["n"] == 50
