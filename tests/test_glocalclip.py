"""GlocalCLIP in the harness: the paper's setting per auxiliary dataset, files in the reference's layout,
its loss term in the training log, its published rows. (Its computation against the reference:
test_glocalclip_parity.py.)"""
import pandas as pd
import pytest
import torch

from adaclip import analysis, methods
from adaclip.methods import CheckpointError
from adaclip.methods.glocalclip import PROMPT_SETTINGS


def _meta(**fields):
    with torch.device("meta"):
        return methods.GlocalCLIP(methods.config("glocalclip", pretrained=None, **fields), device="meta")


@pytest.mark.parametrize("setting, learned", [("mvtec", 52_224), ("visa", 64_512), ("colondb", 70_656),
                                              ("clinicdb", 61_440)])
def test_the_paper_setting_per_auxiliary_dataset(setting, learned):
    """train.sh's lengths per auxiliary dataset (the spec's counts of learned values), on AnomalyCLIP's
    backbone: ViT-L-14-336 @ 518, QuickGELU, bilinear positions, the side path from layer 6, the map
    from layer 24 (the reference's four aliased entries: segmentation weight 4), sigma 8."""
    m = _meta(prompt_setting=setting)
    c = m.cfg
    assert (c.n_ctx, c.ab_ctx, c.deep_depth, c.deep_length) == PROMPT_SETTINGS[setting]
    assert sum(p.numel() for p in m.learnable_parameters()) == learned
    assert (c.backbone.name, c.backbone.image_size, c.backbone.quick_gelu, c.backbone.pos_embed_interp) == \
        ("ViT-L-14-336", 518, True, "bilinear")
    assert (c.layers, c.side_from, c.seg_weight, c.smoothing_sigma, c.margin, c.glocal_weight) == \
        ((24,), 6, 4.0, 8.0, 0.0, 1.0)
    assert not c.global_ln_post and not c.round_prompts_fp16 and not c.alias_layers
    t = methods.train_config("glocalclip")
    assert (t.epochs, t.batch_size, t.lr, tuple(t.betas), t.optimizer) == (15, 8, 1e-3, (0.5, 0.999), "adam")
    assert _meta(layers=(6, 12, 18, 24)).cfg.seg_weight == 1.0            # the four real layers, 1 each
    with pytest.raises(ValueError, match="prompt_setting must be one of"):
        methods.config("glocalclip", prompt_setting="kvasir")


def test_sentences_and_token_ids_are_the_references():
    """SOT, n (or n + m) placeholders 'g' / 'l' (tokens 326 and 331), then 'object .' or 'damaged object .'
    and EOT: the EOT at n + 3 and n + m + 4, as the reference tokenizes them."""
    import open_clip

    m = _meta()
    n, k = m.cfg.n_ctx, m.cfg.ab_ctx
    tokens = open_clip.get_tokenizer("ViT-L-14-336")(list(m.sentences()))      # what the model tokenizes
    assert tokens.shape[0] == 4 and tokens[:, 0].eq(49406).all()
    assert tokens[0, 1:1 + n].eq(326).all() and tokens[1, 1:1 + n + k].eq(326).all() and tokens[3, 1:1 + n + k].eq(331).all()
    assert tokens.argmax(-1).tolist() == [n + 3, n + k + 4, n + 3, n + k + 4]


def _reference_layout(model) -> dict:
    """The state dict the reference's train.py saves: (1, 1, k, D) contexts, the frozen buffers, the deep
    prompts and the unused projections."""
    D = model.clip.transformer.width
    state = {k: getattr(model, k).detach().clone()[None, None] for k in
             ("ctx_global_pos", "ctx_global_neg", "ctx_local_pos", "ctx_local_neg")}
    for i, p in enumerate(model.deep):
        state[f"compound_prompts_text.{i}"] = p.detach().clone()
        state[f"compound_prompt_projections.{i}.weight"] = torch.zeros(896, D)
        state[f"compound_prompt_projections.{i}.bias"] = torch.zeros(896)
    for j, name in enumerate(f"{b}_{s}" for b in ("global", "local") for s in ("pos", "neg")):
        state[f"tokenized_prompts_{name}"] = model.tokens[j].int()[None, None]
        state[f"token_prefix_{name}"] = torch.zeros(1, 1, 1, D)
    return {"prompt_learner": state}


