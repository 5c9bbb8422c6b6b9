"""AA-CLIP in the harness: its two training stages through the same train(), the files its training
writes, the transductive score as a flagged option."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from adaclip import EvalCfg, methods
from adaclip.data import build_manifest
from adaclip.data.synthetic import make_synthetic
from adaclip.evaluate import evaluate
from adaclip.train import train

TINY = dict(backbone=dict(name="adaclip-tiny", pretrained=None, image_size=32), surgery_from=2, text_adapt_until=2,
            image_adapt_until=3)


def test_defaults_are_the_references():
    cfg = methods.config("aaclip")
    assert (cfg.backbone.name, cfg.backbone.image_size, cfg.backbone.pos_embed_interp) == ("ViT-L-14-336", 518, "bicubic_antialias")
    assert cfg.adapt_weight == 0.1
    assert (cfg.image_score, cfg.stage1_last_layer_only, cfg.class_names) == ("fixed", False, "readable")
    t = methods.train_config("aaclip")
    assert (t.epochs, t.batch_size, t.lr, t.optimizer) == (20, 2, 5e-4, "adam")
    with torch.device("meta"):
        m = methods.AACLIP(methods.config("aaclip", pretrained=None), device="meta")
    assert not m.cfg.backbone.quick_gelu                                      # GELU, as the reference ran
    assert (m.cfg.text_adapt_until, m.cfg.image_adapt_until, m.cfg.surgery_from) == (3, 6, 6)   # ViT-L-14's, recorded
    text = sum(p.numel() for n, p in m.named_parameters() if n.startswith("text_"))
    image = sum(p.numel() for p in m.learnable_parameters()) - text
    assert (text, image) == (2_359_296, 10_223_616)                           # the spec's counts
    stages = m.training_stages(t)
    assert [(s.name, s.epochs, s.batch_size, s.lr, s.milestones) for s in stages] == \
        [("text", 5, 16, 1e-5, ()), ("image", 20, 2, 5e-4, (16000, 32000))]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root / "synthetic", categories=("stripes",), n_train=2, n_good=3, n_defect=3, size=32)
    return root, build_manifest("synthetic", root)


def test_two_stages_in_one_run(synthetic, tmp_path):
    """The text stage updates only the text adapters and projection, the image stage only the image
    ones; the log says which stage each step belongs to; config.json records both."""
    root, df = synthetic
    test = df[df.split == "test"].reset_index(drop=True)
    cfg = methods.train_config("aaclip", epochs=2, batch_size=3)
    torch.manual_seed(cfg.seed)                                  # as train() seeds before building the model
    initial = methods.create("aaclip", **TINY).learnable_state_dict()
    model = train(methods.config("aaclip", **TINY), cfg, test, root, tmp_path, progress=False)
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert log.stage.tolist()[0] == "text" and log.stage.tolist()[-1] == "image"
    assert sorted(log.groupby("stage").epoch.unique().apply(list).to_dict().items()) == [("image", [2, 3]), ("text", [1])]
    stages = json.loads((tmp_path / "config.json").read_text())["stages"]
    assert [(s["name"], s["epochs"]) for s in stages] == [("text", 1), ("image", 2)]
    # each stage at its own batch size: 6 images make 1 batch of the text stage (16), 2 of the image stage (3)
    steps = log.groupby(["stage", "epoch"]).size().to_dict()
    assert steps == {("text", 1): 1, ("image", 2): 2, ("image", 3): 2}, steps
    after_text = torch.load(tmp_path / "checkpoints" / "epoch_001.pt", weights_only=True)["state_dict"]
    final = model.learnable_state_dict()
    for key, value in initial.items():
        text = key.startswith("text_")
        assert (not torch.equal(after_text[key], value)) == text, key            # stage 1: text only
        assert (not torch.equal(final[key], after_text[key])) == (not text), key  # stage 2: image only
    # a killed run resumes in its stage to the same result: killed mid-stage (step 3, the image stage's
    # second batch) and killed exactly at the stage boundary (after the text stage's only step), where
    # the image stage starts with a fresh optimiser, not the text stage's state
    for killed_at in (3, 1):
        folder = tmp_path / f"killed{killed_at}"
        train(methods.config("aaclip", **TINY), cfg, test, root, folder, progress=False, max_steps=killed_at)
        again = train(methods.config("aaclip", **TINY), cfg, test, root, folder, progress=False, resume=True)
        for key, value in final.items():
            torch.testing.assert_close(again.learnable_state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_transductive_score_is_an_option_and_flagged(synthetic, tmp_path):
    root, df = synthetic
    test = df[df.split == "test"].reset_index(drop=True)
    torch.manual_seed(0)
    fixed = methods.create("aaclip", **TINY)
    minmax = methods.create("aaclip", **TINY, image_score="aaclip_minmax_fusion")
    minmax.load_state_dict(fixed.state_dict())
    a = evaluate(fixed, test, root, EvalCfg(batch_size=4), run_dir=tmp_path / "a", progress=False)
    b = evaluate(minmax, test, root, EvalCfg(batch_size=4), run_dir=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["transductive_image_scores"] is True
    assert json.loads((tmp_path / "a" / "config.json").read_text())["transductive_image_scores"] is False
    np.testing.assert_allclose(a.metrics.pixel_auroc, b.metrics.pixel_auroc)   # the maps are the same
    s = b.scores.score.values
    assert s.min() == pytest.approx(0.0, abs=1e-9) or s.max() <= 1.0          # min-max normalised per category
    assert not np.allclose(a.scores.score.values, s)


def test_reads_the_files_its_training_writes(tmp_path):
    """text_adapter.pth and image_adapter.pth as AA-CLIP's train.py saves them (no weights are released)."""
    torch.manual_seed(0)
    source = methods.create("aaclip", **TINY)
    text = {f"{i}.fc.0.weight": source.text_adapters[i].fc.weight.detach().clone() for i in range(2)}
    text["2.fc.0.weight"] = source.text_proj.weight.detach().clone()
    image = {f"layer_adapters.{i}.fc.0.weight": source.image_adapters[i].fc.weight.detach().clone() for i in range(3)}
    image.update({f"seg_proj.{i}.fc.weight": source.seg_proj[i].weight.detach().clone() for i in range(4)})
    image["det_proj.fc.weight"] = source.det_proj.weight.detach().clone()
    torch.save({"epoch": 5, "text_adapter": text, "text_optimizer": {}}, tmp_path / "text_adapter.pth")
    torch.save({"epoch": 15, "image_adapter": image, "image_optimizer": {}}, tmp_path / "image_adapter_15.pth")
    torch.manual_seed(1)
    target = methods.create("aaclip", **TINY).load_official_checkpoint(tmp_path)
    for key, value in source.learnable_state_dict().items():
        assert torch.equal(target.learnable_state_dict()[key], value), key
    with pytest.raises(methods.CheckpointError, match="text_adapter.pth and image_adapter.pth"):
        target.load_official_checkpoint(tmp_path / "nowhere")
