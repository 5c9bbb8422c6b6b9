"""Run the notebooks in order, headless, with papermill: ``make run`` / ``adaclip pipeline``.

Executed copies go to ``results/<run>/``; each notebook gets ``run_name`` plus those of the given
parameters that its ``parameters`` cell defines. A notebook whose executed copy finished with the
same parameters is skipped, so a killed pipeline resumes where it stopped (``force=True`` reruns all;
training itself resumes from its last epoch).

``baselines`` (default: APRIL-GAN, WinCLIP and zero-shot CLIP) run notebooks 01 and 02 again with
``method=<baseline>`` into ``results/<run>/baselines/<baseline>/``, and notebook 03 compares them
with the run. After 00, the run's own notebooks (01, 02, 04) and each baseline's (01, 02) are
independent, so ``jobs`` notebooks run at once (default: the cores + 2 on a CPU, one with a GPU), and
03 starts once every run's 01 and 02 are done; a line per notebook says what started and what
finished. Kernels talk over IPC sockets (no unencrypted TCP, no kernel warning in the log).
"""
from __future__ import annotations

import atexit
import functools
import glob
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterable, Optional, Sequence

from jupyter_client.manager import AsyncKernelManager
from traitlets import default

from .data.registry import REPO_ROOT, results_root
from .runs import BASELINE_DIR

# the notebooks live in the repository (notebooks/); an installed package is pointed at a clone's
NOTEBOOK_DIR = Path(os.environ.get("ADACLIP_NOTEBOOK_DIR") or REPO_ROOT / "notebooks")
# the methods run beside a run (notebooks 01 and 02 into <run>/baselines/<method>/) and compared with it
DEFAULT_BASELINES = ("aprilgan", "winclip", "clip")


class IPCKernelManager(AsyncKernelManager):
    """Notebook kernels on local IPC sockets in a private temporary folder instead of TCP ports."""

    @default("transport")
    def _default_transport(self):
        return "ipc"

    @default("ip")
    def _default_ip(self):
        # a folder per kernel: kernels started at once from several threads never pick the same sockets
        return os.path.join(tempfile.mkdtemp(dir=_socket_dir()), "kernel")

    async def _async_launch_kernel(self, kernel_cmd, **kw):
        # figures inline in the executed copies, whatever backend the caller's environment names
        # (MPLBACKEND=Agg would leave every figure cell of results/<run>/*.ipynb without its figure)
        kw["env"] = {**(kw.get("env") or os.environ), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
                     **getattr(_kernel_env, "extra", {})}
        return await super()._async_launch_kernel(kernel_cmd, **kw)

    async def _async_interrupt_kernel(self):
        # jupyter_client interrupts every kernel before shutting it down; papermill shuts down only
        # idle kernels (a timed-out cell was interrupted already), and an idle kernel that receives
        # SIGINT logs "KeyboardInterrupt caught in kernel": skip that interrupt, keep all others
        if self.shutting_down:
            return
        await super()._async_interrupt_kernel()

    @default("shutdown_wait_time")
    def _default_shutdown_wait_time(self):
        # a kernel that frees a model takes a few seconds to exit on a busy machine; the default 5 s
        # ends in an interrupt and "KeyboardInterrupt caught in kernel" in the log
        return 30.0


_kernel_env = threading.local()      # extra environment of the kernels this thread starts


@functools.lru_cache(maxsize=None)
def _socket_dir() -> str:
    path = tempfile.mkdtemp(prefix="adaclip-kernels-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def notebooks() -> list[Path]:
    """The numbered notebooks in reading order."""
    found = sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no notebooks in {NOTEBOOK_DIR}: the pipeline runs the repository's notebooks/; "
                                f"from an installed package set ADACLIP_NOTEBOOK_DIR to a clone's notebooks/ folder")
    return found


def coerce(value: str):
    """Command-line strings to literals: numbers, booleans, None, lists (json)."""
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return {"none": None, "true": True, "false": False}.get(str(value).lower(), value)


