"""The fast evaluation and training pipeline gives exactly the results of the plain one: loader
workers, the decoded-image cache, region labelling in the workers, histograms on the device, maps
written by a thread beside the loop. (Its speed is printed by `adaclip benchmark --pipeline`.)"""
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from adaclip import AdaCLIP, AdaCLIPConfig, EvalCfg, bootstrap
from adaclip.config import TrainCfg
from adaclip.data import AnomalyDataset, build_manifest
from adaclip.data.cache import ImageCache
from adaclip.data.loading import MAX_WORKERS, resolve_workers, training_loader
from adaclip.data.registry import resolve_root
from adaclip.evaluate import evaluate
from adaclip.metrics import CflowAupro, PixelAccumulator, region_weights

ROOT = resolve_root("sample")


@pytest.fixture(scope="module")
def visa():
    return build_manifest("visa", ROOT)


def _tiny() -> AdaCLIP:
    torch.manual_seed(0)
    return AdaCLIP.from_config(AdaCLIPConfig.tiny()).eval()


def test_workers_do_not_change_evaluation(visa, tmp_path):
    """0 and 2 loader workers (regions labelled there, histograms filled per category and batch):
    the same scores, metrics and saved maps to the last bit."""
    model = _tiny()
    a = evaluate(model, visa, ROOT, EvalCfg(batch_size=3, num_workers=0, save_maps=True), run_dir=tmp_path / "a",
                 progress=False)
    b = evaluate(model, visa, ROOT, EvalCfg(batch_size=3, num_workers=2, save_maps=True), run_dir=tmp_path / "b",
                 progress=False)
    pd.testing.assert_frame_equal(a.scores, b.scores)
    pd.testing.assert_frame_equal(a.metrics, b.metrics)
    for path in sorted((tmp_path / "a" / "maps").glob("*.npz")):
        with np.load(path) as x, np.load(tmp_path / "b" / "maps" / path.name) as y:
            assert np.array_equal(x["map"], y["map"])


def test_device_metrics_equal_the_per_image_cpu_metrics(visa):
    """What evaluation computes now (batched updates per category with the workers' region
    weights) against one image at a time with the regions labelled in the loop, as before."""
    model = _tiny()
    fast = evaluate(model, visa, ROOT, EvalCfg(batch_size=5, num_workers=0), progress=False)   # batches mix categories
    dataset = AnomalyDataset(visa, ROOT, model.transform, model.image_size)
    per_image = {}
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            if not item["has_mask"]:
                continue
            out = model(item["image"][None], [item["class_name"]])
            key = (visa.dataset[i], visa.category[i])
            per_image.setdefault(key, PixelAccumulator()).update(out.pixel_scores[0].clamp(0, 1).numpy(),
                                                                  item["mask"].numpy())
    m = fast.metrics.set_index(["dataset", "category"])
    for key, acc in per_image.items():
        values, _ = acc.compute()
        for name in ("pixel_auroc", "pixel_ap", "pixel_f1", "pixel_aupro"):
            assert abs(m.loc[key, name] - values[name]) <= 1e-6, (key, name)


