"""The CUDA path (bf16 autocast, float32 maps) on a real GPU; skipped, saying so, where there is none.

The rest of the suite hides GPUs (conftest.py) so that exactness tests run on the CPU; this test
starts a fresh interpreter that sees the devices the test run was given.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest

import conftest

CHECK = r"""
import numpy as np
import torch
from adaclip import AdaCLIP, AdaCLIPConfig, EvalCfg
from adaclip.data import build_manifest
from adaclip.data.registry import resolve_root
from adaclip.evaluate import evaluate
from adaclip.precision import autocast
from adaclip.methods.losses import adaclip_loss

assert torch.cuda.is_available(), "torch sees no CUDA device"
dev = torch.device("cuda")
torch.manual_seed(0)
model = AdaCLIP.from_config(AdaCLIPConfig.tiny()).eval()
with torch.no_grad():
    for p in model.learnable_parameters():
        p.add_(0.05 * torch.randn_like(p))
x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref = model(x, "bottle")                                   # CPU, float32
model.to(dev)
with torch.no_grad(), autocast(dev):
    out = model(x.to(dev), "bottle")
assert out.pixel_scores.dtype == out.image_scores.dtype == torch.float32, "maps must stay float32 under bf16"
assert torch.allclose(out.pixel_scores.cpu(), ref.pixel_scores, atol=0.05), "bf16 maps far from float32"
assert torch.allclose(out.image_scores.cpu(), ref.image_scores, atol=0.05), "bf16 scores far from float32"

model.train()
with autocast(dev):
    o = model(x.to(dev), "bottle", return_layer_maps=True)
masks = (torch.rand(3, 32, 32, device=dev) > 0.9).float()
loss, _ = adaclip_loss(o.image_probs.float(), [m.float() for m in o.layer_maps],
                       torch.ones(3, dtype=torch.long, device=dev), masks)
loss.backward()
for name, p in model.named_parameters():
    if not name.startswith("clip.") and name != "text_prompts.static.0":     # layer-0 text prompt is unused
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

root = resolve_root("sample")
result = evaluate(model.eval(), build_manifest("visa", root), root, EvalCfg(batch_size=4), progress=False)
assert np.isfinite(result.metrics.pixel_auroc).all()

# the pixel histograms on the GPU hold exactly what they hold on the CPU (region weights from the CPU)
from adaclip.metrics import PixelAccumulator, region_weights
rng = np.random.default_rng(0)
maps = rng.random((4, 64, 64)).astype(np.float32)
masks = np.zeros((4, 64, 64), np.uint8)
masks[0, 5:20, 5:30] = masks[1, 40:50, 10:12] = masks[1, 50:60, 50:60] = 1
regions = [region_weights(m) for m in masks]
cpu, gpu = PixelAccumulator(), PixelAccumulator(device=dev)
cpu.update(maps, masks, regions)
gpu.update(torch.from_numpy(maps).to(dev), torch.from_numpy(masks).to(dev), regions)
assert torch.equal(cpu.hist, gpu.hist.cpu()), "GPU pixel histograms differ"
assert torch.allclose(cpu.pro, gpu.pro.cpu(), rtol=1e-12, atol=1e-15), "GPU region hits differ"
a, b = cpu.compute()[0], gpu.compute()[0]
assert all(abs(a[k] - b[k]) <= 1e-6 for k in a), (a, b)
workers = evaluate(model.eval(), build_manifest("visa", root), root, EvalCfg(batch_size=4, num_workers=2), progress=False)
assert workers.scores.score.equals(result.scores.score) or np.allclose(workers.scores.score, result.scores.score, atol=1e-6)
print("CUDA bf16 path ok on", torch.cuda.get_device_name(0))
"""


def _has_gpu() -> bool:
    visible = conftest.CUDA_VISIBLE_DEVICES
    return bool(glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi")) and visible not in ("", "-1")


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="no CUDA device on this machine: the bf16 CUDA path is checked where one exists")
def test_cuda_bf16_path():
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if conftest.CUDA_VISIBLE_DEVICES is not None:
        env["CUDA_VISIBLE_DEVICES"] = conftest.CUDA_VISIBLE_DEVICES
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
