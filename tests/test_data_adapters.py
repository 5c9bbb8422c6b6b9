"""Every adapter on real files (../shared/datasets) or on fixture trees in the official layout."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from adaclip.data import ADAPTERS, AnomalyDataset, build_manifest, check, counts, read_manifest, write_manifest
from adaclip.data.adapters.common import LayoutError
from adaclip.data.registry import COMMITTED, MANIFEST_DIR, resolve_root

SHARED = resolve_root("shared")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets not present")
EXERCISED: set = set()      # adapters that returned rows in this module's tests


@pytest.fixture(autouse=True)
def record_adapters(monkeypatch):
    """Wrap every registered adapter so that test_every_adapter_is_tested sees which ones ran."""
    for name, (fn, folder) in list(ADAPTERS.items()):
        def recording(*args, _fn=fn, _name=name, **kwargs):
            rows = _fn(*args, **kwargs)
            if rows:
                EXERCISED.add(_name)
            return rows
        monkeypatch.setitem(ADAPTERS, name, (recording, folder))


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
def mvtec_tree(folder: Path, categories, train="000", good="000", bad="001"):
    """An MVTec-layout tree: per category train/good, test/good, test/bad with its _mask.png."""
    for cat in categories:
        img(folder / cat / f"train/good/{train}.png")
        img(folder / cat / f"test/good/{good}.png")
        img(folder / cat / f"test/bad/{bad}.png")
        mask(folder / cat / f"ground_truth/bad/{bad}_mask.png")


def test_mpdd_mvtec_layout(tmp_path):
    mvtec_tree(tmp_path / "mpdd", ("bracket_black", "metal_plate"))
    df = build_manifest("mpdd", tmp_path)
    check(df, tmp_path)
    assert len(df) == 6 and set(df.category) == {"bracket_black", "metal_plate"}
    assert df[df.label == 1]["mask"].str.endswith("001_mask.png").all()


def test_dtd_synthetic_layout(tmp_path):
    """DTD-Synthetic: Woven_NNN categories, test/bad with ground_truth/bad/NNN_mask.png, train/good."""
    mvtec_tree(tmp_path / "dtd", ("Woven_001", "Blotchy_099"), good="010", bad="011")
    df = build_manifest("dtd", tmp_path)
    check(df, tmp_path)
    assert set(df.dataset) == {"dtd"} and set(df.category) == {"Woven_001", "Blotchy_099"}
    woven = df[df.category == "Woven_001"].set_index("image")
    assert woven.label.to_dict() == {"dtd/Woven_001/test/bad/011.png": 1, "dtd/Woven_001/test/good/010.png": 0,
                                     "dtd/Woven_001/train/good/000.png": 0}
    assert woven.loc["dtd/Woven_001/test/bad/011.png", "mask"] == "dtd/Woven_001/ground_truth/bad/011_mask.png"
    assert woven.loc["dtd/Woven_001/test/bad/011.png", "defect_type"] == "bad"


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
    assert "crop" not in df.columns                   # whole images stay the default


def _ksdd_tall(tmp_path, n_images=4):
    """KolektorSDD-like tall images (20 wide, 31 high), each a distinct grey; Part1's defect sits in
    rows 12..14 (the middle third), Part3's in rows 28..30 (the bottom third)."""
    for k in range(n_images):
        a = np.full((31, 20, 3), 10 + 40 * k, np.uint8)
        a[:, :, 1] = np.arange(31, dtype=np.uint8)[:, None]          # rows tell where a strip came from
        path = tmp_path / f"ksdd/kos01/Part{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path.with_suffix(".png"))           # lossless, so pixels can be compared
        path.with_suffix(".png").rename(path.with_suffix(".jpg"))
        m = np.zeros((31, 20), np.uint8)
        if k == 1:
            m[12:15, 3:9] = 255
        if k == 3:
            m[28:31, 3:9] = 255
        Image.fromarray(m).save(tmp_path / f"ksdd/kos01/Part{k}_label.bmp")


