"""The contract every registered method keeps, checked for each of `methods.available()` (a method
registered later, here or from another package, is checked the moment it is registered) and for
the example methods in ``examples/`` (what a user's own method looks like).

No method is named here: each is built at test scale by its own ``tiny_config()`` (the tiny random
backbone), on the CPU. What is specific to a method (its parity with its reference, its quirks)
stays in that method's own tests.
"""
import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adaclip import methods
from adaclip.methods import Targets
from adaclip.train import _optimizer

NAMES = ["bottle", "screw", "pill"]
TOL = 1e-5
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def _example_methods(path: Path) -> list:
    """The Method subclasses an example module defines (imported once; it registers them itself)."""
    name = f"adaclip_example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    before = dict(methods.REGISTRY)
    spec.loader.exec_module(module)
    added = [cls for key, cls in methods.REGISTRY.items() if key not in before]
    for cls in added:                    # registered only while a test of it runs (see `name`)
        methods.REGISTRY.pop(cls.name)
    return added


PLUGINS = {cls.name: cls for path in EXAMPLES for cls in _example_methods(path)}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = methods.get(name)
    return cls(cls.tiny_config()).eval()


def perturbed(model, seed: int = 1):
    """Learnable parameters moved off their initial values (a trained model, not a fresh one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.learnable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def images(model, n: int = 3, seed: int = 3) -> torch.Tensor:
    S = model.image_size
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def run(model, x, names):
    with torch.no_grad():
        out = model(x, names)
    return out.image_scores, out.pixel_scores


def same(a, b, tol: float = TOL, what: str = ""):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(params=[*methods.available(), *PLUGINS])
def name(request):
    """A registered method, or an example registered for the test's duration as a user would."""
    if request.param in PLUGINS:
        methods.register(PLUGINS[request.param])
        request.addfinalizer(lambda: methods.REGISTRY.pop(request.param, None))
    return request.param


@pytest.fixture
def model(name):
    return perturbed(build(name))


def test_outputs_have_the_documented_shapes_and_range(model):
    x = images(model)
    scores, maps = run(model, x, NAMES)
    S = model.image_size
    assert scores.shape == (3,) and maps.shape == (3, S, S)
    assert scores.dtype == maps.dtype == torch.float32
    for t in (scores, maps):
        assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    assert maps.flatten(1).std(1).min() > 0                                 # a map, not a constant


def test_a_batch_equals_single_images_in_any_order(model):
    x = images(model)
    batch = run(model, x, NAMES)
    singles = [run(model, x[i:i + 1], NAMES[i:i + 1]) for i in range(3)]
    same(batch, [torch.cat(parts) for parts in zip(*singles)], what="batch of 3 vs single images")
    order = [2, 0, 1]
    permuted = run(model, x[order], [NAMES[i] for i in order])
    same(permuted, [t[order] for t in batch], what="permuted batch")


def test_class_names_one_for_all_or_one_per_image(model):
    x = images(model)
    same(run(model, x, "bottle"), run(model, x, ["bottle"] * 3), tol=0, what="one name for all")
    mixed = run(model, x, NAMES)
    separate = [run(model, x, [n] * 3) for n in NAMES]                      # each name for the whole batch
    same(mixed, [torch.stack([s[k][i] for i, s in enumerate(separate)]) for k in range(2)], what="names per image")


def test_deterministic_and_seeded(name):
    a = perturbed(build(name, seed=5))
    x = images(a)
    first = run(a, x, NAMES)
    same(first, run(a, x, NAMES), tol=0, what="a second call")
    same(first, run(perturbed(build(name, seed=5)), x, NAMES), tol=0, what="built again with the same seed")


def test_save_and_load_round_trip(model, tmp_path):
    x = images(model)
    model.save(tmp_path / "model.pt")
    again = methods.load(tmp_path / "model.pt").eval()
    assert type(again) is type(model) and again.cfg.to_dict() == model.cfg.to_dict()
    assert again.cfg.backbone.quick_gelu in (True, False)                   # the activation, resolved and recorded
    same(run(model, x, NAMES), run(again, x, NAMES), tol=0, what="reloaded")


