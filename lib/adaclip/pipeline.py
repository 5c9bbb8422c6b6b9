"""Run the notebooks in order, headless, with papermill: ``make run`` / ``adaclip pipeline``.

Executed copies go to ``results/<run>/``; each notebook gets ``run_name`` plus those of the given
parameters that its ``parameters`` cell defines. A notebook whose executed copy finished with the
same parameters is skipped, so a killed pipeline resumes where it stopped (``force=True`` reruns all;
training itself resumes from its last epoch).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from .data.registry import REPO_ROOT, results_root

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebooks() -> list[Path]:
    """The numbered notebooks in reading order."""
    return sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def _coerce(value: str):
    """Command-line strings to literals: numbers, booleans, None, lists (json)."""
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return {"none": None, "true": True, "false": False}.get(str(value).lower(), value)


def _finished(path: Path, parameters: dict) -> bool:
    """The executed copy ran to the end with the same parameters."""
    if not path.is_file():
        return False
    nb = json.loads(path.read_text())
    meta = nb.get("metadata", {}).get("papermill", {})
    return "exception" in meta and not meta["exception"] and meta.get("parameters") == parameters and \
        all(c.get("metadata", {}).get("papermill", {}).get("status") == "completed"
            for c in nb.get("cells", []) if c.get("cell_type") == "code")


def run_pipeline(run: str = "default", params: Optional[dict] = None, notebooks_to_run: Optional[Iterable[str]] = None,
                 force: bool = False, kernel: str = "python3", results_dir: Optional[Path] = None,
                 **kwargs) -> list[Path]:
    import papermill as pm

    params = {k: _coerce(v) if isinstance(v, str) else v for k, v in (params or {}).items()}
    chosen = notebooks()
    if notebooks_to_run:
        wanted = list(notebooks_to_run)
        chosen = [p for p in chosen if p.name in wanted or p.stem in wanted or p.stem[:2] in wanted]
    results_dir = Path(results_dir or results_root()).resolve()
    params.setdefault("results_dir", str(results_dir))
    declared = {nb: list(pm.inspect_notebook(str(nb))) for nb in notebooks()}
    known = set().union(*declared.values()) if declared else set()
    unknown = sorted(set(params) - known - {"results_dir"})
    if unknown:
        raise ValueError(f"no notebook takes parameter(s) {unknown}; the parameters are {sorted(known)}")
    out_dir = results_dir / run
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for nb in chosen:
        out = out_dir / nb.name
        given = {"run_name": run, **{k: v for k, v in params.items() if k in declared[nb]}}
        if not force and _finished(out, given):
            print(f"[pipeline] {nb.name}: already done with these parameters in {out}, skipped (force=True reruns)")
            written.append(out)
            continue
        print(f"[pipeline] {nb.name} -> {out} with {given}")
        pm.execute_notebook(str(nb), str(out), parameters=given, kernel_name=kernel, cwd=str(NOTEBOOK_DIR),
                            progress_bar=False, **kwargs)
        written.append(out)
    return written
