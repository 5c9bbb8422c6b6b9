"""Every adapter on real files (../shared/datasets) or on fixture trees in the official layout."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from adaclip.data import ADAPTERS, build_manifest, check, counts, read_manifest
from adaclip.data.adapters.common import LayoutError
from adaclip.data.registry import COMMITTED, MANIFEST_DIR, resolve_root

SHARED = resolve_root("shared")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets not present")


def img(path: Path, size=(20, 16), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128 if mode in ("L", "I;16") else (120, 80, 40)).save(path, format=fmt)
    return path


def mask(path: Path, size=(20, 16), on=True, value=255):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros(size[::-1], np.uint8)
    if on:
        a[4:8, 5:10] = value
    Image.fromarray(a).save(path)
    return path


# ---------------------------------------------------------------- real data
@needs_shared
def test_mvtec_real():
    df = build_manifest("mvtec", SHARED)
    check(df, SHARED, deep=False)
    c = counts(df).set_index(["category", "split", "label"])["images"]
    assert c[("bottle", "test", 0)] == 20 and c[("bottle", "test", 1)] == 63 and c[("bottle", "train", 0)] == 16
    assert c[("toothbrush", "test", 1)] == 30
    row = df[df.image.str.endswith("bottle/test/broken_large/000.png")].iloc[0]
    assert row["mask"] == "mvtec/bottle/ground_truth/broken_large/000_mask.png" and row.defect_type == "broken_large"
    assert (df[df.label == 0]["mask"] == "").all()


@needs_shared
def test_visa_real_uses_official_split():
    df = build_manifest("visa", SHARED)
    check(df, SHARED, deep=False)
    c = counts(df).set_index(["category", "split", "label"])["images"]
    assert c[("capsules", "test", 0)] == 60 and c[("capsules", "test", 1)] == 100
    assert c[("macaroni1", "test", 0)] == 100 and c[("macaroni1", "train", 0)] == 16
    assert df.image.str.endswith(".JPG").all()       # VisA's upper-case extension


@needs_shared
def test_glass_real_single_category_folder():
    df = build_manifest("glass", SHARED)
    check(df, SHARED, deep=False)
    assert set(df.category) == {"glass"} and (df.label == 1).sum() == 80 and (df.label == 0).sum() == 18


@needs_shared
def test_headct_real_image_level_only():
    df = build_manifest("headct", SHARED)
    check(df, SHARED, deep=False)
    assert len(df) == 200 and (df.label == 1).sum() == 100 and (df["mask"] == "").all()


@needs_shared
def test_kvasir_real_all_anomalous_with_jpeg_masks():
    df = build_manifest("kvasir", SHARED, folder="kvasir_mini")
    check(df, SHARED, deep=False)
    assert len(df) == 22 and (df.label == 1).all() and df["mask"].str.endswith(".jpg").all()


@needs_shared
@pytest.mark.parametrize("rel", [k for k in COMMITTED])
def test_committed_manifests_match_adapters(rel):
    adapter, root_name, folder = COMMITTED[rel]
    root = resolve_root(root_name)
    if not (root / folder).exists():
        pytest.skip(f"{root / folder} not present")
    committed = read_manifest(MANIFEST_DIR / rel)
    fresh = build_manifest(adapter, root, folder=folder)
    pd.testing.assert_frame_equal(committed.reset_index(drop=True), fresh.reset_index(drop=True),
                                  check_dtype=False, obj=f"{rel} (run `make manifests`)")


# ---------------------------------------------------------------- fixture trees
def test_mpdd_and_dtd_mvtec_layout(tmp_path):
    for cat in ("bracket_black", "Woven_001"):
        img(tmp_path / "mpdd" / cat / "train/good/000.png")
        img(tmp_path / "mpdd" / cat / "test/good/000.png")
        img(tmp_path / "mpdd" / cat / "test/bad/001.png")
        mask(tmp_path / "mpdd" / cat / "ground_truth/bad/001_mask.png")
    df = build_manifest("mpdd", tmp_path)
    check(df, tmp_path)
    assert len(df) == 6 and set(df.category) == {"bracket_black", "Woven_001"}
    assert df[df.label == 1]["mask"].str.endswith("001_mask.png").all()


def test_btad_ok_ko_and_bmp_masks_without_suffix(tmp_path):
    img(tmp_path / "btad/01/train/ok/0000.bmp", fmt="BMP")
    img(tmp_path / "btad/01/test/ok/0001.bmp", fmt="BMP")
    img(tmp_path / "btad/01/test/ko/0002.bmp", fmt="BMP")
    mask(tmp_path / "btad/01/ground_truth/ko/0002.png")
    img(tmp_path / "btad/03/test/ko/0003.bmp", fmt="BMP")
    mask(tmp_path / "btad/03/ground_truth/ko/0003.bmp")
    df = build_manifest("btad", tmp_path)
    check(df, tmp_path)
    assert df.set_index("image").label.to_dict() == {
        "btad/01/test/ko/0002.bmp": 1, "btad/01/test/ok/0001.bmp": 0, "btad/01/train/ok/0000.bmp": 0,
        "btad/03/test/ko/0003.bmp": 1}
    assert df[df.label == 1]["mask"].tolist() == ["btad/01/ground_truth/ko/0002.png", "btad/03/ground_truth/ko/0003.bmp"]


def test_ksdd_labels_from_masks(tmp_path):
    img(tmp_path / "ksdd/kos01/Part0.jpg", fmt="JPEG")
    mask(tmp_path / "ksdd/kos01/Part0_label.bmp", on=False)
    img(tmp_path / "ksdd/kos01/Part1.jpg", fmt="JPEG")
    mask(tmp_path / "ksdd/kos01/Part1_label.bmp", on=True)
    df = build_manifest("ksdd", tmp_path)
    check(df, tmp_path)
    assert df.label.tolist() == [0, 1] and set(df.category) == {"SDD"}


def test_dagm_uppercase_png_and_label_folder(tmp_path):
    img(tmp_path / "dagm/Class1/Train/0001.PNG", fmt="PNG")
    img(tmp_path / "dagm/Class1/Train/0002.PNG", fmt="PNG")
    mask(tmp_path / "dagm/Class1/Train/Label/0002_label.PNG")
    img(tmp_path / "dagm/Class2/Test/0003.PNG", fmt="PNG")
    df = build_manifest("dagm", tmp_path)
    check(df, tmp_path)
    assert df[["category", "split", "label"]].values.tolist() == [["Class1", "train", 0], ["Class1", "train", 1],
                                                                  ["Class2", "test", 0]]


@pytest.mark.parametrize("dataset, category", [("brainmri", "brain_mri"), ("br35h", "br35h")])
def test_no_yes_folders(tmp_path, dataset, category):
    img(tmp_path / dataset / "no/1 no.jpeg", fmt="JPEG")
    img(tmp_path / dataset / "yes/Y1.JPG", fmt="JPEG")
    img(tmp_path / dataset / "pred/pred0.jpg", fmt="JPEG")     # Br35H's unlabelled folder is ignored
    df = build_manifest(dataset, tmp_path)
    check(df, tmp_path)
    assert df.label.tolist() == [0, 1] and set(df.category) == {category} and (df["mask"] == "").all()


def test_isic_segmentation_suffix(tmp_path):
    img(tmp_path / "isic/ISBI2016_ISIC_Part1_Test_Data/ISIC_0000003.jpg", fmt="JPEG")
    mask(tmp_path / "isic/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png")
    df = build_manifest("isic", tmp_path)
    check(df, tmp_path)
    assert df.iloc[0]["mask"].endswith("ISIC_0000003_Segmentation.png") and df.iloc[0].split == "test"


def test_colondb_clinicdb_tn3k(tmp_path):
    img(tmp_path / "colondb/images/1.png")
    mask(tmp_path / "colondb/masks/1.png")
    img(tmp_path / "clinicdb/PNG/Original/1.png")
    mask(tmp_path / "clinicdb/PNG/Ground Truth/1.png")
    img(tmp_path / "tn3k/trainval-image/0000.jpg", fmt="JPEG")
    mask(tmp_path / "tn3k/trainval-mask/0000.jpg")
    img(tmp_path / "tn3k/test-image/0001.jpg", fmt="JPEG")
    mask(tmp_path / "tn3k/test-mask/0001.jpg")
    for name, n in (("colondb", 1), ("clinicdb", 1), ("tn3k", 2)):
        df = build_manifest(name, tmp_path)
        check(df, tmp_path)
        assert len(df) == n and (df.label == 1).all()
    assert build_manifest("tn3k", tmp_path).split.tolist() == ["test", "train"]


def test_generic_folder_for_your_own_products(tmp_path):
    root = tmp_path / "my_widgets"
    img(root / "good/a.png")
    img(root / "good/b.png")
    img(root / "scratch/c.png")
    mask(root / "ground_truth/scratch/c_mask.png")
    img(root / "dent/d.png")                  # no mask: image-level label only
    df = build_manifest("folder", tmp_path, folder="my_widgets")
    assert set(df.dataset) == {"my_widgets"} and set(df.category) == {"my_widgets"}
    assert df.set_index("image")["mask"].to_dict()["my_widgets/scratch/c.png"] == "my_widgets/ground_truth/scratch/c_mask.png"
    assert df.label.sum() == 2


def test_wrong_layout_says_what_is_expected(tmp_path):
    (tmp_path / "mvtec").mkdir()
    with pytest.raises(LayoutError, match="MVTec AD layout"):
        build_manifest("mvtec", tmp_path)
    (tmp_path / "visa").mkdir()
    with pytest.raises(LayoutError, match="1cls.csv"):
        build_manifest("visa", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_manifest("imagenet", tmp_path)


def test_every_adapter_is_tested():
    tested = {"mvtec", "visa", "glass", "headct", "kvasir", "mpdd", "dtd", "btad", "ksdd", "dagm", "brainmri",
              "br35h", "isic", "colondb", "clinicdb", "tn3k", "folder", "synthetic"}
    assert set(ADAPTERS) <= tested
