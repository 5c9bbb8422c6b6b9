"""Images, masks, manifests and the Dataset: real-world formats and every bad-input case."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from adaclip import BackboneCfg, build_transform
from adaclip.data import (AnomalyDataset, ManifestError, build_manifest, check, check_disjoint, load_image,
                          load_mask, make_manifest, read_manifest, validate, write_manifest)
from adaclip.data.images import ImageError
from adaclip.data.registry import resolve_root

TRANSFORM = build_transform(BackboneCfg(name="adaclip-tiny", pretrained=None, image_size=32))


def save(a, path, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode=mode).save(path, **kw) if mode else Image.fromarray(a).save(path, **kw)
    return path


@pytest.mark.parametrize("make", [
    lambda: Image.new("L", (8, 6), 100),
    lambda: Image.new("RGBA", (8, 6), (10, 20, 30, 255)),
    lambda: Image.new("P", (8, 6), 3),
    lambda: Image.fromarray(np.full((6, 8), 4000, np.uint16)),
])
def test_images_become_8bit_rgb(tmp_path, make):
    path = tmp_path / "x.png"
    make().save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (8, 6)
    assert np.asarray(im).dtype == np.uint8


def test_16bit_is_scaled_not_clipped(tmp_path):
    a = np.zeros((4, 4), np.uint16)
    a[0, 0] = 60000
    a[1, 1] = 30000
    Image.fromarray(a).save(tmp_path / "x.png")
    got = np.asarray(load_image(tmp_path / "x.png"))[..., 0]
    assert got[0, 0] == 255 and 120 <= got[1, 1] <= 130 and got[2, 2] == 0


def test_masks_of_every_kind_binarise(tmp_path):
    base = np.zeros((10, 10), np.uint8)
    base[2:5, 2:5] = 1
    save(base, tmp_path / "01.png")                              # VisA: 0/1
    save(base * 255, tmp_path / "0255.png")                      # MVTec: 0/255
    save(base * 3, tmp_path / "ids.png")                         # instance ids
    save(np.stack([base * 255] * 3, -1), tmp_path / "rgb.png")   # GLASS: 3-channel
    for name in ("01", "0255", "ids", "rgb"):
        np.testing.assert_array_equal(load_mask(tmp_path / f"{name}.png"), base)
    noisy = (base * 255).astype(np.int16) + np.random.default_rng(0).integers(-30, 30, base.shape)
    save(noisy.clip(0, 255).astype(np.uint8), tmp_path / "k.jpg", quality=60)   # Kvasir: JPEG
    np.testing.assert_array_equal(load_mask(tmp_path / "k.jpg"), base)


@pytest.mark.parametrize("content, match", [(None, "does not exist"), (b"", "is empty"),
                                            (b"\x89PNG\r\n\x1a\n garbage", "cannot be decoded")])
def test_bad_files_are_named(tmp_path, content, match):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=match) as err:
        load_image(path)
    assert "bad.png" in str(err.value)


def _tree(tmp_path):
    good = np.full((16, 16, 3), 100, np.uint8)
    save(good, tmp_path / "d/test/good/0.png")
    save(good, tmp_path / "d/test/bad/1.png")
    m = np.zeros((16, 16), np.uint8)
    m[3:9, 3:9] = 255
    save(m, tmp_path / "d/ground_truth/bad/1_mask.png")
    return make_manifest([
        dict(dataset="d", category="widget", split="test", label=0, image="d/test/good/0.png", mask="", defect_type=""),
        dict(dataset="d", category="widget", split="test", label=1, image="d/test/bad/1.png",
             mask="d/ground_truth/bad/1_mask.png", defect_type="bad")])


def test_dataset_items(tmp_path):
    df = _tree(tmp_path)                       # sorted by image path: row 0 is the anomalous one
    ds = AnomalyDataset(df, tmp_path, TRANSFORM, 32)
    assert df.label.tolist() == [1, 0]
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["label"] == 1 and item["class_name"] == "widget" and item["has_mask"]
    assert ds[1]["mask"].sum() == 0 and ds[1]["has_mask"]      # normal image of a pixel-annotated set


def test_mosaic_augmentation(tmp_path):
    """When it fires: a 2x2 mosaic of the item's own image (top left) and three other images of its
    category, masks tiled the same way, labelled anomalous if any tile is; never across categories."""
    colours, rows = {}, []
    for k in range(5):
        category = "widget" if k < 4 else "other"
        a = np.full((16, 16, 3), 40 * k + 20, np.uint8)
        save(a, tmp_path / f"d/{k}.png")
        m = np.zeros((16, 16), np.uint8)
        if k in (1, 2):
            m[0:8, 0:8] = 255                                       # top-left quarter of tiles 1 and 2
            save(m, tmp_path / f"d/{k}_mask.png")
        colours[40 * k + 20] = k
        rows.append(dict(dataset="d", category=category, split="test", label=int(k in (1, 2)), image=f"d/{k}.png",
                         mask=f"d/{k}_mask.png" if k in (1, 2) else "", defect_type="bad" if k in (1, 2) else ""))
    df = make_manifest(rows)
    identity = lambda im: torch.from_numpy(np.asarray(im).copy())    # noqa: E731  (pixels, no normalisation)
    plain = AnomalyDataset(df, tmp_path, identity, 32, aug_rate=0.0)
    mosaic = AnomalyDataset(df, tmp_path, identity, 32, aug_rate=1.0)
    i = int(np.flatnonzero(df.image == "d/0.png")[0])
    assert plain[i]["image"].shape == (32, 32, 3) and len(set(plain[i]["image"][..., 0].flatten().tolist())) == 1
    seen = set()
    for epoch in range(6):
        item = mosaic[(epoch, i)]                                   # the draws depend on (seed, epoch, index)
        assert item["label"] == mosaic[(epoch, i)]["label"] and torch.equal(item["image"], mosaic[(epoch, i)]["image"])
        img, mask = item["image"][..., 0].numpy(), item["mask"].numpy()
        tiles = [colours[int(img[y, x])] for y, x in ((0, 0), (0, 16), (16, 0), (16, 16))]
        assert tiles[0] == 0 and len(set(tiles)) == 4 and 4 not in tiles      # itself first, same category only
        for t, (y, x) in zip(tiles, ((0, 0), (0, 16), (16, 0), (16, 16))):
            assert (img[y:y + 16, x:x + 16] == 40 * t + 20).all()
            quarter = mask[y:y + 8, x:x + 8]
            assert quarter.all() if t in (1, 2) else not quarter.any()
            assert not mask[y + 8:y + 16, x:x + 16].any() and not mask[y:y + 16, x + 8:x + 16].any()
        assert item["label"] == 1                                    # tiles 1 and 2 are always among the three
        seen.add(tuple(tiles))
    assert len(seen) > 1                                             # the other tiles are drawn at random


def test_image_level_dataset_has_no_masks(tmp_path):
    save(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.png")
    save(np.zeros((8, 8, 3), np.uint8), tmp_path / "b.png")
    df = make_manifest([dict(dataset="ct", category="headct", split="test", label=l, image=p, mask="", defect_type="")
                        for l, p in ((0, "a.png"), (1, "b.png"))])
    ds = AnomalyDataset(df, tmp_path, TRANSFORM, 32)
    assert not ds[0]["has_mask"] and not ds[1]["has_mask"]


def test_mask_size_mismatch_stops_with_row(tmp_path):
    df = _tree(tmp_path)
    save(np.zeros((5, 5), np.uint8), tmp_path / "d/ground_truth/bad/1_mask.png")
    with pytest.raises(ManifestError, match=r"row 2.*1_mask.png is 5x5"):
        AnomalyDataset(df, tmp_path, TRANSFORM, 32)[0]
    assert any("must match" in p for p in validate(df, tmp_path))


def test_validate_reports_every_problem_at_once(tmp_path):
    df = _tree(tmp_path)
    extra = pd.DataFrame([
        dict(dataset="d", category="widget", split="test", label=1, image="d/missing.png", mask="", defect_type=""),
        dict(dataset="d", category="widget", split="test", label=0, image="d/empty.png", mask="", defect_type=""),
        dict(dataset="d", category="widget", split="test", label=0, image="d/corrupt.png", mask="", defect_type=""),
    ])
    (tmp_path / "d/empty.png").write_bytes(b"")
    (tmp_path / "d/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    df = pd.concat([df, extra], ignore_index=True)
    problems = validate(df, tmp_path)
    text = "\n".join(problems)
    assert "missing.png does not exist" in text and "empty.png is empty" in text and "corrupt.png cannot be decoded" in text
    assert "has no mask although dataset d is pixel-annotated" in text
    with pytest.raises(ManifestError, match="4 problem"):
        check(df, tmp_path)


def test_bad_label_row_is_named(tmp_path):
    path = tmp_path / "m.csv"
    write_manifest(_tree(tmp_path), path)
    text = path.read_text().replace(",1,d/test/bad", ",yes,d/test/bad")
    path.write_text(text)
    with pytest.raises(ManifestError, match=r"m.csv.*row 2: label 'yes'"):
        read_manifest(path)


def test_missing_columns_and_absolute_paths(tmp_path):
    (tmp_path / "a.csv").write_text("image,label\nx.png,0\n")
    with pytest.raises(ManifestError, match="lacks column"):
        read_manifest(tmp_path / "a.csv")
    df = _tree(tmp_path)
    df.loc[0, "image"] = str(tmp_path / "d/test/good/0.png")
    write_manifest(df, tmp_path / "b.csv")
    with pytest.raises(ManifestError, match="relative to the data root"):
        read_manifest(tmp_path / "b.csv")


def test_manifest_round_trip(tmp_path):
    df = _tree(tmp_path)
    write_manifest(df, tmp_path / "m.csv")
    again = read_manifest(tmp_path / "m.csv")
    pd.testing.assert_frame_equal(df, again, check_dtype=False)


def test_train_test_overlap_refused(tmp_path):
    df = _tree(tmp_path)
    with pytest.raises(ManifestError, match="zero-shot"):
        check_disjoint(df, df.iloc[:1])
    check_disjoint(df, df.iloc[:1], allow_overlap=True)
    check_disjoint(df.iloc[:1], df.iloc[1:])


def test_sample_manifests_load_through_the_dataset():
    root = resolve_root("sample")
    for name in ("mvtec", "visa", "glass", "headct", "kvasir"):
        df = build_manifest(name, root)
        check(df, root)
        item = AnomalyDataset(df, root, TRANSFORM, 32)[len(df) - 1]
        assert item["image"].shape == (3, 32, 32)


def test_validate_survives_bad_labels_and_keeps_row_order(tmp_path):
    df = _tree(tmp_path)
    df["label"] = df["label"].astype(object)
    df.loc[1, "label"] = "yes"
    df.loc[0, "image"] = "d/nowhere.png"
    problems = validate(df, tmp_path)
    assert problems[0].startswith("manifest row 2: image") and problems[1].startswith("manifest row 3: label 'yes'")


def test_distributed_epoch_order_follows_the_run_seed():
    """Under torchrun each rank's order is DistributedSampler's for (seed + epoch): rank r takes every
    world-th index of the seeded permutation, the ranks' shards cover the data, and another seed gives
    another order (a sampler left at its default seed would ignore the run's)."""
    from adaclip.data.loading import EpochSampler

    def orders(seed, epoch):
        out = []
        for rank in range(2):
            sampler = EpochSampler(16, seed, shard=(rank, 2))
            sampler.set_epoch(epoch)
            out.append([i for e, i in sampler if e == epoch])
        return out

    for epoch in range(3):
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert orders(7, epoch) == [perm[0::2], perm[1::2]]
        assert sorted(sum(orders(7, epoch), [])) == list(range(16))
    assert orders(7, 0) != orders(8, 0)


def test_training_loader_under_torchrun_shards_each_epoch_anew(monkeypatch):
    """Training's persistent loader takes torchrun's rank and world size: per epoch the ranks' shards are
    disjoint and cover the data, and both the order and the shards change from epoch to epoch."""
    from adaclip import distributed
    from adaclip.config import TrainCfg
    from adaclip.train import _loader

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, k):
            return k[1]                                        # (epoch, index)

    cfg = TrainCfg(batch_size=2, seed=7, num_workers=0)
    orders = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "active", lambda: True)
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        loaders = {}
        orders.append([[i for b in _loader(Items(), cfg, e, cfg.batch_size, loaders=loaders) for i in b.tolist()]
                       for e in range(4)])
    for epoch in range(4):
        mine, theirs = orders[0][epoch], orders[1][epoch]
        assert len(mine) == len(theirs) == 8 and sorted(mine + theirs) == list(range(16))
    for rank in (0, 1):
        assert len({tuple(o) for o in orders[rank]}) == 4 and len({tuple(sorted(o)) for o in orders[rank]}) > 1
