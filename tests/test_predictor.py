import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adaclip import AdaCLIP, AdaCLIPConfig, AdaCLIPPredictor


def test_numpy_and_pil_in_scores_and_maps_out():
    predictor = AdaCLIPPredictor(AdaCLIP.from_config(AdaCLIPConfig.tiny()), batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), rng.integers(0, 255, (20, 20), dtype=np.uint8),
              Image.new("RGBA", (33, 17))]
    scores, maps = predictor.predict(images, "bottle")
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    assert [m.shape for m in maps] == [(40, 60), (20, 20), (17, 33)]
    _, small = predictor.predict(images[:1], ["bottle"], original_size=False)
    assert small[0].shape == (32, 32)


def test_bad_inputs_say_what_is_expected():
    predictor = AdaCLIPPredictor(AdaCLIP.from_config(AdaCLIPConfig.tiny()))
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict([np.zeros((8, 8, 3), np.float32)], "bottle")
    with pytest.raises(ValueError, match="2 class names"):
        predictor.predict([np.zeros((8, 8, 3), np.uint8)], ["a", "b"])


def test_scores_and_maps_equal_the_model_outputs():
    """Across batches, with a class name per image: the model's scores, and its (S, S) maps resized
    bilinearly to each image's own (H, W)."""
    torch.manual_seed(0)
    model = AdaCLIP.from_config(AdaCLIPConfig.tiny()).eval()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), rng.integers(0, 255, (50, 24, 3), dtype=np.uint8),
              rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)]
    names = ["bottle", "screw", "metal-nut"]
    scores, maps = AdaCLIPPredictor(model, batch_size=2).predict(images, names)
    with torch.no_grad():
        x = torch.stack([model.transform(Image.fromarray(im)) for im in images])
        out = model(x, names)
    np.testing.assert_allclose(scores, out.image_scores.numpy(), rtol=1e-5, atol=1e-6)
    for im, m, ref in zip(images, maps, out.pixel_scores):
        want = F.interpolate(ref[None, None], size=im.shape[:2], mode="bilinear", align_corners=False)[0, 0]
        np.testing.assert_allclose(m, want.numpy(), rtol=1e-5, atol=1e-6)
    _, native = AdaCLIPPredictor(model).predict(images, names, original_size=False)
    np.testing.assert_allclose(np.stack(native), out.pixel_scores.numpy(), rtol=1e-5, atol=1e-6)
