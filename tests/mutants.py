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
           "tail = lambda a: np.cumsum(a[..., ::-1], axis=-1)[..., ::-1][..., 1:]",
           "tail = lambda a: np.cumsum(a[..., ::-1], axis=-1)[..., ::-1][..., :-1]",
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
    # the bootstrap intervals and paired tests (tests/test_intervals.py)
    Mutant("bootstrap draws unstratified", "bootstrap.py",
           "    for cls in (0, 1):\n        idx = np.flatnonzero(labels == cls)\n",
           "    for cls in (0,):\n        idx = np.arange(len(labels))\n",
           ("tests/test_intervals.py::test_resample_counts_keep_each_class_count_and_depend_on_seed_and_category_only",)),
    Mutant("bootstrap draws seeded by the rank", "bootstrap.py",
           'rng = np.random.default_rng([seed, zlib.crc32(f"{dataset}/{category}".encode())])',
           'from . import distributed\n    rng = np.random.default_rng([seed + distributed.rank(), zlib.crc32(f"{dataset}/{category}".encode())])',
           ("tests/test_distributed.py::test_distributed_evaluation_equals_one_process",)),
    Mutant("replicate AUROC a left sum", "bootstrap.py",
           "(tpr[:, 1:] + tpr[:, :-1]) / 2", "(tpr[:, :-1] + tpr[:, :-1]) / 2",
           ("tests/test_intervals.py::test_replicates_equal_their_metrics_recomputed_on_the_resampled_images",)),
    Mutant("replicate image metrics split tied scores", "bootstrap.py",
           "starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]", "starts = np.arange(len(s))",
           ("tests/test_intervals.py::test_replicates_equal_their_metrics_recomputed_on_the_resampled_images",)),
    Mutant("pixel replicates ignore their counts", "bootstrap.py",
           "self._state.addmm_(self.counts[:, cols], hist)",
           "self._state.addmm_(self.counts[:1, cols].expand(len(self.counts), -1), hist)",
           ("tests/test_intervals.py::test_pixel_auroc_interval_covers_the_true_pooled_auroc",)),
    Mutant("pixel replicates take a map's position for its image", "bootstrap.py",
           "self._state.addmm_(self.counts[:, cols], hist)", "self._state.addmm_(self.counts[:, :len(cols)], hist)",
           ("tests/test_intervals.py::test_replicates_equal_their_metrics_recomputed_on_the_resampled_images",)),
    Mutant("90% intervals", "bootstrap.py", "LEVEL = 0.95", "LEVEL = 0.90",
           ("tests/test_intervals.py::test_image_auroc_interval_covers_the_true_auroc",)),
    Mutant("interval may exclude its estimate", "bootstrap.py",
           "return float(min(lo, estimate)), float(max(hi, estimate))", "return float(lo), float(hi)",
           ("tests/test_intervals.py::test_interval_quantiles_clipped_to_the_unit_range_and_holding_the_estimate",)),
    Mutant("mean rows couple the categories' sorted deviations", "bootstrap.py",
           "return np.nanmean(np.stack(parts), axis=0)", "return np.nanmean(np.sort(np.stack(parts), axis=1), axis=0)",
           ("tests/test_intervals.py::test_paired_test_size_under_the_null",
            "tests/test_intervals.py::test_evaluate_intervals_are_the_bootstrap_of_the_models_own_scores_and_maps")),
    Mutant("cflow replicates take a map's position for its image", "metrics.py",
           "replicates[:, [s[-1] for s in self._shapes]]", "replicates[:, :len(self._shapes)]",
           ("tests/test_intervals.py::test_replicates_equal_their_metrics_recomputed_on_the_resampled_images",)),
    Mutant("cflow replicate area crosses the FPR limit", "metrics.py",
           "both = kept[:, 1:] & kept[:, :-1]", "both = kept[:, 1:]",
           ("tests/test_intervals.py::test_replicates_equal_their_metrics_recomputed_on_the_resampled_images",)),
    Mutant("one set of replicates for every category", "evaluate.py",
           "cfg.bootstrap, cfg.bootstrap_seed, *key)", 'cfg.bootstrap, cfg.bootstrap_seed, "all", "all")',
           ("tests/test_intervals.py::test_evaluate_intervals_are_the_bootstrap_of_the_models_own_scores_and_maps",)),
    Mutant("a map's image column counted within its batch", "evaluate.py",
           "images=[int(column[index[j]]) for j in js])", "images=list(range(len(js))))",
           ("tests/test_intervals.py::test_evaluate_intervals_are_the_bootstrap_of_the_models_own_scores_and_maps",)),
    Mutant("mean rows' intervals from their first category", "evaluate.py",
           'dev = bootstrap.mean_deviation(parts) if row.category == "mean" else (parts[0] if parts else np.zeros(0))',
           "dev = parts[0] if parts else np.zeros(0)",
           ("tests/test_intervals.py::test_evaluate_intervals_are_the_bootstrap_of_the_models_own_scores_and_maps",)),
    Mutant("bootstrap=0 keeps an earlier bootstrap.npz", "evaluate.py",
           "            Path(run_dir, bootstrap.FILE).unlink(missing_ok=True)", "            pass",
           ("tests/test_intervals.py::test_evaluate_without_bootstrap_writes_no_intervals",)),
    Mutant("paired p-value one-sided", "compare.py",
           "np.sum(np.abs(dev) >= abs(diff) - 1e-12)", "np.sum(dev >= diff - 1e-12)",
           ("tests/test_intervals.py::test_paired_test_power_either_way_round",)),
    Mutant("paired replicates unpaired", "compare.py",
           "dev = bootstrap.mean_deviation(da) - bootstrap.mean_deviation(db)",
           "dev = bootstrap.mean_deviation(da) - bootstrap.mean_deviation(db)[::-1]",
           ("tests/test_intervals.py::test_paired_test_size_under_the_null",)),
    Mutant("compare ignores the bootstrap seeds", "compare.py",
           "if (a.replicates, a.seed) != (b.replicates, b.seed):", "if a.replicates != b.replicates:",
           ("tests/test_intervals.py::test_compare_refuses_runs_on_other_images_or_other_draws",)),
    Mutant("compare ignores which images were scored", "compare.py",
           "if len(mine[0]) != len(mine[1]) or not mine[0].equals(mine[1]):", "if False:",
           ("tests/test_intervals.py::test_compare_refuses_runs_on_other_images_or_other_draws",)),

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