def _masks(n=6, size=40, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for k in range(n - 1):                                          # the last one without a defect
        for _ in range(3):
            y, x, h, w = rng.integers(0, size - 8, 2).tolist() + rng.integers(1, 8, 2).tolist()
            masks[k, y:y + h, x:x + w] = 1
    return masks, rng.random((n, size, size)).astype(np.float32)


def test_region_weights_and_batched_updates_match_per_image_labelling():
    masks, maps = _masks()
    one = PixelAccumulator(bins=4096)
    for m, s in zip(masks, maps):
        one.update(s, m)                                            # labels here
        labelled, n = ndimage.label(m, structure=np.ones((3, 3)))
        pixels, w, k = region_weights(m)
        assert k == n and np.array_equal(pixels, np.flatnonzero(m))
        assert np.allclose(w * np.bincount(labelled.ravel())[labelled.ravel()[pixels]], 1)
    corner = np.zeros((6, 6), np.uint8)
    corner[0:2, 0:2] = corner[2:4, 2:4] = 1                         # touching at a corner: one region (8-connected)
    pixels, w, k = region_weights(corner)
    assert k == 1 and len(pixels) == 8 and np.allclose(w, 1 / 8)
    listed = [tuple(torch.as_tensor(v) if i < 2 else v for i, v in enumerate(region_weights(m))) for m in masks]
    regions = sum(n for _, _, n in listed)
    batched = PixelAccumulator(bins=4096)
    batched.update(torch.from_numpy(maps), torch.from_numpy(masks), listed)
    assert torch.equal(one.hist, batched.hist) and one.regions == batched.regions == regions
    torch.testing.assert_close(one.pro, batched.pro, rtol=1e-12, atol=1e-15)
    a, b = one.compute()[0], batched.compute()[0]
    assert a == b or all(abs(a[k] - b[k]) < 1e-12 for k in a)


def test_device_path_equals_the_host_path(monkeypatch):
    """The torch path (what runs on a GPU: bincount of 2 x bins, pinned region lists, the range check
    deferred to the first read) run on CPU tensors, against the numpy path the CPU uses."""
    masks, maps = _masks()
    maps[1, 3, 3], maps[2, 0, 0] = 1.0, 0.0                         # both ends of the range
    listed = [region_weights(m) for m in masks]
    # with the bootstrap's replicate histograms fed alongside (numpy on the host, torch on a device)
    counts = bootstrap.resample_counts([int(m.any()) for m in masks], 50, 0, "d", "c")
    cols = list(range(len(maps)))
    host = PixelAccumulator(bins=4096, replicates=bootstrap.PixelReplicates(counts))
    host.update(maps[:4], masks[:4], listed[:4], images=cols[:4])
    host.update(maps[4:], masks[4:], listed[4:], images=cols[4:])
    monkeypatch.setattr(PixelAccumulator, "_update_host", PixelAccumulator._update_device)
    device = PixelAccumulator(bins=4096, replicates=bootstrap.PixelReplicates(counts))
    device.update(torch.from_numpy(maps[:4]), torch.from_numpy(masks[:4]), listed[:4], images=cols[:4])
    device.update(torch.from_numpy(maps[4:]), torch.from_numpy(masks[4:]), images=cols[4:])   # labelled here
    assert torch.equal(host.hist, device.hist) and host.regions == device.regions
    torch.testing.assert_close(host.pro, device.pro, rtol=1e-12, atol=1e-15)
    assert host.replicates.state.abs().sum() > 0
    torch.testing.assert_close(host.replicates.state, device.replicates.state, rtol=1e-12, atol=1e-12)
    bad = PixelAccumulator(bins=4096)
    bad.update(maps * 1.5, masks)                                   # no read yet, no error yet
    with pytest.raises(ValueError, match=r"in \[0, 1\], got range \[0, 1\.5\]"):
        bad.compute()


def test_thresholds_below_equals_a_binary_search():
    """The cflow AUPRO's per-pixel count of thresholds below each score, without the search: values
    on, just above and just below every threshold, beyond both ends, NaN; reference thresholds from
    float32 extents (their float64 steps do not divide evenly) and degenerate ones."""
    from adaclip.metrics import thresholds_below

    rng = np.random.default_rng(0)
    for lo, hi in [(0.0, 1.0), (0.1234567, 0.7654321), (0.3, 0.30001), (-2.5, 1e3)]:
        th = CflowAupro().thresholds(np.array([np.float32(lo), -np.float32(hi)]))
        edge = np.concatenate([th, np.nextafter(th, np.inf), np.nextafter(th, -np.inf),
                               th.astype(np.float32), [lo - 1, hi + 1, hi, lo]])
        values = np.concatenate([edge, rng.uniform(lo - 0.1, hi + 0.1, 5000)]).astype(np.float32)
        assert np.array_equal(thresholds_below(values, th), np.searchsorted(th, values.astype(np.float64)))
    # uneven thresholds: the guess is off by several steps, in both directions, and corrected
    for th in [np.sort(rng.random(50)), np.geomspace(1e-3, 1, 30), np.r_[0.0, 0.01, 0.02, 0.9, 1.0]]:
        th = th.astype(np.float32).astype(np.float64)              # float32 maps can sit on them exactly
        values = np.concatenate([th, np.nextafter(th, np.inf), np.nextafter(th, -np.inf), rng.random(3000)])
        values = values.astype(np.float32)
        assert np.array_equal(thresholds_below(values, th), np.searchsorted(th, values.astype(np.float64)))
    for th in [np.zeros(0), np.array([0.5]), np.array([0.2, 0.2, 0.7])]:
        values = np.array([0.1, 0.2, 0.5, 0.7, 0.9, np.nan], np.float32)
        assert np.array_equal(thresholds_below(values, th), np.searchsorted(th, values.astype(np.float64)))
    th = CflowAupro().thresholds(np.array([0.0, -1.0]))
    values = np.array([[0.5, np.nan]], np.float32)
    assert np.array_equal(thresholds_below(values, th), np.searchsorted(th, values.astype(np.float64)))


def test_device_normalisation_equals_the_transform(visa):
    """The workers send uint8 images; `normalize` on the device gives the transform's tensor exactly."""
    model = _tiny()
    plain = AnomalyDataset(visa, ROOT, model.transform, model.image_size)
    raw = AnomalyDataset(visa, ROOT, model.loader_transform, model.image_size)
    for i in (0, 5, 13):
        x = raw[i]["image"]
        assert x.dtype == torch.uint8 and torch.equal(model.normalize(x[None])[0], plain[i]["image"])
    x = plain[0]["image"]
    assert model.normalize(x) is x                                       # float input: already normalised


def test_resolve_workers():
    assert resolve_workers(3) == 3 and resolve_workers(0) == 0
    auto = resolve_workers(None)
    assert 0 <= auto <= MAX_WORKERS
    assert resolve_workers(None, batches=1) == 0                    # one batch: nothing to overlap with
    assert resolve_workers(None, batches=2) == min(auto, 1)
    assert resolve_workers(None, batches=9, work_s=0.2) == 0                 # little input: the main process
    assert resolve_workers(None, batches=9, work_s=30) == min(auto, 8)
    assert resolve_workers(2, batches=9, work_s=0.2) == 2                     # a given count is kept
    with pytest.raises(ValueError, match="num_workers"):
        resolve_workers(-1)


def test_small_evaluations_run_without_workers(visa, monkeypatch):
    """The automatic count times one item: the embedded sample's few images load faster in the main
    process than workers start; with more input than MIN_WORK_S the workers come (two cores or more)."""
    import adaclip.data.loading as loading
    import adaclip.evaluate as evaluate_module

    seen = []
    real = evaluate_module.loader_options
    monkeypatch.setattr(evaluate_module, "loader_options", lambda workers, device: seen.append(workers) or real(workers, device))
    model = _tiny()
    evaluate(model, visa, ROOT, EvalCfg(batch_size=4), progress=False)
    monkeypatch.setattr(loading, "MIN_WORK_S", 0.0)
    evaluate(model, visa, ROOT, EvalCfg(batch_size=4), progress=False)
    assert seen == [0, resolve_workers(None, -(-len(visa) // 4))]


def test_writer_thread_errors_reach_the_caller(visa, tmp_path, monkeypatch):
    """Maps are saved by a thread beside the loop: a failure there is the evaluation's failure."""
    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(OSError, match="disk full"):
        evaluate(_tiny(), visa, ROOT, EvalCfg(batch_size=2, num_workers=0, save_maps=True), run_dir=tmp_path,
                 progress=False)


def _epochs(dataset, workers, epochs=3, batch_size=3):
    loader = training_loader(dataset, batch_size, seed=5, num_workers=workers, device=torch.device("cpu"))
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.append([(b["index"].tolist(), b["image"], b["mask"], b["label"].tolist()) for b in loader])
    return out


def _same(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb)
        for (ia, xa, ma, la), (ib, xb, mb, lb) in zip(ea, eb):
            assert ia == ib and la == lb and torch.equal(xa, xb) and torch.equal(ma, mb)


def test_training_batches_do_not_depend_on_workers(visa):
    """Persistent workers, a new order each epoch, the mosaic's draws from (seed, epoch, index):
    0 and 2 workers give the same batches, epoch by epoch."""
    model = _tiny()
    make = lambda: AnomalyDataset(visa, ROOT, model.transform, model.image_size, aug_rate=0.5, seed=5)  # noqa: E731
    plain, workers = _epochs(make(), 0), _epochs(make(), 2)
    _same(plain, workers)
    assert [i for b in plain[0] for i in b[0]] != [i for b in plain[1] for i in b[0]]     # reshuffled
    images = [{i: x for idx, xs, _, _ in epoch for i, x in zip(idx, xs)} for epoch in plain]
    assert any(not torch.equal(images[0][i], images[1][i]) for i in images[0])         # new draws each epoch


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_images_equal_a_fresh_decode(visa, tmp_path, mode):
    """Epochs after the first read the cache (with workers filling a shared one): the same tensors
    as decoding afresh; a file changed on disk is decoded again."""
    model = _tiny()
    df = visa.copy()
    for col in ("image", "mask"):                                   # a private copy of the files to touch
        for rel in df[col][df[col] != ""]:
            (tmp_path / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / rel).write_bytes((ROOT / rel).read_bytes())
    root = tmp_path / "data"
    fresh = AnomalyDataset(df, root, model.transform, model.image_size)
    cache = ImageCache(mode, len(df), model.image_size, budget_mb=64, directory=tmp_path / "cache", shared=True)
    cached = AnomalyDataset(df, root, model.transform, model.image_size, cache=cache)
    _same(_epochs(fresh, 0, epochs=2), _epochs(cached, 2, epochs=2))
    hits = [cached.cache.get(i, _key(root, df, i, model.image_size)) is not None for i in range(len(df))]
    assert all(hits)                                                # every image was cached by the workers
    if mode == "disk":
        assert len(list((tmp_path / "cache").rglob("*.npz"))) == len(df)
    # a changed image: the cache no longer answers for it
    target = root / df.image[0]
    from PIL import Image
    Image.new("RGB", Image.open(target).size, (255, 0, 0)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    assert torch.equal(cached[0]["image"], fresh[0]["image"])
    assert torch.allclose(cached[0]["image"][0], cached[0]["image"][0].max())          # all red now


def _key(root, df, i, size):
    from adaclip.data.cache import file_key
    return file_key(root, df.iloc[i], size)


def test_memory_cache_keeps_to_its_budget(visa):
    model = _tiny()
    per = model.image_size ** 2 * 4
    cache = ImageCache("memory", len(visa), model.image_size, budget_mb=3 * per / 2 ** 20)
    assert cache.slots == 3
    data = AnomalyDataset(visa, ROOT, model.transform, model.image_size, cache=cache)
    first = [data[i]["image"] for i in range(len(visa))]
    assert int(cache.filled.sum()) == 3
    assert all(torch.equal(a, data[i]["image"]) for i, a in enumerate(first))


def test_cflow_from_the_writer_thread_equals_direct(visa):
    """The cflow AUPRO fed by the writer thread (host copies of the device maps, each image's region
    weights from the workers) equals feeding the very same maps directly, image by image (compared on
    identical maps: a 200-threshold metric may jump when a map moves by float rounding, and a batch
    of 4 and a single image round differently on some CPUs)."""
    model = _tiny()
    seen = {}
    forward = model.forward

    def spy(images, names, **kw):                                   # what evaluate's loop got, per image
        out = forward(images, names, **kw)
        for name, m in zip(names, out.pixel_scores):
            seen.setdefault(name, []).append(m.clamp(0, 1).numpy().copy())
        return out

    model.forward = spy
    result = evaluate(model, visa, ROOT, EvalCfg(batch_size=4, num_workers=0), progress=False)
    dataset = AnomalyDataset(visa, ROOT, model.transform, model.image_size)
    direct, maps = {}, {name: iter(m) for name, m in seen.items()}
    for i in range(len(dataset)):
        item = dataset[i]
        anomaly_map = next(maps[item["class_name"]])
        if item["has_mask"]:
            direct.setdefault((visa.dataset[i], visa.category[i]), CflowAupro()).update(anomaly_map, item["mask"].numpy())
    m = result.metrics.set_index(["dataset", "category"])
    assert len(direct) == 2
    for key, acc in direct.items():
        th = acc.thresholds(acc.extent())
        value, _ = acc.compute(th, *acc.counts(th))
        assert np.isfinite(value) and m.loc[key, "pixel_aupro_cflow"] == value, key


def test_cached_strips_of_one_image_stay_apart(tmp_path):
    """KolektorSDD's thirds: three rows of one file with different crops. Each cached entry is its own
    strip (the key holds the crop), in the disk cache shared across rows and runs."""
    import pandas as pd

    rel = "mvtec/bottle/test/good/000.png"
    w, h = __import__("PIL.Image", fromlist=["Image"]).open(ROOT / rel).size
    df = pd.DataFrame({"dataset": "ksdd", "category": "strip", "split": "test", "label": 0, "mask": "", "image": rel,
                       "crop": [f"0,{k * h // 3},{w},{(k + 1) * h // 3}" for k in range(3)]})
    model = _tiny()
    fresh = AnomalyDataset(df, ROOT, model.transform, model.image_size)
    cache = ImageCache("disk", len(df), model.image_size, directory=tmp_path / "cache")
    cached = AnomalyDataset(df, ROOT, model.transform, model.image_size, cache=cache)
    first = [cached[i]["image"] for i in range(3)]                  # fills the cache
    for i in range(3):
        assert torch.equal(cached[i]["image"], fresh[i]["image"]) and torch.equal(first[i], fresh[i]["image"]), i
    assert not torch.equal(fresh[0]["image"], fresh[1]["image"])
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 3


def test_deferred_range_check_sees_every_batch(monkeypatch):
    """On an accelerator the [0, 1] check waits until the state is read: an out-of-range map in an
    early batch still fails then, however many good batches follow."""
    masks, maps = _masks()
    monkeypatch.setattr(PixelAccumulator, "_update_host", PixelAccumulator._update_device)
    for bad in (1.5, -0.5, float("nan")):
        acc = PixelAccumulator(bins=4096)
        first = maps[:2].copy()
        first[0, 1, 1] = bad
        acc.update(torch.from_numpy(first), torch.from_numpy(masks[:2]))
        acc.update(torch.from_numpy(maps[2:]), torch.from_numpy(masks[2:]))
        with pytest.raises(ValueError, match="in \\[0, 1\\]"):
            acc.compute()


def test_train_config_defaults_use_workers_and_the_cache():
    cfg = TrainCfg()
    assert cfg.num_workers is None and cfg.image_cache == "memory" and EvalCfg().num_workers is None
    with pytest.raises(ValueError, match="image_cache"):
        TrainCfg(image_cache="ram")
