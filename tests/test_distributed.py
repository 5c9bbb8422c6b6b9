"""torch.distributed on the CPU (gloo): two processes started by torchrun, tiny model.

Evaluation sharded over ranks equals one process; one step of 2 ranks x batch 1 equals one step at
batch 2; an interrupted distributed training resumes to the uninterrupted result.
"""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import torch

from adaclip import AdaCLIP, AdaCLIPConfig, cli
from adaclip.data import read_manifest, write_manifest
from adaclip.data.registry import MANIFEST_DIR

TINY = ["--backbone", "adaclip-tiny", "--pretrained", "none", "--image-size", "32", "--prompt-depth", "2",
        "--prompt-length", "2", "--k-clusters", "3"]


def torchrun(args, results, nproc=2, timeout=300):
    """`torchrun --nproc-per-node 2 -m adaclip.cli ARGS` with run folders under ``results``."""
    env = {**os.environ, "ADACLIP_RESULTS_DIR": str(results), "OMP_NUM_THREADS": "1", "ADACLIP_DIST_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "adaclip.cli", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def single(args, results, monkeypatch):
    monkeypatch.setenv("ADACLIP_RESULTS_DIR", str(results))
    assert cli.main(args) == 0


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _manifest(tmp_path, n_normal, n_anomalous):
    df = read_manifest(MANIFEST_DIR / "sample" / "mvtec.csv")
    rows = pd.concat([df[df.label == 0].head(n_normal), df[df.label == 1].head(n_anomalous)], ignore_index=True)
    return str(write_manifest(rows, tmp_path / f"train_{n_normal}_{n_anomalous}.csv"))


def test_distributed_evaluation_equals_one_process(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = AdaCLIP.from_config(AdaCLIPConfig.tiny())
    with torch.no_grad():
        for p in model.learnable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save(tmp_path / "model.pt")
    args = ["evaluate", "--checkpoint", str(tmp_path / "model.pt"), "--test", "sample/visa.csv", "sample/kvasir.csv",
            "sample/headct.csv", "--root", "sample", "--run-name", "e", "--batch-size", "4"]
    single(args, tmp_path / "one", monkeypatch)
    torchrun(args, tmp_path / "two")
    one, two = (pd.read_csv(tmp_path / r / "e" / "metrics.csv") for r in ("one", "two"))
    # pixel histograms are summed over the ranks: the same metrics and AUPRO, not an average of ranks
    pixel = [c for c in one.columns if c.startswith("pixel_")]
    pd.testing.assert_frame_equal(one[pixel], two[pixel], check_exact=False, rtol=1e-12, atol=1e-12)
    image = [c for c in one.columns if c.startswith("image_")]             # from scores equal to 1e-7
    pd.testing.assert_frame_equal(one[image], two[image], check_exact=False, rtol=0, atol=1e-5)
    pd.testing.assert_frame_equal(one.drop(columns=pixel + image), two.drop(columns=pixel + image))
    one, two = (pd.read_csv(tmp_path / r / "e" / "scores.csv") for r in ("one", "two"))
    pd.testing.assert_frame_equal(one.drop(columns="score"), two.drop(columns="score"))
    np.testing.assert_allclose(one.score, two.score, atol=1e-5)          # batch composition differs (1e-7)
    assert sorted(p.name for p in (tmp_path / "two" / "e").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "e").iterdir())


def test_two_ranks_at_batch_one_step_like_one_process_at_batch_two(tmp_path, monkeypatch):
    # lr 1e-3: Adam's first step is lr * g / (|g| + eps), so float noise in a near-zero gradient moves a
    # weight by up to lr * noise / eps; the comparison is about the averaged gradients, not Adam
    args = ["train", "--train", _manifest(tmp_path, 1, 1), "--root", "sample", *TINY, "--epochs", "1",
            "--lr", "0.001", "--run-name", "t"]
    single(args + ["--batch-size", "2"], tmp_path / "one", monkeypatch)
    torchrun(args + ["--batch-size", "1"], tmp_path / "two")
    a, b = _weights(tmp_path / "one/t/model.pt"), _weights(tmp_path / "two/t/model.pt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    moved = _weights(tmp_path / "one/t/model.pt")
    torch.manual_seed(0)
    assert any((moved[k] - v).abs().max() > 1e-5 for k, v in AdaCLIP.from_config(
        AdaCLIPConfig.tiny()).learnable_state_dict().items() if k in moved)  # the step did change the weights
    log_one, log_two = (pd.read_csv(tmp_path / r / "t" / "train_log.csv") for r in ("one", "two"))
    assert len(log_two) == 1                                             # rank 0 alone writes the log
    np.testing.assert_allclose(log_one.loss, log_two.loss, rtol=1e-5)    # the mean over the ranks


def test_distributed_training_resumes_like_one_process(tmp_path):
    args = ["train", "--train", _manifest(tmp_path, 2, 2), "--root", "sample", *TINY, "--epochs", "3",
            "--batch-size", "1"]                                         # 2 ranks x 2 steps per epoch
    torchrun(args + ["--run-name", "full"], tmp_path)
    torchrun(args + ["--run-name", "killed", "--max-steps", "3"], tmp_path)     # dies in epoch 2
    assert (tmp_path / "killed/checkpoints/epoch_001.pt").is_file() and not (tmp_path / "killed/model.pt").exists()
    torchrun(args + ["--run-name", "killed", "--resume"], tmp_path)
    a, b = _weights(tmp_path / "full/model.pt"), _weights(tmp_path / "killed/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "full/train_log.csv"),
                                  pd.read_csv(tmp_path / "killed/train_log.csv"))


def test_a_failing_rank_stops_the_job(tmp_path):
    """Rank 1 dies before a collective: the job ends with its error instead of waiting forever."""
    script = tmp_path / "fail.py"
    script.write_text("from adaclip import distributed\nimport os\ndistributed.init_from_env()\n"
                      "if distributed.rank() == 1:\n    raise RuntimeError('rank 1 fails on purpose')\n"
                      "distributed.barrier()\n")
    env = {**os.environ, "ADACLIP_DIST_TIMEOUT": "20"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "rank 1 fails on purpose" in done.stdout + done.stderr
