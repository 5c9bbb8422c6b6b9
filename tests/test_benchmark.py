"""`adaclip benchmark` runs end to end on the tiny model; its numbers are printed, never asserted."""
from adaclip import AdaCLIPConfig
from adaclip.benchmark import run


def test_benchmark_runs_on_the_tiny_model(capsys):
    rows = run(batch_size=2, device="cpu", repeats=1, cfg=AdaCLIPConfig.tiny())
    for name, value in rows:
        print(f"{name:<42} {value}")
    names = [name for name, _ in rows]
    assert names[0] == "config" and "adaclip-tiny @ 32" in rows[0][1]
    assert {"inference, batch 1", "inference, batch 2", "training step, batch 2", "peak memory"} <= set(names)
    assert any(n.startswith("text pass") for n in names) and any(n.startswith("pixel metrics") for n in names)
