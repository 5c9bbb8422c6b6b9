"""Sweeps: notebooks 01 and 02 for each configuration of a grid, then one tidy table.

A sweep file (YAML)::

    base:                      # parameters every configuration shares (any notebook parameter)
      epochs: 5
    grid:                      # a mapping: the full product; a list of mappings: the union of their
      - prompt_type: [S, D, SD]     # products (one axis at a time, as ablation tables vary them)
      - prompt_branch: [V, L, VL]
    configs:                   # and/or an explicit list of overrides
      - {method: clip}
      - {id: aprilgan, method: aprilgan, train_manifests: [mvtec.csv]}   # an id of its own
    seeds: [0, 1, 2]           # optional seed axis: every configuration once per training seed

With ``seeds`` each configuration runs once per training seed (notebook 01's ``seed``), into
``<config-id>,seed=<s>/``; sweep.csv's ``group`` column names the configuration without its seed, so
that the analysis (`analysis.seed_summary`) reports the spread across seeds apart from each run's own
bootstrap interval over test images.

``adaclip sweep FILE --run NAME`` runs each configuration into ``results/NAME/<config-id>/``
(ids read like ``prompt_type=D,prompt_branch=VL`` unless a config names its ``id``; the base alone
is ``base``), keeping the executed
notebooks. A configuration already finished with the same parameters is skipped, a failing one is
recorded with its error and the sweep goes on, and a parameter no notebook takes stops the sweep
before anything runs. Then ``results/NAME/sweep.csv``: one row per configuration x dataset x
category, every parameter and every metric a column.
"""
from __future__ import annotations

import itertools
import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import pandas as pd
import yaml

from .data.registry import results_root
from .io import write_csv
from .pipeline import coerce, default_parameters, finished, plan_pipeline, run_pipeline

PathLike = Union[str, Path]
SWEEP_NOTEBOOKS = ("01", "02")


@dataclass
class SweepConfig:
    id: str               # folder name under the sweep's run folder
    overrides: dict       # what differs from the base
    params: dict          # base + overrides: what the notebooks get
    group: str = ""       # the configuration without its training seed (a seed axis); default: the id

    def __post_init__(self):
        self.group = self.group or self.id


def load_spec(spec: Union[PathLike, dict]) -> dict:
    """A sweep file (YAML) or an already-loaded mapping, checked for its keys."""
    if not isinstance(spec, dict):
        path = Path(spec)
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read sweep file {path}: {e}") from e
        if not isinstance(spec, dict):
            raise ValueError(f"sweep file {path} must be a mapping with base / grid / configs")
    unknown = sorted(set(spec) - {"base", "grid", "configs", "seeds"})
    if unknown:
        raise ValueError(f"sweep: unknown key(s) {unknown}; a sweep has base, grid, configs and seeds")
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or
                              not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
                              or len(set(seeds)) != len(seeds)):
        raise ValueError(f"sweep: seeds must be a list of distinct integers (training seeds), got {seeds!r}")
    return spec


