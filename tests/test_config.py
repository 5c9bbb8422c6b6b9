import pytest

from adaclip import AdaCLIPConfig, BackboneCfg, FusionCfg, PromptCfg, TrainCfg


def test_defaults_are_the_papers():
    cfg = AdaCLIPConfig()
    assert (cfg.backbone.name, cfg.backbone.pretrained, cfg.backbone.image_size) == ("ViT-L-14-336", "openai", 518)
    assert (cfg.prompts.depth, cfg.prompts.length, cfg.prompts.type, cfg.prompts.branch) == (4, 5, "SD", "VL")
    assert cfg.fusion.use_hsf and cfg.fusion.k_clusters == 20 and cfg.fusion.alpha == 0.2
    assert cfg.fusion.smoothing_sigma == 4.0
    t = TrainCfg()
    assert (t.lr, t.betas, t.epochs, t.seed, t.batch_size) == (0.01, (0.5, 0.999), 5, 111, 1)
    assert (t.dice, t.selection, t.aug_rate) == ("per_image", "last", 0.0)


def test_round_trip_through_dict():
    cfg = AdaCLIPConfig(backbone=BackboneCfg(name="ViT-B-16", image_size=224, out_layers=(3, 6, 9, 12)),
                        prompts=PromptCfg(type="S", branch="L"), fusion=FusionCfg(use_hsf=False))
    again = AdaCLIPConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(again.backbone.out_layers, tuple)


@pytest.mark.parametrize("bad", [dict(type="X"), dict(branch="VX"), dict(depth=0)])
def test_bad_prompt_config(bad):
    with pytest.raises(ValueError):
        PromptCfg(**bad)


def test_unknown_field_named():
    with pytest.raises(ValueError, match="prompt_depth"):
        AdaCLIPConfig.from_dict({"prompt_depth": 3})


def test_random_weights_spelled_out():
    assert BackboneCfg(pretrained="none").pretrained is None
    assert BackboneCfg(pretrained="random").pretrained is None
    assert PromptCfg(type="DS").type == "SD"


def test_each_method_config_defaults_to_its_papers_setting():
    from adaclip import methods

    a = methods.config("aprilgan")
    assert (a.backbone.name, a.backbone.pretrained, a.backbone.image_size, a.smoothing_sigma) == \
        ("ViT-L-14-336", "openai", 518, 0.0)
    w = methods.config("winclip")
    assert (w.backbone.name, w.backbone.pretrained, w.backbone.image_size, w.scales, w.temperature) == \
        ("ViT-B-16-plus-240", "laion400m_e31", 240, (2, 3), 0.07)
    t = methods.train_config("aprilgan")
    assert (t.optimizer, t.lr, t.batch_size, t.epochs, t.aug_rate) == ("adam", 1e-3, 8, 3, 0.2)
    assert methods.train_config("adaclip") == TrainCfg()                  # TrainCfg's defaults are AdaCLIP's
    assert methods.train_config("aprilgan", epochs=15, lr=None).epochs == 15   # None keeps the recipe


def test_method_configs_round_trip_with_nested_sections():
    from adaclip import methods

    for name in methods.available():
        cfg = methods.config(name, image_size=64, pretrained=None)
        again = type(cfg).from_dict(cfg.to_dict())
        assert again == cfg and isinstance(again.backbone, BackboneCfg) and again.backbone.image_size == 64
    with pytest.raises(ValueError, match="no config field 'prompt_depth'"):
        methods.config("aprilgan", prompt_depth=3)
    cfg, unused = methods.config_from_params("aprilgan", backbone="adaclip-tiny", prompt_depth=2, pretrained=None)
    assert cfg.backbone.name == "adaclip-tiny" and cfg.backbone.pretrained == "openai" and unused == ["prompt_depth"]
