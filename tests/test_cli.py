"""The command line is a thin wrapper: each subcommand runs end to end on the embedded sample."""
import json
import re

import pandas as pd
import pytest

from adaclip import cli
from adaclip.data.registry import results_root


def test_manifest_validate_sources(tmp_path, capsys):
    out = tmp_path / "m.csv"
    assert cli.main(["manifest", "kvasir", "--root", "sample", "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 5
    assert cli.main(["validate", str(out), "--root", "sample"]) == 0
    assert cli.main(["validate", str(out), "--root", str(tmp_path)]) == 1       # wrong root: files missing
    assert "does not exist" in capsys.readouterr().out
    assert cli.main(["sources"]) == 0
    assert "mvtec" in capsys.readouterr().out


def test_train_then_evaluate(capsys, results_in_tmp):
    run = "cli"
    assert results_root() == results_in_tmp                # never the repository's results/
    assert cli.main(["train", "--train", "sample/mvtec.csv", "--root", "sample", "--run", run, "--backbone",
                     "adaclip-tiny", "--pretrained", "none", "--image-size", "32", "--prompt-depth", "2",
                     "--prompt-length", "2", "--k-clusters", "3", "--epochs", "1", "--batch-size", "8"]) == 0
    assert (results_in_tmp / run / "model.pt").is_file()
    assert cli.main(["evaluate", "--checkpoint", str(results_in_tmp / run / "model.pt"), "--test", "sample/kvasir.csv",
                     "--root", "sample", "--run", run, "--bootstrap", "100", "--bootstrap-seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "kvasir" in out and "95% bootstrap interval" in out and re.search(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", out)
    config = json.loads((results_in_tmp / run / "config.json").read_text())
    assert config["intervals"]["replicates"] == 100 and config["intervals"]["seed"] == 3


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset"):
        cli.main(["manifest", "imagenet", "--root", "sample", "--out", "/tmp/x.csv"])


def test_manifest_ksdd_strips(tmp_path):
    import numpy as np
    from PIL import Image
    part = tmp_path / "ksdd" / "kos01"
    part.mkdir(parents=True)
    Image.new("RGB", (10, 30), (50, 50, 50)).save(part / "Part0.jpg")
    m = np.zeros((30, 10), np.uint8)
    m[25:28, 2:5] = 255
    Image.fromarray(m).save(part / "Part0_label.bmp")
    out = tmp_path / "ksdd.csv"
    assert cli.main(["manifest", "ksdd", "--root", str(tmp_path), "--strips", "3", "--out", str(out)]) == 0
    df = pd.read_csv(out, keep_default_na=False)
    assert dict(zip(df.crop, df.label)) == {"0,0,10,10": 0, "0,10,10,20": 0, "0,20,10,30": 1}
