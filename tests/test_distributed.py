"""torch.distributed on the CPU (gloo): two processes started by torchrun, tiny model.

Evaluation sharded over ranks equals one process (its bootstrap intervals too); one step of 2 ranks x batch 1 equals one step at
batch 2; an interrupted distributed training resumes to the uninterrupted result; rank 0 alone
writes the run files; each epoch shuffles the shards anew; a rank that never reaches a collective
makes the others fail after ADACLIP_DIST_TIMEOUT. (Each epoch's shards under torchrun: test_data_loading.py,
with the rank and world size given.)
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from adaclip import AdaCLIP, AdaCLIPConfig, bootstrap, cli
from adaclip.data import read_manifest, write_manifest
from adaclip.data.registry import MANIFEST_DIR

pytestmark = pytest.mark.slow          # torchrun starts processes: scheduled first

TINY = ["--backbone", "adaclip-tiny", "--pretrained", "none", "--image-size", "32", "--prompt-depth", "2",
        "--prompt-length", "2", "--k-clusters", "3"]


# `adaclip.cli` with every file each rank writes under the results folder listed in
# <ADACLIP_WRITES_DIR>/rank<R>.txt: files opened for writing and the targets of renames (atomic
# writes), seen through Python's audit hooks, whatever code path writes them
AUDITED_CLI = """
import os, re, sys
results = os.path.realpath(os.environ["ADACLIP_RESULTS_DIR"])
log = open(os.path.join(os.environ["ADACLIP_WRITES_DIR"], "rank" + os.environ["RANK"] + ".txt"), "w")
temporary = re.compile(r"^[.].*[.]tmp$")                     # io.atomic_path's files, renamed to their target

def note(path):
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(path))
        if path.startswith(results + os.sep) and not temporary.match(os.path.basename(path)):
            log.write(os.path.relpath(path, results) + "\\n")
            log.flush()

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (any(c in mode for c in "wax+") if isinstance(mode, str) else flags & (os.O_WRONLY | os.O_RDWR)):
            note(path)
    elif event == "os.rename":
        note(args[1])