def test_ksdd_strips_cut_as_the_reference(tmp_path):
    _ksdd_tall(tmp_path)
    df = build_manifest("ksdd", tmp_path, strips=3)
    check(df, tmp_path)
    assert len(df) == 12 and (df.groupby("image").size() == 3).all()
    # rows [0, 10), [10, 20), [20, 31): H // 3 and 2H // 3 as in data_preprocess/sdd-pre.py
    part1 = df[df.image == "ksdd/kos01/Part1.jpg"].sort_values("crop")
    assert sorted(df.crop.unique()) == ["0,0,20,10", "0,10,20,20", "0,20,20,31"]
    assert dict(zip(part1.crop, part1.label)) == {"0,0,20,10": 0, "0,10,20,20": 1, "0,20,20,31": 0}
    assert df.set_index(["image", "crop"]).label[("ksdd/kos01/Part3.jpg", "0,20,20,31")] == 1
    assert df.label.sum() == 2 and (df[df.label == 1].split == "test").all()
    normal = df[df.label == 0]
    assert (normal.split == "train").sum() == 7 and (normal.split == "test").sum() == 3   # 75 / 25, sklearn
    # the loader cuts image and mask alike; the manifest round-trips with its crop column
    item = AnomalyDataset(df, tmp_path, lambda im: np.asarray(im), 8)
    i = int(np.flatnonzero((df.image == "ksdd/kos01/Part1.jpg") & (df.crop == "0,10,20,20"))[0])
    image, mask = item._load(i)                           # before the resize to the model's size
    pixels = np.asarray(image)
    assert pixels.shape == (10, 20, 3) and pixels[0, 0, 1] == 10 and pixels[-1, 0, 1] == 19 and mask.shape == (10, 20)
    assert item[i]["image"].shape == (8, 8, 3)
    assert item[i]["label"] == 1 and item[i]["mask"].sum() > 0
    write_manifest(df, tmp_path / "ksdd.csv")
    again = read_manifest(tmp_path / "ksdd.csv")
    pd.testing.assert_frame_equal(df, again, check_dtype=False)
    with pytest.raises(ValueError, match="positive integer"):
        build_manifest("ksdd", tmp_path, strips=0)


def test_crop_outside_the_image_is_named(tmp_path):
    _ksdd_tall(tmp_path, 1)
    df = build_manifest("ksdd", tmp_path, strips=3)
    df.loc[0, "crop"] = "0,0,20,99"
    with pytest.raises(Exception, match=r"row 2.*crop 0,0,20,99 lies outside image ksdd/kos01/Part0.jpg"):
        check(df, tmp_path)


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


def test_headct_flat_and_kaggle_nested_layouts(tmp_path):
    """Kaggle's zip unpacks to labels.csv beside head_ct/head_ct/NNN.png; subsets keep it flat."""
    for layout, sub in (("flat", "head_ct"), ("nested", "head_ct/head_ct")):
        base = tmp_path / layout / "headct"
        img(base / sub / "000.png")
        img(base / sub / "001.png")
        base.joinpath("labels.csv").write_text("id, hemorrhage\n0,0\n1,1\n2,1\n")   # 002 not in this copy
        df = build_manifest("headct", tmp_path / layout)
        check(df, tmp_path / layout)
        assert df.image.tolist() == [f"headct/{sub}/000.png", f"headct/{sub}/001.png"], layout
        assert df.label.tolist() == [0, 1] and (df["mask"] == "").all()


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


def test_synthetic_layout(tmp_path):
    from adaclip.data.synthetic import make_synthetic
    make_synthetic(tmp_path / "synthetic", categories=("stripes",), n_good=2, n_defect=2, size=32, seed=0)
    df = build_manifest("synthetic", tmp_path)
    check(df, tmp_path)
    assert set(df.category) == {"stripes"} and df.label.sum() == 2 and (df[df.label == 1]["mask"] != "").all()


@pytest.mark.parametrize("name", ["mvtec", "visa", "glass", "headct", "kvasir"])
def test_embedded_sample_layouts(name):
    """The embedded sample keeps the official layouts (the real-data tests above need ../shared)."""
    root = resolve_root("sample")
    df = build_manifest(name, root)
    check(df, root, deep=False)
    assert len(df) and set(df.label) <= {0, 1}


def test_every_adapter_is_tested(request):
    """Runs last in this module: every registered adapter must have produced rows in a test above."""
    selected = {i.originalname for i in request.session.items if i.module is request.module}
    defined = {n for n in dir(request.module) if n.startswith("test_")}
    if selected != defined:
        pytest.skip("only part of this module was selected; the check needs all its tests")
    missing = sorted(set(ADAPTERS) - EXERCISED)
    assert not missing, f"adapters no test builds a manifest with: {missing}"
