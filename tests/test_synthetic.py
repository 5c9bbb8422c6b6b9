import numpy as np

from adaclip.data import build_manifest, check, load_mask
from adaclip.data.synthetic import add_defect, make_synthetic, texture


def test_defect_mask_is_exact():
    rng = np.random.default_rng(0)
    base = texture(rng, "stripes", 64)
    img, mask = add_defect(rng, base.copy(), "blob")
    changed = np.any(img != base, axis=-1)
    assert mask.sum() > 20
    assert np.array_equal(changed, mask.astype(bool))


def test_seeded_and_read_by_the_mvtec_adapter(tmp_path):
    a = make_synthetic(tmp_path / "a" / "synthetic", n_good=3, n_defect=3, seed=1)
    b = make_synthetic(tmp_path / "b" / "synthetic", n_good=3, n_defect=3, seed=1)
    pa, pb = a / "stripes/test/blob/000.png", b / "stripes/test/blob/000.png"
    assert pa.read_bytes() == pb.read_bytes()
    df = build_manifest("synthetic", tmp_path / "a")
    check(df, tmp_path / "a")
    assert set(df.category) == {"stripes", "checker"} and df.label.sum() == 6
    row = df[df.label == 1].iloc[0]
    assert load_mask(tmp_path / "a" / row["mask"]).sum() > 0
