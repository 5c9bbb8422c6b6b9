import numpy as np
import pytest
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
