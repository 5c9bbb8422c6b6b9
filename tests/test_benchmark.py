"""`adaclip benchmark` runs end to end on the tiny model; its numbers are printed, never asserted."""
import pytest

from adaclip import AdaCLIPConfig
from adaclip.benchmark import run


@pytest.mark.slow
def test_benchmark_runs_on_the_tiny_model(capsys, monkeypatch):
    """Every row; peak memory comes from a fresh process per number on the CPU: that path runs once
    here, the other numbers are measured in this process (the same `measure`)."""
    from adaclip import benchmark

    fresh = benchmark._peak_in_fresh_process("infer", "adaclip", AdaCLIPConfig.tiny(), 1, "cpu")
    assert fresh > 100                                      # MiB: a process holding torch and the model
    monkeypatch.setattr(benchmark, "_peak_in_fresh_process", benchmark.measure)
    rows = run(batch_size=2, device="cpu", repeats=1, cfg=AdaCLIPConfig.tiny())
    for name, value in rows:
        print(f"{name:<46} {value}")
    names = [name for name, _ in rows]
    assert names[0] == "config" and "adaclip-tiny @ 32, batch 2" in rows[0][1]
    assert {"inference, batch 1", "inference, batch 2", "training step, batch 1", "training step, batch 2",
            "peak memory, inference batch 2", "peak memory, training step batch 2"} <= set(names)
    assert {"  unprompted pass, batch 2", "  prompted pass, batch 2", "  text pass, batch 2",
            "  maps and HSF (the rest), batch 2"} <= set(names)
    assert any(n.startswith("floor: bare open_clip") for n in names) and any(n.startswith("pixel metrics") for n in names)
    assert "with activation checkpointing" in dict(rows)["peak memory, training step batch 2"]


def test_benchmark_of_each_method(capsys):
    """`adaclip benchmark --method NAME`: WinCLIP's cost against a bare forward (no training rows:
    it learns nothing), APRIL-GAN's training step."""
    from adaclip import methods
    from adaclip.benchmark import main

    main(["--method", "winclip", "--backbone", "adaclip-tiny", "--image-size", "32", "--batch-size", "2",
          "--repeats", "1", "--no-memory"])
    out = capsys.readouterr().out
    assert "winclip: adaclip-tiny @ 32, batch 2" in out and "x the floor" in out and "winclip learns nothing" in out
    rows = dict(run(batch_size=2, repeats=1, memory=False, method="aprilgan",
                    cfg=methods.config("aprilgan", backbone=dict(name="adaclip-tiny", pretrained=None, image_size=32))))
    assert "training step, batch 2" in rows and rows["config"].startswith("aprilgan:")


def test_pipeline_benchmark_prints_each_rate(capsys):
    """`adaclip benchmark --pipeline`: the input path, the metric path, the model forward and the whole
    evaluation in images per second, input + metrics as evaluation runs them (with and without
    workers), and which part limits."""
    from adaclip.benchmark_pipeline import run as pipeline

    rows = dict(pipeline(batch_size=4, images=8, workers=1, cfg=AdaCLIPConfig.tiny(), repeat=1))
    for name, value in rows.items():
        print(f"{name:<50} {value}")
    assert "1 loader workers (given)" in rows["config"] and "8 images of mvtec" in rows["config"]
    for name in ("input, 1 workers (regions labelled there)", "input, 0 workers (the previous default)",
                 "metrics on cpu (histograms, cflow AUPRO with its counts)",
                 "input + metrics (evaluate, forward replaced), 1 workers",
                 "input + metrics (evaluate, forward replaced), 0 workers", "model forward, batch 4",
                 "whole evaluation (8 images), no intervals", "whole evaluation, intervals B=200",
                 "input + metrics, intervals B=200 (0: none)", "input + metrics, 1 workers, no intervals (B=0)"):
        assert "images/s" in rows[name], name
    assert "of the model-forward rate" in rows["whole evaluation (8 images), no intervals"]
    assert "time against none" in rows["input + metrics, intervals B=1000 (0: none)"]
    assert "B=200: 4.7 MiB" in rows["intervals' pixel state per annotated category"]
    assert rows["limited by"] in ("input", "metrics", "model")