def finished(path: Path, parameters: dict) -> bool:
    """The executed copy ran to the end with the same parameters: every code cell completed and
    actually started (a kernel that died leaves the cells after it "completed" without a start time
    and no exception in papermill's metadata)."""
    if not path.is_file():
        return False
    nb = json.loads(path.read_text())
    meta = nb.get("metadata", {}).get("papermill", {})
    cells = [c.get("metadata", {}).get("papermill", {}) for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    return "exception" in meta and not meta["exception"] and meta.get("parameters") == parameters and \
        all(c.get("status") == "completed" and c.get("start_time") for c in cells)


def declared_parameters() -> dict[Path, list[str]]:
    """Each notebook's parameter names, as papermill reads its ``parameters`` cell."""
    import papermill as pm

    return {nb: list(pm.inspect_notebook(str(nb))) for nb in notebooks()}


def default_parameters() -> dict:
    """Every notebook parameter's default value, as its ``parameters`` cell sets it."""
    import ast

    import papermill as pm

    defaults = {}
    for nb in notebooks():
        for name, info in pm.inspect_notebook(str(nb)).items():
            try:
                defaults.setdefault(name, ast.literal_eval(info["default"]))
            except (ValueError, SyntaxError):
                defaults.setdefault(name, info["default"])
    return defaults


def check_parameters(params: dict, declared: Optional[dict] = None) -> None:
    """A parameter no notebook takes is an error (a typo would otherwise be silently dropped)."""
    declared = declared or declared_parameters()
    known = set().union(*declared.values()) if declared else set()
    unknown = sorted(set(params) - known - {"results_dir"})
    if unknown:
        raise ValueError(f"no notebook takes parameter(s) {unknown}; the parameters are {sorted(known)}")


def plan_pipeline(run: str = "default", params: Optional[dict] = None, notebooks_to_run: Optional[Iterable[str]] = None,
                  results_dir: Optional[Path] = None, baselines: Sequence[str] = DEFAULT_BASELINES) -> list[tuple]:
    """What `run_pipeline` would execute: (notebook, executed copy, parameters it gets), in order.
    Raises ValueError for a parameter no notebook takes."""
    params = {k: coerce(v) if isinstance(v, str) else v for k, v in (params or {}).items()}
    chosen = notebooks()
    if notebooks_to_run:
        wanted = list(notebooks_to_run)
        chosen = [p for p in chosen if p.name in wanted or p.stem in wanted or p.stem[:2] in wanted]
    results_dir = Path(results_dir or results_root()).resolve()
    params.setdefault("results_dir", str(results_dir))
    declared = declared_parameters()
    check_parameters(params, declared)
    # a sweep's analysis compares the sweep's own configurations: no baselines of its own
    baseline_runs = [] if params.get("sweep") else \
        [f"{run}/{BASELINE_DIR}/{b}" for b in baselines if b != params.get("method", "adaclip")]
    if baseline_runs and "runs" not in params:
        params["runs"] = [run, *baseline_runs]             # notebook 03 compares the run with its baselines

    # the run's notebooks, then 01 and 02 for each baseline, then the analysis (03), which reads them all
    analysis = [nb for nb in chosen if nb.name.startswith("03")]
    main = [nb for nb in chosen if nb not in analysis]
    jobs = [(nb, run, params) for nb in main]
    jobs += [(nb, b_run, {**params, "method": b_run.rsplit("/", 1)[1]})
             for b_run in baseline_runs for nb in main if nb.name[:2] in ("01", "02")]
    jobs += [(nb, run, params) for nb in analysis]
    return [(nb, results_dir / name / nb.name, {"run_name": name, **{k: v for k, v in values.items() if k in declared[nb]}})
            for nb, name, values in jobs]


def run_pipeline(run: str = "default", params: Optional[dict] = None, notebooks_to_run: Optional[Iterable[str]] = None,
                 force: bool = False, kernel: str = "python3", results_dir: Optional[Path] = None,
                 baselines: Sequence[str] = DEFAULT_BASELINES, jobs: Optional[int] = None, **kwargs) -> list[Path]:
    """Execute `plan_pipeline`'s notebooks, ``jobs`` at once (None: `_default_jobs`; 1: one by one, in
    the plan's order), each as soon as what it reads is there: 00 first; then each run's own notebooks
    in order (the run: 01, 02, 04; each baseline: 01, 02); the analysis (03) once every run's 01 and 02
    have finished (not waiting for 04). A notebook already finished with the same parameters is
    skipped. After an error nothing new starts; the notebooks running finish, then the first error is
    raised. Returns the executed copies, in the plan's order."""
    import papermill as pm

    plan = plan_pipeline(run, params, notebooks_to_run, results_dir, baselines)
    needs: list[set] = []
    for k, (nb, _, given) in enumerate(plan):
        earlier = range(k)
        if nb.name.startswith("03"):                          # compares the runs: their 01 and 02
            needs.append({j for j in earlier if plan[j][0].name[:2] in ("00", "01", "02")})
        else:                                                # its own run's notebooks before it, and 00
            needs.append({j for j in earlier if plan[j][2]["run_name"] == given["run_name"]
                          or plan[j][0].name[:2] == "00"})
    runs = list(dict.fromkeys(given["run_name"] for _, _, given in plan))
    jobs = max(1, min(jobs or _default_jobs(), len(runs)))
    total, lock, start = len(plan), threading.Lock(), time.perf_counter()

    def say(text: str) -> None:
        with lock:
            print(f"[pipeline {time.perf_counter() - start:5.0f}s] {text}", flush=True)

    def execute(k: int) -> Path:
        nb, out, given = plan[k]
        # kernels running beside each other share the cores instead of each taking all of them
        _kernel_env.extra = {"OMP_NUM_THREADS": str(max(1, _cores() // jobs))} if jobs > 1 else {}
        out.parent.mkdir(parents=True, exist_ok=True)
        where = f"{k + 1}/{total} {nb.name} ({given['run_name']})"
        if not force and finished(out, given):
            say(f"{where}: already done with these parameters, skipped (force=True reruns)")
            return out
        say(f"{where} started -> {out}")
        began = time.perf_counter()
        pm.execute_notebook(str(nb), str(out), parameters=given, kernel_name=kernel, cwd=str(NOTEBOOK_DIR),
                            progress_bar=False, kernel_manager_class=IPCKernelManager, **kwargs)
        say(f"{where} finished in {time.perf_counter() - began:.1f} s")
        return out

    if jobs > 1:
        say(f"{len(plan)} notebooks of {len(runs)} runs ({', '.join(runs)}), {jobs} at once")
    futures: dict = {}
    done: set = set()
    error = None
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pipeline") as pool:
        while len(done) < len(plan):
            if error is None:                                # start what is ready, in the plan's order
                for k in range(len(plan)):
                    if k not in futures and needs[k] <= done:
                        futures[k] = pool.submit(execute, k)
            running = [f for k, f in futures.items() if k not in done]
            if not running:
                break
            finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
            for k, f in futures.items():
                if f in finished_now:
                    done.add(k)
                    if f.exception() is not None and error is None:
                        error = f.exception()
    if error is not None:
        raise error
    return [plan[k][1] for k in sorted(done)]


def _default_jobs() -> int:
    """Notebooks at once: on the CPU two more than the cores (a kernel's start and imports leave a core
    idle part of the time; measured on 2 cores, `make run`: 94 s at 2, 81 s at 4); one where an NVIDIA
    GPU is visible, since the kernels would share its memory (``jobs=N`` asks for more)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu = visible not in ("", "-1") and bool(glob.glob("/dev/nvidia[0-9]*"))
    return 1 if gpu else _cores() + 2


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