sys.addaudithook(hook)
from adaclip import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def torchrun(args, results, nproc=2, timeout=300, writes=None):
    """`torchrun --nproc-per-node 2 -m adaclip.cli ARGS` with run folders under ``results``.
    ``writes``: a folder; then returns {rank: set of the files it wrote, relative to ``results``}."""
    env = {**os.environ, "ADACLIP_RESULTS_DIR": str(results), "OMP_NUM_THREADS": "1", "ADACLIP_DIST_TIMEOUT": "120"}
    entry = ["-m", "adaclip.cli"]
    if writes is not None:
        Path(writes).mkdir(parents=True, exist_ok=True)
        (Path(writes) / "audited_cli.py").write_text(AUDITED_CLI)
        env["ADACLIP_WRITES_DIR"] = str(writes)
        entry = [str(Path(writes) / "audited_cli.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *entry, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    if writes is None:
        return done
    return {r: set((Path(writes) / f"rank{r}.txt").read_text().split()) for r in range(nproc)}


def run_script(folder, body, env, timeout):
    """torchrun (2 ranks) on the script ``body`` (written into ``folder``); returns (exit code, output),
    the code None when the job outlived ``timeout``: then it is killed, its ranks too (torchrun starts
    each in a session of its own, so each rank notes its pid first)."""
    script, output = Path(folder) / "script.py", Path(folder) / "output.txt"
    script.write_text(f"import os\nwith open(os.path.join({str(folder)!r}, 'pid' + os.environ['RANK']), 'w') as f:\n"
                      "    f.write(str(os.getpid()))\n" + body)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    with open(output, "w") as out:
        job = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:                                 # no rank left behind, whatever happened
            pids = [int(p.read_text()) for p in Path(folder).glob("pid[0-9]") if p.read_text()]
            for pid in [job.pid, *pids]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            job.wait()
    return code, output.read_text()


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
            "sample/headct.csv", "--root", "sample", "--run-name", "e", "--batch-size", "4", "--save-maps"]
    single(args, tmp_path / "one", monkeypatch)
    writes = torchrun(args, tmp_path / "two", writes=tmp_path / "writes")
    one, two = (pd.read_csv(tmp_path / r / "e" / "metrics.csv") for r in ("one", "two"))
    # pixel histograms are summed over the ranks: the same metrics and AUPRO, not an average of ranks
    pixel = [c for c in one.columns if c.startswith("pixel_")]
    pd.testing.assert_frame_equal(one[pixel], two[pixel], check_exact=False, rtol=1e-12, atol=1e-12)
    image = [c for c in one.columns if c.startswith("image_")]             # from scores equal to 1e-7
    pd.testing.assert_frame_equal(one[image], two[image], check_exact=False, rtol=0, atol=1e-5)
    pd.testing.assert_frame_equal(one.drop(columns=pixel + image), two.drop(columns=pixel + image))
    # the bootstrap intervals (1000 replicates, the default): every rank draws the replicates of the
    # whole test set (seeded by the category, never the rank) and adds its images' share of the pixel
    # histograms; the sums are one process's state, so its bounds and deviations equal one process's
    bounds = [c for c in one.columns if c.endswith(("_lo", "_hi"))]
    assert len(bounds) == 16 and one[bounds].notna().any().all()
    image_bounds = [c for c in bounds if c.startswith("image_")]          # from scores equal to 1e-7, as above
    pd.testing.assert_frame_equal(one[image_bounds], two[image_bounds], check_exact=False, rtol=0, atol=1e-5)
    pixel_bounds = [c for c in bounds if c not in image_bounds]
    pd.testing.assert_frame_equal(one[pixel_bounds], two[pixel_bounds], check_exact=False, rtol=0, atol=1e-9)
    saved = [bootstrap.load(tmp_path / r / "e" / bootstrap.FILE) for r in ("one", "two")]
    assert saved[0]["replicates"] == saved[1]["replicates"] == 1000 and saved[0]["seed"] == saved[1]["seed"]
    assert saved[0]["categories"].keys() == saved[1]["categories"].keys()
    for key, per in saved[0]["categories"].items():
        for metric, deviations in per.items():
            np.testing.assert_allclose(deviations, saved[1]["categories"][key][metric], rtol=0,
                                       atol=1e-5 if metric.startswith("image_") else 1e-9, err_msg=f"{key} {metric}")
    one, two = (pd.read_csv(tmp_path / r / "e" / "scores.csv") for r in ("one", "two"))
    pd.testing.assert_frame_equal(one.drop(columns="score"), two.drop(columns="score"))
    np.testing.assert_allclose(one.score, two.score, atol=1e-5)          # batch composition differs (1e-7)
    assert sorted(p.name for p in (tmp_path / "two" / "e").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "e").iterdir())
    # which rank wrote what: each rank the maps of its own shard (every other image), rank 0 alone
    # everything else (the results are the sums over the ranks)
    files = {str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two" / "e").rglob("*") if p.is_file()}
    maps = {f"e/maps/{i:06d}.npz" for i in range(len(one))}
    assert maps <= files and writes[0] | writes[1] == files
    assert writes[1] == {f"e/maps/{i:06d}.npz" for i in range(1, len(one), 2)}
    assert writes[0] == files - writes[1]
    assert {"e/metrics.csv", "e/scores.csv", "e/thresholds.json", "e/config.json", "e/bootstrap.npz"} <= writes[0]


def test_two_ranks_at_batch_one_step_like_one_process_at_batch_two(tmp_path, monkeypatch):
    # lr 1e-3: Adam's first step is lr * g / (|g| + eps), so float noise in a near-zero gradient moves a
    # weight by up to lr * noise / eps; the comparison is about the averaged gradients, not Adam
    args = ["train", "--train", _manifest(tmp_path, 1, 1), "--root", "sample", *TINY, "--epochs", "1",
            "--lr", "0.001", "--run-name", "t"]
    single(args + ["--batch-size", "2"], tmp_path / "one", monkeypatch)
    writes = torchrun(args + ["--batch-size", "1"], tmp_path / "two", writes=tmp_path / "writes")
    assert writes[1] == set()                                            # rank 0 alone writes the run
    assert {"t/model.pt", "t/train_log.csv", "t/config.json", "t/checkpoints/last.pt",
            "t/checkpoints/epoch_001.pt"} <= writes[0]
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


def test_a_rank_that_never_reaches_a_collective_times_out(tmp_path):
    """Rank 1 hangs (alive, so torchrun does not stop the job): rank 0 waits in the barrier only
    ADACLIP_DIST_TIMEOUT seconds, then fails with gloo's timeout. (A job still running long after
    that, with the default of 900 s, is killed by the test and fails it.)"""
    script = ("import time\nfrom adaclip import distributed\ndistributed.init_from_env()\n"
              "if distributed.rank() == 1:\n    time.sleep(600)\n"
              "distributed.barrier()\n")
    code, out = run_script(tmp_path, script, {"ADACLIP_DIST_TIMEOUT": "4"}, timeout=150)
    assert code is not None, "the job was still waiting: ADACLIP_DIST_TIMEOUT was not applied\n" + out[-3000:]
    assert code != 0 and "Timed out" in out and "4000ms" in out, out[-4000:]


def test_other_methods_train_and_evaluate_under_torchrun(tmp_path, monkeypatch):
    """APRIL-GAN trains under torchrun through the same command (its own loss and recipe), and its
    few-shot evaluation, sharded over two ranks, equals one process."""
    tiny = ["--backbone", "adaclip-tiny", "--pretrained", "none", "--image-size", "32"]
    torchrun(["train", "--method", "aprilgan", "--train", "sample/mvtec.csv", "--root", "sample", "--run-name", "t",
              "--epochs", "1", "--batch-size", "2", *tiny], tmp_path / "two")
    config = json.loads((tmp_path / "two" / "t" / "config.json").read_text())
    assert config["method"] == "aprilgan" and config["train"]["optimizer"] == "adam" and config["train"]["lr"] == 1e-3
    assert len(pd.read_csv(tmp_path / "two" / "t" / "train_log.csv")) == 4        # 15 images / (2 ranks x batch 2)
    model = tmp_path / "two" / "t" / "model.pt"
    args = ["evaluate", "--checkpoint", str(model), "--test", "sample/visa.csv", "--root", "sample", "--run-name", "e",
            "--batch-size", "3", "--k-shot", "2"]
    single(args, tmp_path / "one", monkeypatch)
    torchrun(args, tmp_path / "two")
    one, two = (pd.read_csv(tmp_path / r / "e" / "metrics.csv") for r in ("one", "two"))
    pixel = [c for c in one.columns if c.startswith("pixel_")]
    pd.testing.assert_frame_equal(one[pixel], two[pixel], check_exact=False, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(*(pd.read_csv(tmp_path / r / "e" / "scores.csv").score for r in ("one", "two")),
                               atol=1e-5)
