import pytest
import torch

from adaclip import AdaCLIP, CheckpointError


def _outputs(model, images):
    with torch.no_grad():
        out = model(images, "bottle")
    return out.image_scores, out.pixel_scores


def test_save_load_round_trip(tiny_model, images, tmp_path):
    with torch.no_grad():
        for p in tiny_model.learnable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "ckpt" / "model.pt"
    tiny_model.save(path, epoch=3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]   # no temp files left
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "adaclip" and payload["epoch"] == 3
    assert not any(k.startswith("clip.") for k in payload["state_dict"])   # frozen CLIP not saved
    again = AdaCLIP.load(path).eval()          # random-init CLIP is seeded by the stored config
    for a, b in zip(_outputs(tiny_model, images), _outputs(again, images)):
        torch.testing.assert_close(a, b)


def _official_state(model) -> dict:
    """Our parameters under the reference's key names, as its trainer's state_dict would hold them."""
    s = model.learnable_state_dict()
    out = {}
    for i in range(model.cfg.prompts.depth):
        out[f"clip_model.visual_prompter.static_prompts.{i}"] = s[f"visual_prompts.static.{i}"]
        out[f"clip_model.text_prompter.static_prompts.{i}"] = s[f"text_prompts.static.{i}"]
    for l in range(model.cfg.prompts.length):
        for w in ("weight", "bias"):
            out[f"clip_model.dynamic_visual_prompt_generator.head.{l}.{w}"] = s[f"visual_prompts.dynamic.{l}.{w}"]
            out[f"clip_model.dynamic_text_prompt_generator.head.{l}.{w}"] = s[f"text_prompts.dynamic.{l}.{w}"]
    for k in range(4):
        for w in ("weight", "bias"):
            out[f"clip_model.patch_token_layer.head.{k}.{w}"] = s[f"patch_proj.{k}.{w}"]
    for w in ("weight", "bias"):
        out[f"clip_model.cls_token_layer.head.0.{w}"] = s[f"cls_proj.{w}"]
    return {k: v.clone() for k, v in out.items()}


def test_official_checkpoint_loads(tiny_cfg, images, tmp_path):
    torch.manual_seed(1)
    source = AdaCLIP.from_config(tiny_cfg).eval()
    path = tmp_path / "pretrained_all.pth"
    torch.save(_official_state(source), path)
    torch.manual_seed(2)
    target = AdaCLIP.from_config(tiny_cfg).eval()
    target.clip.load_state_dict(source.clip.state_dict())       # same frozen CLIP, as with real weights
    target.load_official_checkpoint(path)
    for a, b in zip(_outputs(source, images), _outputs(target, images)):
        torch.testing.assert_close(a, b)


def test_mismatched_official_checkpoint_lists_keys(tiny_cfg, tmp_path):
    torch.manual_seed(1)
    source = AdaCLIP.from_config(tiny_cfg)
    state = _official_state(source)
    del state["clip_model.cls_token_layer.head.0.bias"]
    state["clip_model.something_else.weight"] = torch.zeros(1)
    state["clip_model.visual_prompter.static_prompts.0"] = torch.zeros(9, 64)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        source.load_official_checkpoint(path)
    msg = str(err.value)
    assert "cls_proj.bias" in msg and "something_else" in msg and "visual_prompts.static.0" in msg
    assert "adaclip-tiny" in msg   # the config it expected


def test_corrupt_and_foreign_files(tmp_path, tiny_model):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="truncated.pt"):
        AdaCLIP.load(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="load_official_checkpoint"):
        AdaCLIP.load(foreign)
    with pytest.raises(FileNotFoundError):
        AdaCLIP.load(tmp_path / "missing.pt")


def _activation(model) -> str:
    return type(model.clip.visual.transformer.resblocks[0].mlp.gelu).__name__