def test_files_in_the_reference_layout_load(tmp_path):
    """No weights are released: a file written in train.py's layout loads (its lengths read from the
    shapes), gives the outputs of the model that wrote it, and says which auxiliary set its lengths are."""
    cls = methods.get("glocalclip")
    torch.manual_seed(0)
    source = cls(cls.tiny_config()).eval()
    with torch.no_grad():
        for p in source.learnable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "checkpoints" / "epoch_15.pth"
    path.parent.mkdir()
    torch.save(_reference_layout(source), path)
    tiny = source.cfg.to_dict()
    loaded = cls.from_official(path, backbone=tiny["backbone"], layers=list(source.cfg.layers), side_from=source.cfg.side_from)
    assert (loaded.cfg.n_ctx, loaded.cfg.ab_ctx, loaded.cfg.deep_depth, loaded.cfg.deep_length) == \
        (source.cfg.n_ctx, source.cfg.ab_ctx, source.cfg.deep_depth, source.cfg.deep_length)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = source(x, "object"), loaded.eval()(x, "object")
    torch.testing.assert_close(a.pixel_scores, b.pixel_scores) and torch.testing.assert_close(a.image_scores, b.image_scores)
    assert loaded.trained_on is None                                 # lengths of no train.sh setting: unknown
    # a model of other lengths refuses the file, naming both
    other = cls(cls.tiny_config())
    other_cfg = other.cfg.to_dict()
    other_cfg["ab_ctx"] = 2
    with pytest.raises(CheckpointError, match=r"lengths .* = \(4, 3, 2, 2\), this model has \(4, 2, 2, 2\)"):
        cls(cls.config_class.from_dict(other_cfg)).load_official_checkpoint(path)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a GlocalCLIP-layout file"):
        cls.from_official(tmp_path / "foreign.pth")


def test_a_train_sh_setting_names_its_auxiliary_data(tmp_path):
    """A file with the VisA-trained lengths (13, 13, 9, 4) is recorded as trained on VisA."""
    D = 768
    state = {k: torch.zeros(1, 1, n, D) for k, n in (("ctx_global_pos", 13), ("ctx_global_neg", 13),
                                                     ("ctx_local_pos", 13), ("ctx_local_neg", 13))}
    state.update({f"compound_prompts_text.{i}": torch.zeros(4, D) for i in range(8)})
    torch.save({"prompt_learner": state}, tmp_path / "epoch_15.pth")
    assert methods.GlocalCLIP.official_trained_on(tmp_path / "epoch_15.pth") == "visa"


def test_training_logs_the_glocal_term(tmp_path):
    """train() through the harness: the glocal contrastive term is a column of train_log.csv, and a
    positive margin is recorded and changes the loss."""
    from adaclip.data import build_manifest
    from adaclip.data.registry import resolve_root
    from adaclip.train import train

    cls = methods.get("glocalclip")
    root = resolve_root("sample")
    df = build_manifest("mvtec", root)
    recipe = methods.train_config("glocalclip", epochs=1, batch_size=8)
    logs = {}
    for margin in (0.0, 2.0):
        cfg = cls.tiny_config()
        cfg.margin = margin
        train(cfg, recipe, df, root, tmp_path / str(margin), progress=False)
        logs[margin] = pd.read_csv(tmp_path / str(margin) / "train_log.csv")
    assert {"loss", "image_focal", "segmentation", "glocal"} <= set(logs[0.0].columns) and len(logs[0.0]) == 2
    assert logs[0.0].glocal.notna().all() and (logs[2.0].glocal > logs[0.0].glocal).all()


def test_published_rows_pair_with_glocalclip_runs():
    published = analysis.published_results()
    rows = published[published.method == methods.GlocalCLIP.published_name]
    assert len(rows) == 15 and rows.pixel_aupro.isna().all() and rows.pixel_aupro_cflow.notna().sum() == 12
    assert set(rows.trained_on) == {"visa", "mvtec", "colondb", "clinicdb"}
    assert analysis.published_name("glocalclip") == "GlocalCLIP"
