"""Mutation audit: put each known bug into the code, run the tests that should catch it, restore.

    python tests/mutants.py                 # every mutant, each against the tests named beside it
    python tests/mutants.py cache loading   # the mutants whose name contains any of the words
    python tests/mutants.py --list

Not collected by pytest (no ``test_`` prefix): it runs pytest itself, once per mutant, in this
checkout, and restores each file afterwards (also on Ctrl-C). A mutant that the named tests do not
catch is reported as SURVIVED and the exit code is 1. The list holds the bugs that once passed the
whole suite (issue 23) and is meant to grow: a bug found later goes here with the test that now
catches it.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lib" / "adaclip"


@dataclass
class Mutant:
    name: str
    path: str          # under lib/adaclip/
    old: str           # must occur exactly once
    new: str
    tests: tuple       # pytest node ids or files that must fail


MUTANTS = [
    Mutant("aprilgan release files swapped", "methods/aprilgan.py",
           '{"mvtec_pretrained": "mvtec", "visa_pretrained": "visa"}',
           '{"mvtec_pretrained": "visa", "visa_pretrained": "mvtec"}',
           ("tests/test_aprilgan_parity.py::test_official_checkpoint",)),
    Mutant("checkpoint forgets trained_on", "methods/checkpoint.py",
           '    model.trained_on = obj.get("trained_on")\n', "",
           ("tests/test_checkpoint.py",)),
    Mutant("learned model of unknown origin training-free", "methods/base.py",
           "if self._trained_on is None and not self.learnable_parameters():",
           "if self._trained_on is None:",
           ("tests/test_checkpoint.py",)),
    Mutant("checkpoint backbone overrides ignored", "methods/checkpoint.py",
           "        setattr(cfg.backbone, k, v)\n", "        pass\n",
           ("tests/test_checkpoint.py",)),
    Mutant("default stage ignores configured betas", "methods/base.py",
           "cfg.lr, tuple(cfg.betas),", "cfg.lr, (0.9, 0.999),",
           ("tests/test_train.py",)),
    Mutant("cache key without the crop", "data/cache.py",
           'parts = [str(size), str(row.get("crop", "") or "")]', "parts = [str(size)]",
           ("tests/test_pipeline_speed.py",)),
    Mutant("distributed sampler unseeded", "data/loading.py",
           "num_replicas=world, rank=rank, shuffle=True, seed=seed)", "num_replicas=world, rank=rank, shuffle=True)",
           ("tests/test_data_loading.py",)),
    Mutant("device range check keeps the last batch only", "metrics.py",
           "self._extent = extent if self._extent is None else", "self._extent = extent if True else",
           ("tests/test_pipeline_speed.py",)),
    Mutant("cflow counts shifted by one threshold", "metrics.py",
           "return np.cumsum(pro[::-1])[::-1][1:], np.cumsum(fp[::-1])[::-1][1:], totals",
           "return np.cumsum(pro[::-1])[::-1][:-1], np.cumsum(fp[::-1])[::-1][:-1], totals",
           ("tests/test_metrics.py",)),
    Mutant("writer errors swallowed in the loop", "evaluate.py",
           "self.pending.pop(0).result()", "self.pending.pop(0)",
           ("tests/test_evaluate.py",)),
    Mutant("writer errors swallowed at close", "evaluate.py",
           "                f.result()\n", "                f.exception()\n",
           ("tests/test_evaluate.py",)),
    Mutant("writer feeds the first image's regions", "evaluate.py",
           "regions[j] if regions else None", "regions[0] if regions else None",
           ("tests/test_pipeline_speed.py",)),
    Mutant("resized masks dilated", "evaluate.py",
           'masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0]',
           'masks = (F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0] > 0).float()',
           ("tests/test_evaluate.py",)),
    Mutant("every stage at cfg.batch_size", "train.py",
           "_loader(dataset, cfg, epoch, stage.batch_size,", "_loader(dataset, cfg, epoch, cfg.batch_size,",
           ("tests/test_aaclip.py::test_two_stages_in_one_run",)),
    Mutant("resume at a stage boundary restores the old optimiser", "train.py",
           "if start_epoch < total and stage_of[start_epoch] == stage_of[start_epoch - 1]:",
           "if start_epoch < total:",
           ("tests/test_aaclip.py::test_two_stages_in_one_run",)),
    Mutant("sweep --force ignored", "sweep.py",
           "if not force and all(finished(", "if all(finished(",
           ("tests/test_sweep.py::test_force_reruns_finished_configurations",)),
    Mutant("published mean over fewer datasets", "analysis.py",
           "like = defined.any() and values[defined].notna().all()",
           "like = defined.any() and values[defined].notna().any()",
           ("tests/test_analysis.py",)),
]


def run(mutant: Mutant) -> tuple[bool, float, str]:
    """(caught, seconds, last lines of pytest's output) with the mutant in place."""
    path = LIB / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: {mutant.path} holds {original.count(mutant.old)} copies of the "
                         f"text to mutate (expected 1); update tests/mutants.py")
    path.write_text(original.replace(mutant.old, mutant.new))
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                               "-n", "0", *mutant.tests], cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(original)
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return done.returncode != 0, time.perf_counter() - start, tail


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for m in MUTANTS:
            print(f"{m.name:<55} {m.path:<25} {' '.join(m.tests)}")
        return 0
    chosen = [m for m in MUTANTS if not argv or any(w in m.name for w in argv)]
    survived = []
    for m in chosen:
        caught, seconds, tail = run(m)
        print(f"{'caught  ' if caught else 'SURVIVED'} {seconds:6.1f}s  {m.name}", flush=True)
        if not caught:
            survived.append(m.name)
            print("    " + tail.replace("\n", "\n    "))
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