def config_id(overrides: dict) -> str:
    """``prompt_type=D,prompt_branch=VL``: readable, and usable as a folder name."""
    if not overrides:
        return "base"
    text = ",".join(f"{k}={_show(v)}" for k, v in overrides.items())
    return text.replace("/", "_").replace(" ", "")


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def expand(spec: Union[PathLike, dict]) -> list[SweepConfig]:
    """Every configuration of a sweep, in file order, without duplicates (same parameters)."""
    spec = load_spec(spec)
    base = {k: coerce(v) if isinstance(v, str) else v for k, v in (spec.get("base") or {}).items()}
    grids = spec.get("grid") or []
    grids = [grids] if isinstance(grids, dict) else list(grids)
    overrides = []
    for grid in grids:
        if not isinstance(grid, dict) or not all(isinstance(v, list) for v in grid.values()):
            raise ValueError(f"sweep: a grid maps parameter names to lists of values, got {grid!r}")
        overrides += [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    overrides += [dict(c) for c in spec.get("configs") or []]
    if not overrides:
        overrides = [{}]
    configs, seen = [], set()
    for o in overrides:
        name = o.pop("id", None)
        params = {**base, **o}
        key = json.dumps(params, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            configs.append(SweepConfig(str(name) if name is not None else config_id(o), o, params))
    if spec.get("seeds"):
        if any("seed" in c.overrides for c in configs):
            raise ValueError("sweep: a configuration sets seed and the sweep has a seed axis (seeds); use one of them")
        configs = [SweepConfig(f"{c.id},seed={seed}" if c.overrides else f"seed={seed}", {**c.overrides, "seed": seed},
                               {**c.params, "seed": seed}, group=c.id)
                   for c in configs for seed in spec["seeds"]]
    ids = [c.id for c in configs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"sweep: two configurations share an id: {sorted(i for i in ids if ids.count(i) > 1)}")
    return configs


def run_config(run: str, config_id: str, params: dict, results_dir: str, force: bool = False) -> tuple[str, str]:
    """One configuration (notebooks 01 and 02) in this process: ("done", "") or ("failed", error);
    the traceback goes to ``<config-id>/error.txt``. What every launcher runs."""
    error_file = Path(results_dir) / run / config_id / "error.txt"
    try:
        run_pipeline(f"{run}/{config_id}", params, notebooks_to_run=SWEEP_NOTEBOOKS, force=force,
                     results_dir=Path(results_dir), baselines=())
        error_file.unlink(missing_ok=True)
        return "done", ""
    except Exception as e:                 # recorded; the other configurations still run
        # a notebook's own error (papermill keeps its name and value), else the exception itself
        message = f"{e.ename}: {e.evalue}" if hasattr(e, "ename") else f"{type(e).__name__}: {e}"
        error_file.parent.mkdir(parents=True, exist_ok=True)
        error_file.write_text(traceback.format_exc())
        return "failed", message[:500]


def run_sweep(spec: Union[PathLike, dict], run: str, results_dir: Optional[PathLike] = None, force: bool = False,
              jobs: int = 1, launcher: str = "processes", slurm: Optional[dict] = None) -> pd.DataFrame:
    """Run every configuration (notebooks 01 and 02) and write ``sweep.csv``; returns that table.

    ``jobs`` > 1 runs that many configurations at once in separate processes, one GPU each where
    there are GPUs (CUDA_VISIBLE_DEVICES), else an equal share of the CPU threads. ``launcher``
    "slurm" submits each configuration as a Slurm job through submitit (``slurm``: partition,
    time_min, gpus_per_job); "submitit-local" uses submitit's local executor (same code path, no
    cluster). Every launcher writes the same folders and the same ``sweep.csv``.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    configs = expand(spec)
    results_dir = Path(results_dir or results_root()).resolve()
    # every configuration planned (and every parameter name checked) before anything runs
    plans = {c.id: plan_pipeline(f"{run}/{c.id}", c.params, SWEEP_NOTEBOOKS, results_dir, baselines=())
             for c in configs}
    sweep_dir = results_dir / run
    sweep_dir.mkdir(parents=True, exist_ok=True)
    status, todo = {}, []
    for c in configs:
        if not force and all(finished(out, given) for _, out, given in plans[c.id]):
            status[c.id] = ("skipped", "")
            print(f"[sweep] {c.id}: already done, skipped")
        else:
            todo.append(c)
    if launcher != "processes":
        status.update(_submitit(todo, run, results_dir, force, launcher, slurm or {}))
    elif jobs > 1:
        status.update(_parallel(todo, run, results_dir, force, jobs))
    else:
        for i, c in enumerate(todo):
            print(f"[sweep] {i + 1}/{len(todo)} {c.id}: running")
            status[c.id] = run_config(run, c.id, c.params, str(results_dir), force)
    for c in todo:
        if status[c.id][0] == "failed":
            print(f"[sweep] {c.id} failed: {status[c.id][1]} (details in {sweep_dir / c.id / 'error.txt'})")
    table = sweep_table(sweep_dir, configs, status)
    write_csv(sweep_dir / "sweep.csv", table)
    return table


LAUNCHERS = ("processes", "slurm", "submitit-local")


def _parallel(todo: list[SweepConfig], run: str, results_dir: Path, force: bool, jobs: int) -> dict:
    """``jobs`` configurations at a time, each in its own process (``python -m adaclip.sweep``)."""
    import os
    import queue
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import torch

    gpus = torch.cuda.device_count()
    slots: queue.Queue = queue.Queue()
    for k in range(jobs):
        slots.put(k % gpus if gpus else None)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))

    def one(c: SweepConfig) -> tuple[str, str]:
        slot = slots.get()
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": str(slot)} if slot is not None else
                                {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})}
        print(f"[sweep] {c.id}: running" + (f" on GPU {slot}" if slot is not None else f" ({threads} threads)"))
        try:
            job = json.dumps({"run": run, "config_id": c.id, "params": c.params, "results_dir": str(results_dir),
                              "force": force})
            done = subprocess.run([sys.executable, "-m", "adaclip.sweep", job], env=env, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                return tuple(json.loads(lines[-1]))
            return "failed", (done.stderr.strip().splitlines() or ["the worker process died"])[-1][:500]
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip([c.id for c in todo], pool.map(one, todo)))


def _submitit(todo: list[SweepConfig], run: str, results_dir: Path, force: bool, launcher: str, slurm: dict) -> dict:
    """One submitit job per configuration (Slurm, or submitit's local executor); waits for them all."""
    try:
        import submitit
    except ImportError as e:
        raise ImportError("the Slurm launcher needs submitit: pip install -e '.[cluster]' (make test installs it)") from e
    folder = results_dir / run / ".submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if launcher == "slurm" else "local")
    options = {"timeout_min": int(slurm.get("time_min", 240)), "name": f"adaclip-{run}"}
    if launcher == "slurm":
        options.update(slurm_partition=slurm.get("partition"), gpus_per_node=int(slurm.get("gpus_per_job", 1)),
                       tasks_per_node=1)
    executor.update_parameters(**{k: v for k, v in options.items() if v is not None})
    submitted = {c.id: executor.submit(run_config, run, c.id, c.params, str(results_dir), force) for c in todo}
    print(f"[sweep] submitted {len(submitted)} job(s) through submitit ({launcher}); logs in {folder}")
    status = {}
    for config_id, job in submitted.items():
        try:
            status[config_id] = tuple(job.result())
        except Exception as e:             # the job itself died (node failure, time limit, ...)
            status[config_id] = ("failed", f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:400]}")
    return status


def sweep_table(sweep_dir: PathLike, configs: list[SweepConfig], status: Optional[dict] = None) -> pd.DataFrame:
    """One row per configuration x dataset x category (a failed configuration: one row with its
    error), with the configuration id, its status, every parameter and every metric as columns. A
    parameter that some configurations leave out holds the notebooks' default there."""
    sweep_dir, status = Path(sweep_dir), status or {}
    params = list(dict.fromkeys(k for c in configs for k in c.params))
    defaults = default_parameters()
    configs = [SweepConfig(c.id, c.overrides, {k: c.params.get(k, defaults.get(k)) for k in params}, c.group)
               for c in configs]
    frames = []
    for c in configs:
        state, error = status.get(c.id, ("", ""))
        folder = sweep_dir / c.id
        row = {"config_id": c.id, "group": c.group, "status": state, "error": error,
               **{k: _show(c.params[k]) if isinstance(c.params.get(k), (list, dict)) else c.params.get(k)
                  for k in params}}
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        # every configuration says which method ran (a sweep need not vary it)
        row["method"] = config.get("method") or c.params.get("method") or defaults.get("method")
        row["backbone_weights"] = config.get("backbone_weights")
        if (folder / "metrics.csv").is_file() and state != "failed":
            metrics = pd.read_csv(folder / "metrics.csv")
            frames.append(pd.DataFrame([row] * len(metrics)).join(metrics.drop(columns=["note"], errors="ignore")))
        else:
            frames.append(pd.DataFrame([row]))
    return pd.concat(frames, ignore_index=True)


def dataset_level(table: pd.DataFrame) -> pd.DataFrame:
    """A sweep table's dataset-level rows (the dataset means, or the only category), for plots."""
    from .analysis import dataset_rows

    rows = table.dropna(subset=["dataset"]) if "dataset" in table else table.iloc[:0]
    return dataset_rows(rows.rename(columns={"config_id": "run"})).rename(columns={"run": "config_id"})


if __name__ == "__main__":                 # one configuration in a worker process (run_sweep's jobs > 1)
    import sys

    job = json.loads(sys.argv[1])
    print(json.dumps(run_config(job["run"], job["config_id"], job["params"], job["results_dir"], job["force"])))
