"""Training: loss, learning from scratch, determinism, resume, model selection, input checks."""
import json

import pandas as pd
import pytest
import torch

from adaclip import AdaCLIP, AdaCLIPConfig, BackboneCfg, EvalCfg, FusionCfg, PromptCfg, TrainCfg
from adaclip.data import ManifestError, build_manifest
from adaclip.data.synthetic import make_synthetic
from adaclip.evaluate import evaluate
from adaclip.methods.losses import dice_loss, focal_loss
from adaclip.train import load_log, seed_everything, split_validation, train


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root / "synthetic", categories=("stripes", "checker"), n_good=8, n_defect=16, size=64, seed=0)
    make_synthetic(root / "heldout", categories=("dots",), n_good=8, n_defect=16, size=64, seed=1)
    return root, build_manifest("synthetic", root), build_manifest("synthetic", root, folder="heldout", name="heldout")


def cfg64() -> AdaCLIPConfig:
    return AdaCLIPConfig(backbone=BackboneCfg(name="adaclip-tiny", pretrained=None, image_size=64),
                         prompts=PromptCfg(depth=2, length=2), fusion=FusionCfg(k_clusters=3))


def small(df, n=8):
    return pd.concat([df[df.label == 0].head(n // 2), df[df.label == 1].head(n // 2)]).reset_index(drop=True)


def test_focal_and_dice_match_the_reference_formulas():
    p = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    t = torch.tensor([0, 0])
    pt = torch.tensor([0.9 * (1 - 1e-5) + 0.1 * 1e-5, 0.3 * (1 - 1e-5) + 0.7 * 1e-5]) + 1e-5
    torch.testing.assert_close(focal_loss(p, t), (-(1 - pt) ** 2 * pt.log()).mean())
    probs, target = torch.rand(2, 4, 4), (torch.rand(2, 4, 4) > 0.5).float()
    per_image = 1 - ((2 * (probs * target).sum((1, 2)) + 1) / (probs.sum((1, 2)) + target.sum((1, 2)) + 1)).mean()
    torch.testing.assert_close(dice_loss(probs, target), per_image)
    per_row = 1 - ((2 * (probs * target).sum(2) + 1) / (probs.sum(2) + target.sum(2) + 1)).mean()
    torch.testing.assert_close(dice_loss(probs, target, "per_row"), per_row)


@pytest.mark.parametrize("name", ["crane", "aprilgan", "linear"])
def test_a_stage_trains_with_its_recipe(name):
    """The default stage takes the recipe's optimiser settings (Crane's betas (0.6, 0.999), APRIL-GAN's
    (0.5, 0.999), AdaCLIP's AdamW for the linear ablation), and the optimiser train() builds for it uses them."""
    from adaclip import methods
    from adaclip.train import _optimizer

    recipe = methods.train_config(name, lr=0.02)
    model = methods.create(name, backbone={"name": "adaclip-tiny", "pretrained": None, "image_size": 32})
    (stage,) = model.training_stages(recipe)
    assert (stage.lr, tuple(stage.betas), stage.optimizer, stage.batch_size, stage.epochs) == \
        (0.02, tuple(recipe.betas), recipe.optimizer, recipe.batch_size, recipe.epochs)
    optimizer, _ = _optimizer(stage)
    assert optimizer.param_groups[0]["betas"] == tuple(recipe.betas) and optimizer.param_groups[0]["lr"] == 0.02
    assert type(optimizer).__name__.lower() == recipe.optimizer


def test_training_learns_from_scratch(synthetic, tmp_path):
    """A random tiny ViT: pixel AUROC on an unseen synthetic texture goes from chance to well above."""
    root, train_df, heldout = synthetic
    tc = TrainCfg(epochs=5, batch_size=4)
    seed_everything(tc.seed)                     # the exact initial state training starts from
    before = evaluate(AdaCLIP(cfg64()), heldout, root, EvalCfg(batch_size=16), progress=False).metrics
    model = train(cfg64(), tc, train_df, root, tmp_path, progress=False)
    after = evaluate(model, heldout, root, EvalCfg(batch_size=16), progress=False).metrics
    b, a = float(before.pixel_auroc.iloc[0]), float(after.pixel_auroc.iloc[0])
    print(f"held-out pixel AUROC: {b:.3f} -> {a:.3f}")
    assert b < 0.55 and a > 0.65 and a - b > 0.2


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_same_seed_same_checkpoint(synthetic, tmp_path):
    root, train_df, _ = synthetic
    for run in ("a", "b"):
        train(cfg64(), TrainCfg(epochs=1, batch_size=4), small(train_df), root, tmp_path / run, progress=False)
    a, b = _weights(tmp_path / "a/model.pt"), _weights(tmp_path / "b/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(load_log(tmp_path / "a"), load_log(tmp_path / "b"))


def test_killed_run_resumes_to_the_same_result(synthetic, tmp_path):
    root, train_df, _ = synthetic
    data, tc = small(train_df), TrainCfg(epochs=3, batch_size=4)       # 2 steps per epoch
    train(cfg64(), tc, data, root, tmp_path / "full", progress=False)
    train(cfg64(), tc, data, root, tmp_path / "killed", progress=False, max_steps=3)   # dies in epoch 2
    assert (tmp_path / "killed/checkpoints/epoch_001.pt").is_file()
    assert not (tmp_path / "killed/model.pt").exists()
    with pytest.raises(ValueError, match="cannot resume"):                 # another lr is another run
        train(cfg64(), TrainCfg(epochs=3, batch_size=4, lr=0.02), data, root, tmp_path / "killed",
              progress=False, resume=True)
    train(cfg64(), tc, data, root, tmp_path / "killed", progress=False, resume=True)
    a, b = _weights(tmp_path / "full/model.pt"), _weights(tmp_path / "killed/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(load_log(tmp_path / "full"), load_log(tmp_path / "killed"))
    # the checkpoint reloads into an identical model (random backbone init is seeded)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        again = AdaCLIP.load(tmp_path / "killed/model.pt").eval()(x, "stripes").pixel_scores
        model = AdaCLIP(cfg64())
        model.load_state_dict(a, strict=False)
        torch.testing.assert_close(model.eval()(x, "stripes").pixel_scores, again)


def test_run_folder_contents(synthetic, tmp_path):
    root, train_df, _ = synthetic
    train(cfg64(), TrainCfg(epochs=2, batch_size=4), small(train_df), root, tmp_path, progress=False)
    log = load_log(tmp_path)
    assert list(log.columns) == ["epoch", "stage", "step", "loss", "image_focal", "segmentation", "lr"]
    assert (log.stage == "train").all()
    assert log.step.tolist() == [1, 2, 3, 4] and (log.lr == 0.01).all()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone_weights"] == "random" and "say nothing about detection quality" in config["warning"]
    assert config["selected_epoch"] == 2 and config["train"]["seed"] == 111
    assert config["environment"]["packages"]["torch"] == torch.__version__.split("+")[0]


def test_validation_split_is_disjoint_and_stratified(synthetic):
    _, train_df, _ = synthetic
    rest, val = split_validation(train_df, 0.25, seed=111)
    assert not set(rest.image) & set(val.image)
    assert sorted(rest.image.tolist() + val.image.tolist()) == sorted(train_df.image)
    for (cat, label), g in train_df.groupby(["category", "label"]):
        assert len(val[(val.category == cat) & (val.label == label)]) == round(len(g) * 0.25)


def test_validation_selection_picks_the_best_epoch(synthetic, tmp_path, monkeypatch):
    """selection="val": each epoch is scored on a split of the training data that training never
    loads (and test data is never read); model.pt is the best-scoring epoch, not the last."""
    import adaclip.evaluate
    import adaclip.train
    root, train_df, heldout = synthetic
    data = small(train_df, 12)
    loaded = []

    class Recording(adaclip.train.AnomalyDataset):
        def __init__(self, df, *args, **kwargs):
            loaded.append(set(df.image))
            super().__init__(df, *args, **kwargs)

    monkeypatch.setattr(adaclip.train, "AnomalyDataset", Recording)
    monkeypatch.setattr(adaclip.evaluate, "AnomalyDataset", Recording)
    planned = iter([0.2, 0.9, 0.5])                        # epoch 2 is best, epoch 3 is last
    real_score = adaclip.train._selection_score
    seen = []

    def score(result):
        seen.append(real_score(result))
        return next(planned)

    monkeypatch.setattr(adaclip.train, "_selection_score", score)
    train(cfg64(), TrainCfg(epochs=3, batch_size=4, selection="val", val_fraction=0.25), data, root, tmp_path,
          progress=False, test_manifests=heldout.assign(image="never/read.png"))
    _, val = split_validation(data, 0.25, 111)
    training, *validations = loaded
    assert validations and all(v == set(val.image) for v in validations)
    assert not training & set(val.image) and training | set(val.image) == set(data.image)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["selection"] == "val" and config["selected_epoch"] == 2
    assert config["selection_scores"] == {"1": 0.2, "2": 0.9, "3": 0.5}
    best, chosen = _weights(tmp_path / "checkpoints/epoch_002.pt"), _weights(tmp_path / "model.pt")
    assert all(torch.equal(best[k], chosen[k]) for k in best)
    assert not all(torch.equal(best[k], v) for k, v in _weights(tmp_path / "checkpoints/epoch_003.pt").items())
    # the criterion itself: mean pixel F1-max over the validation categories, for that epoch's weights
    model = AdaCLIP.load(tmp_path / "checkpoints/epoch_003.pt")
    metrics = evaluate(model, val, root, EvalCfg(batch_size=4, aupro=False), progress=False).metrics
    assert seen[2] == pytest.approx(metrics[metrics.category != "mean"].pixel_f1.mean())


def test_test_set_selection_is_an_explicit_option(synthetic, tmp_path):
    root, train_df, heldout = synthetic
    with pytest.raises(ValueError, match="test_manifests"):
        train(cfg64(), TrainCfg(epochs=1, selection="test_f1"), small(train_df), root, tmp_path, progress=False)
    train(cfg64(), TrainCfg(epochs=2, batch_size=4, selection="test_f1"), small(train_df), root, tmp_path,
          progress=False, test_manifests=small(heldout))
    assert json.loads((tmp_path / "config.json").read_text())["selection"] == "test_f1"


def test_bad_data_stops_before_training(synthetic, tmp_path):
    root, train_df, heldout = synthetic
    broken = small(train_df).copy()
    broken.loc[0, "image"] = "synthetic/missing.png"
    with pytest.raises(ManifestError, match="missing.png does not exist"):
        train(cfg64(), TrainCfg(epochs=1), broken, root, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ManifestError, match="zero-shot"):
        train(cfg64(), TrainCfg(epochs=1), small(train_df), root, tmp_path, progress=False,
              test_manifests=small(train_df))


def test_batch_size_one_and_per_row_dice_run(synthetic, tmp_path):
    root, train_df, _ = synthetic
    train(cfg64(), TrainCfg(epochs=1, batch_size=1, dice="per_row"), small(train_df, 2), root, tmp_path,
          progress=False)
    assert len(load_log(tmp_path)) == 2


@pytest.mark.parametrize("rows, shared", [(4, False), (12, True)])
def test_image_cache_is_shared_only_when_workers_fill_it(synthetic, tmp_path, monkeypatch, rows, shared):
    """One batch per epoch gets no loader workers, so its cache stays in the process (no shared
    block); several batches get workers (automatic count, two cores or more), which fill one."""
    import adaclip.train as train_module
    from adaclip.data.cache import ImageCache

    # the automatic count on two cores, as train() sees it (the loaders themselves run without workers)
    monkeypatch.setattr(train_module, "resolve_workers",
                        lambda n, batches=None, work_s=None: 0 if batches is not None and batches < 2 else 2)
    seen = []

    class Spy(ImageCache):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("shared"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train_module, "ImageCache", Spy)
    root, train_df, _ = synthetic
    train(cfg64(), TrainCfg(epochs=2, batch_size=4, num_workers=0), small(train_df, rows), root, tmp_path,
          progress=False)
    assert seen == [shared]
