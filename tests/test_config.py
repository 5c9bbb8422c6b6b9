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