def _batch(model, n: int = 4):
    S = model.image_size
    g = torch.Generator().manual_seed(7)
    masks = torch.zeros(n, S, S)
    for i in range(1, n, 2):                                                # anomalous images with a square defect
        y, x0 = torch.randint(0, S // 2, (2,), generator=g).tolist()
        masks[i, y:y + S // 3, x0:x0 + S // 3] = 1
    labels = torch.tensor([i % 2 for i in range(n)])
    return images(model, n, seed=11), ["bottle"] * n, masks, labels


def test_training_moves_only_what_each_stage_learns_and_lowers_the_loss(name):
    model = perturbed(build(name))
    stages = model.training_stages(methods.train_config(name))
    if not model.learnable_parameters():
        assert model.trained_on == "" and all(not s.parameters for s in stages)
        return
    x, names, masks, labels = _batch(model)
    assert {id(p) for s in stages for p in s.parameters} <= {id(p) for p in model.learnable_parameters()}
    for stage in stages:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer, _ = _optimizer(dataclasses.replace(stage))
        model.train()
        losses = []
        for _ in range(8):
            out = model(x, names, targets=Targets(labels, masks, torch.ones(len(x), dtype=torch.bool), stage=stage.name))
            assert out.loss.ndim == 0 and torch.isfinite(out.loss)
            assert set(out.loss_parts) <= set(model.loss_part_names)         # each a column of train_log.csv
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            losses.append(float(out.loss.detach()))
        model.eval()
        mine = {id(p) for p in stage.parameters}
        names_of = {k for k, p in model.named_parameters() if id(p) in mine}
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and changed <= names_of, (stage.name, sorted(changed - names_of)[:5])
        assert not any(k.startswith("clip.") for k in changed)             # the frozen CLIP, bit for bit
        assert losses[-1] < losses[0], (stage.name, losses)


@pytest.fixture(scope="module")
def sample():
    from adaclip.data import build_manifest
    from adaclip.data.registry import resolve_root

    root = resolve_root("sample")
    test = pd.concat([build_manifest("visa", root), build_manifest("kvasir", root)], ignore_index=True)
    return root, build_manifest("mvtec", root), test[test.split == "test"].reset_index(drop=True)


def test_trains_and_evaluates_through_the_harness(name, sample, tmp_path):
    """`train` (each stage in turn, logged by name, the loss parts as columns) and `evaluate` (metrics,
    scores, config.json) on the embedded sample, and the run set beside its own method's published
    numbers, as `adaclip train` / `adaclip evaluate` and the notebooks run every method."""
    import json

    from adaclip import EvalCfg, analysis
    from adaclip.evaluate import evaluate
    from adaclip.train import train

    root, train_rows, test_rows = sample
    cls = methods.get(name)
    recipe = methods.train_config(name, epochs=1, batch_size=8)
    model = train(cls.tiny_config(), recipe, train_rows, root, tmp_path, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == name and config["backbone_weights"] == "random" and (tmp_path / "model.pt").is_file()
    log = pd.read_csv(tmp_path / "train_log.csv")
    if model.learnable_parameters():
        assert list(dict.fromkeys(log.stage)) == [s.name for s in model.training_stages(recipe)]
        assert config["trained_on"] == "mvtec" and log.loss.notna().all()
    else:
        assert log.empty and config["trained_on"] == ""
    evaluate(methods.load(tmp_path / "model.pt"), test_rows, root, EvalCfg(batch_size=4), run_dir=tmp_path,
             progress=False)
    metrics = pd.read_csv(tmp_path / "metrics.csv").set_index(["dataset", "category"])
    assert metrics.loc["visa", "image_auroc"].notna().all() and metrics.pixel_auroc.notna().all()
    runs = analysis.load_runs(tmp_path.parent, [tmp_path.name])
    paired = analysis.reproduction_table(runs).dropna(subset=["published"])
    published = analysis.published_results()
    own = published[(published.method == cls.published_name) & published.dataset.isin(["visa", "kvasir"])]
    assert set(paired.published_method) == ({cls.published_name} if len(own) else set())


def test_export_matches_pytorch_or_says_why_not(model, tmp_path):
    pytest.importorskip("onnxruntime", reason="the optional extra 'export' (make test installs it)")
    from adaclip.export import compare_with_torch, export_onnx

    try:
        path = export_onnx(model, "bottle", tmp_path / "m.onnx", batch_size=2)
    except (ValueError, NotImplementedError) as e:
        assert model.name in str(e) and len(str(e)) > 30, str(e)          # an error that says why
        return
    diffs = compare_with_torch(path, model, images(model, 2))
    assert diffs["image_scores"] < 1e-4 and diffs["anomaly_maps"] < 1e-4, diffs


def test_few_shot_works_or_says_there_is_none(model):
    x = images(model)
    if not model.supports_few_shot:
        with pytest.raises(ValueError, match="has no few-shot mode"):
            model.few_shot_memory()
        return
    memory = model.few_shot_memory()
    memory.add("d/bottle", images(model, 2, seed=9), "bottle")
    with torch.no_grad():
        out = memory.apply(model(x, "bottle", return_tokens=True), ["d/bottle"] * 3)
    zero = run(model, x, "bottle")
    for t, z in zip((out.image_scores, out.pixel_scores), zero):
        assert t.shape == z.shape and torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    assert not torch.equal(out.pixel_scores, zero[1])                        # the references count
    with torch.no_grad():                                                   # a batch equals single images
        singles = [memory.apply(model(x[i:i + 1], "bottle", return_tokens=True), ["d/bottle"]).pixel_scores
                   for i in range(3)]
    torch.testing.assert_close(out.pixel_scores, torch.cat(singles), rtol=0, atol=TOL)


def test_bad_input_is_a_clear_error(model):
    S = model.image_size
    x = images(model)
    cases = [(torch.randn(3, 3, S + model.patch_size, S + model.patch_size), NAMES, rf"{S}x{S}"),
             (torch.randn(3, 1, S, S), NAMES, r"\(B, 3, "),
             (x, ["bottle", "", "pill"], "empty class name"),
             (x, ["bottle", "screw"], "3 strings"),
             (x.numpy(), NAMES, "torch.Tensor")]
    for data, names, message in cases:
        with pytest.raises(ValueError, match=message):
            with torch.no_grad():
                model(data, names)


def test_release_setting_keeps_its_own_backbone_under_a_partial_override(name):
    """`from_official(path, backbone={"pretrained": ...})`, the usual offline call, replaces the weights
    and nothing else of the method's release setting (its interpolation, size, activation stay)."""
    cls = methods.get(name)
    own = cls.official_config().backbone.to_dict()
    given = cls.official_config(backbone={"pretrained": "/weights/ViT.pt"}).backbone.to_dict()
    assert given == {**own, "pretrained": "/weights/ViT.pt"}


def test_it_describes_itself(name):
    """What the harness, the README table and the analysis read of every method."""
    cls = methods.get(name)
    assert cls.name == name and dataclasses.is_dataclass(cls.config_class)
    assert cls.paper and cls.reference and cls.learns
    cfg = cls.tiny_config()
    assert type(cfg).from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    recipe = methods.train_config(name)
    assert recipe.epochs >= 1 and recipe.batch_size >= 1 and recipe.lr > 0
    assert cls.published_name is None or isinstance(cls.published_name, str)
    np.testing.assert_equal(methods.name_of(cfg), name)
