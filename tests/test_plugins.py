"""A user's own method without editing the library: `@methods.register`, and methods that other
installed packages declare under the ``adaclip.methods`` entry point."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from adaclip import methods
from adaclip.methods import registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "patch_probe.py"
TINY = ["--backbone", "adaclip-tiny", "--pretrained", "none", "--image-size", "32"]


def test_register_refuses_what_is_not_a_method_and_taken_names():
    class NotAMethod:
        pass

    with pytest.raises(TypeError, match="is not a method"):
        methods.register(NotAMethod)

    class Impostor(methods.Method):
        name = "adaclip"                                 # a built-in method's name
        config_class = methods.AdaCLIPConfig

    with pytest.raises(ValueError, match="method name 'adaclip' is taken by adaclip.methods.adaclip.AdaCLIP"):
        methods.register(Impostor)
    assert methods.get("adaclip") is methods.AdaCLIP
    with pytest.raises(ValueError, match="unknown method 'nosuch'.*adaclip.methods.register"):
        methods.get("nosuch")


def test_a_broken_plugin_is_reported_not_fatal(monkeypatch, caplog):
    class EntryPoint:
        name, value = "broken", "nosuchpackage.module:Method"

        def load(self):
            raise ModuleNotFoundError("No module named 'nosuchpackage'")

    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [EntryPoint()] if group == "adaclip.methods" else [])
    with caplog.at_level(logging.WARNING, logger="adaclip.methods.registry"):
        assert "adaclip" in methods.available() and "broken" not in methods.available()
    assert "method plug-in broken = nosuchpackage.module:Method could not be loaded" in caplog.text


@pytest.mark.slow
def test_an_installed_plugin_trains_and_evaluates_through_the_cli(tmp_path):
    """The example method as another package would ship it: built and installed into a folder of its
    own (pip, no dependencies), found through its entry point by `adaclip train --method patchprobe` and
    `adaclip evaluate`, with nothing changed in lib/."""
    package = tmp_path / "package"
    (package / "adaclip_patchprobe").mkdir(parents=True)
    shutil.copy(EXAMPLE, package / "adaclip_patchprobe" / "__init__.py")
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "adaclip-patchprobe"\nversion = "0.1"\n\n'
        '[project.entry-points."adaclip.methods"]\npatchprobe = "adaclip_patchprobe:PatchProbe"\n')
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                           "--target", str(target), str(package)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "patchprobe" not in methods.available()                  # not in this process: nothing imported it
    env = {**os.environ, "PYTHONPATH": str(target), "ADACLIP_RESULTS_DIR": str(tmp_path / "results")}

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "adaclip.cli", *args], env=env, capture_output=True, text=True,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    cli("train", "--method", "patchprobe", "--train", "sample/mvtec.csv", "--root", "sample", "--run-name", "p",
        "--epochs", "1", *TINY)
    run = tmp_path / "results" / "p"
    assert json.loads((run / "config.json").read_text())["method"] == "patchprobe"
    assert len(pd.read_csv(run / "train_log.csv")) == 2                       # 15 images, batch 8
    cli("evaluate", "--checkpoint", str(run / "model.pt"), "--test", "sample/visa.csv", "--root", "sample",
        "--run-name", "p")
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics.image_auroc.notna().any() and metrics.pixel_auroc.notna().any()
