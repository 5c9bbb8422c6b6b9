"""Sweeps: notebooks 01 and 02 for each configuration of a grid, then one tidy table.

A sweep file (YAML)::

    base:                      # parameters every configuration shares (any notebook parameter)
      epochs: 5
    grid:                      # a mapping: the full product; a list of mappings: the union of their
      - prompt_type: [S, D, SD]     # products (one axis at a time, as ablation tables vary them)
      - prompt_branch: [V, L, VL]
    configs:                   # and/or an explicit list of overrides
      - {method: clip}

``adaclip sweep FILE --run NAME`` runs each configuration into ``results/NAME/<config-id>/``
(ids read like ``prompt_type=D,prompt_branch=VL``; the base alone is ``base``), keeping the executed
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
    unknown = sorted(set(spec) - {"base", "grid", "configs"})
    if unknown:
        raise ValueError(f"sweep: unknown key(s) {unknown}; a sweep has base, grid and configs")
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
        params = {**base, **o}
        key = json.dumps(params, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            configs.append(SweepConfig(config_id(o), o, params))
    ids = [c.id for c in configs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"sweep: two configurations share an id: {sorted(i for i in ids if ids.count(i) > 1)}")
    return configs


def run_sweep(spec: Union[PathLike, dict], run: str, results_dir: Optional[PathLike] = None,
              force: bool = False) -> pd.DataFrame:
    """Run every configuration (notebooks 01 and 02) and write ``sweep.csv``; returns that table."""
    configs = expand(spec)
    results_dir = Path(results_dir or results_root()).resolve()
    # every configuration planned (and every parameter name checked) before anything runs
    plans = {c.id: plan_pipeline(f"{run}/{c.id}", c.params, SWEEP_NOTEBOOKS, results_dir, baselines=())
             for c in configs}
    sweep_dir = results_dir / run
    sweep_dir.mkdir(parents=True, exist_ok=True)
    status = {}
    for i, c in enumerate(configs):
        name = f"{run}/{c.id}"
        done = all(finished(out, given) for _, out, given in plans[c.id])
        print(f"[sweep] {i + 1}/{len(configs)} {c.id}: {'already done, skipped' if done and not force else 'running'}")
        error_file = sweep_dir / c.id / "error.txt"
        try:
            run_pipeline(name, c.params, notebooks_to_run=SWEEP_NOTEBOOKS, force=force, results_dir=results_dir,
                         baselines=())
            status[c.id] = ("skipped" if done and not force else "done", "")
            error_file.unlink(missing_ok=True)
        except Exception as e:                 # recorded; the other configurations still run
            # a notebook's own error (papermill keeps its name and value), else the exception itself
            message = f"{e.ename}: {e.evalue}" if hasattr(e, "ename") else f"{type(e).__name__}: {e}"
            error_file.parent.mkdir(parents=True, exist_ok=True)
            error_file.write_text(traceback.format_exc())
            status[c.id] = ("failed", message[:500])
            print(f"[sweep] {c.id} failed: {status[c.id][1]} (details in {error_file})")
    table = sweep_table(sweep_dir, configs, status)
    write_csv(sweep_dir / "sweep.csv", table)
    return table


def sweep_table(sweep_dir: PathLike, configs: list[SweepConfig], status: Optional[dict] = None) -> pd.DataFrame:
    """One row per configuration x dataset x category (a failed configuration: one row with its
    error), with the configuration id, its status, every parameter and every metric as columns. A
    parameter that some configurations leave out holds the notebooks' default there."""
    sweep_dir, status = Path(sweep_dir), status or {}
    params = list(dict.fromkeys(k for c in configs for k in c.params))
    defaults = default_parameters()
    configs = [SweepConfig(c.id, c.overrides, {k: c.params.get(k, defaults.get(k)) for k in params}) for c in configs]
    frames = []
    for c in configs:
        state, error = status.get(c.id, ("", ""))
        folder = sweep_dir / c.id
        row = {"config_id": c.id, "status": state, "error": error,
               **{k: _show(c.params[k]) if isinstance(c.params.get(k), (list, dict)) else c.params.get(k)
                  for k in params}}
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
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
