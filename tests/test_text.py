from adaclip.methods.ensembles import state_sentences


def test_reference_ensembles():
    normal, abnormal = state_sentences("metal-nut")
    assert len(normal) == 28 and len(abnormal) == 20
    assert normal[0] == "a bad photo of a metal nut."
    assert "a cropped photo of the metal nut without damage." in normal
    assert abnormal[0] == "a bad photo of a damaged metal nut."
    assert "a low resolution photo of the metal nut with defect." in abnormal