def test_official_files_load_with_the_gelu_they_were_trained_with(tiny_cfg, images, tmp_path):
    """`from_official` (what notebook 02, 04 and `--official` use) builds the paper's setting with exact
    GELU; asking for QuickGELU works but warns that the file was trained with GELU."""
    official_config = AdaCLIP.official_config

    paper = official_config()
    assert (paper.backbone.name, paper.backbone.image_size, paper.backbone.quick_gelu) == ("ViT-L-14-336", 518, False)
    torch.manual_seed(1)
    source = AdaCLIP.from_config(tiny_cfg).eval()
    path = tmp_path / "pretrained_all.pth"
    torch.save(_official_state(source), path)
    setting = dict(backbone={"name": "adaclip-tiny", "pretrained": None, "image_size": 32},
                   prompts=tiny_cfg.prompts.to_dict(), fusion=tiny_cfg.fusion.to_dict())
    loaded = AdaCLIP.from_official(path, **setting).eval()
    assert _activation(loaded) == "GELU" and loaded.cfg.backbone.quick_gelu is False
    for a, b in zip(_outputs(source, images), _outputs(loaded, images)):
        torch.testing.assert_close(a, b)
    with pytest.warns(UserWarning, match="trained on exact-GELU features"):
        quick = AdaCLIP.from_official(path, **{**setting, "backbone": {**setting["backbone"], "quick_gelu": True}})
    assert _activation(quick) == "QuickGELU"


def test_a_stored_run_reloads_with_its_activation(images, tmp_path):
    """The activation is part of the stored config; version-1 files (quick_gelu None, which then meant
    'as the weights were trained': QuickGELU for a model OpenAI released) reload with what they ran."""
    from adaclip import AdaCLIPConfig

    cfg = AdaCLIPConfig.tiny(quick_gelu=True)
    torch.manual_seed(0)
    model = AdaCLIP.from_config(cfg).eval()
    model.save(tmp_path / "model.pt")
    again = AdaCLIP.load(tmp_path / "model.pt").eval()
    assert _activation(again) == "QuickGELU" and again.cfg.backbone.quick_gelu is True
    for a, b in zip(_outputs(model, images), _outputs(again, images)):
        torch.testing.assert_close(a, b)
    # version 1: the same file with the activation unrecorded
    for name, expected in (("ViT-B-32", "QuickGELU"), ("adaclip-tiny", "GELU")):
        cfg = AdaCLIPConfig.tiny(name=name)
        torch.manual_seed(0)
        model = AdaCLIP.from_config(cfg)
        payload = torch.load(_saved(model, tmp_path), weights_only=True)
        payload["version"], payload["config"]["backbone"]["quick_gelu"] = 1, None
        torch.save(payload, tmp_path / "v1.pt")
        assert _activation(AdaCLIP.load(tmp_path / "v1.pt")) == expected


def _saved(model, folder):
    model.save(folder / "saved.pt")
    return folder / "saved.pt"


def test_what_a_model_learned_from_survives_a_reload(tiny_model, tmp_path):
    """`trained_on` is saved and restored; a model with learnable parameters of unknown origin says
    None (unknown), never "" (training-free), and a training-free method says ""."""
    from adaclip import methods

    assert tiny_model.trained_on is None                    # learnable, nothing recorded: unknown
    tiny_model.save(tmp_path / "unknown.pt")
    assert methods.load(tmp_path / "unknown.pt").trained_on is None
    tiny_model.trained_on = "mvtec+colondb"
    tiny_model.save(tmp_path / "mvtec.pt")
    assert methods.load(tmp_path / "mvtec.pt").trained_on == "mvtec+colondb"
    free = methods.create("clip", backbone={"name": "adaclip-tiny", "pretrained": None, "image_size": 32})
    assert free.trained_on == ""
    free.save(tmp_path / "clip.pt")
    assert methods.load(tmp_path / "clip.pt").trained_on == ""


def test_load_applies_backbone_overrides(tiny_model, tmp_path):
    """``methods.load(path, **backbone_fields)`` replaces stored backbone fields: the activation, the
    input size, the weights (a missing weights file is an error naming it, not silently ignored)."""
    from adaclip import WeightsUnavailableError, methods

    tiny_model.save(tmp_path / "model.pt")
    assert _activation(methods.load(tmp_path / "model.pt")) == "GELU"
    quick = methods.load(tmp_path / "model.pt", quick_gelu=True, image_size=64)
    assert _activation(quick) == "QuickGELU" and quick.image_size == 64 and quick.cfg.backbone.image_size == 64
    with pytest.raises((WeightsUnavailableError, FileNotFoundError, RuntimeError), match="no-such-weights.pt"):
        methods.load(tmp_path / "model.pt", pretrained=str(tmp_path / "no-such-weights.pt"))
    with pytest.raises(ValueError, match="unknown backbone field 'depth'"):
        methods.load(tmp_path / "model.pt", depth=3)
