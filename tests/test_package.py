"""The package as a user installs it: a wheel that carries every file the code reads at run time,
and modules that import each other without cycles."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import adaclip

LIB = Path(adaclip.__file__).resolve().parents[1]            # lib/, the source tree
REPO = LIB.parent
TINY = ["--backbone", "adaclip-tiny", "--pretrained", "none", "--image-size", "32", "--prompt-depth", "2",
        "--prompt-length", "2", "--k-clusters", "3"]


def _module_graph() -> dict[str, set[str]]:
    """adaclip's modules -> the adaclip modules each imports (at the top or inside a function). A
    ``from package import name`` counts the submodule ``name`` when there is one, else the package."""
    files = {}
    for path in (LIB / "adaclip").rglob("*.py"):
        parts = list(path.relative_to(LIB).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = (path, package if path.name != "__init__.py" else parts)
    graph = {}
    for name, (path, package) in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                deps.update(subs if len(subs) == len(node.names) else [*subs, base])
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _module_graph()
    assert "adaclip.precision" in graph["adaclip.fewshot"] and "adaclip.evaluate" not in graph["adaclip.fewshot"]
    assert _cycles(graph) == []
    # the check itself: a cycle put in is found
    graph["adaclip.precision"] = graph["adaclip.precision"] | {"adaclip.evaluate"}
    assert ["adaclip.evaluate", "adaclip.fewshot", "adaclip.precision"] in _cycles(graph)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel `pip wheel .` builds, installed without dependencies into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"                  # a copy: setuptools builds in the tree (build/, egg-info)
    shutil.copytree(LIB / "adaclip", source / "lib" / "adaclip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(out / "dist")], capture_output=True, text=True, cwd=out)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (out / "dist").glob("adaclip-*.whl")
    target = out / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return wheel, target


def test_the_wheel_ships_every_file_the_code_reads(installed):
    wheel, target = installed
    assert wheel.name == f"adaclip-{adaclip.__version__}-py3-none-any.whl"
    shipped = {p.relative_to(target / "adaclip").as_posix() for p in (target / "adaclip").rglob("*") if p.is_file()
               and "__pycache__" not in p.parts}
    source = {p.relative_to(LIB / "adaclip").as_posix() for p in (LIB / "adaclip").rglob("*") if p.is_file()
              and "__pycache__" not in p.parts}
    assert source <= shipped, sorted(source - shipped)[:10]
    assert {"backbone/configs/adaclip-tiny.json", "published/results.csv", "data/sample/README.md"} <= shipped


@pytest.mark.slow
def test_the_installed_wheel_trains_and_evaluates_the_sample(installed, tmp_path):
    """From the installed copy alone (the source tree off the path, another working folder): train the
    tiny model on the embedded sample and evaluate it, through the CLI, as `make run`'s default would."""
    _, target = installed
    boot = ("import sys; sys.path[:] = [p for p in sys.path if p.rstrip('/') != {lib!r}]; "
            "import adaclip; assert adaclip.__file__.startswith({target!r}), adaclip.__file__; "
            "from adaclip import cli; sys.exit(cli.main(sys.argv[1:]))").format(lib=str(LIB), target=str(target))
    env = {k: v for k, v in os.environ.items() if k not in ("ADACLIP_RESULTS_DIR",)}
    env.update(PYTHONPATH=str(target), ADACLIP_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")

    def cli(*args):
        done = subprocess.run([sys.executable, "-c", boot, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    cli("train", "--train", "sample/mvtec.csv", "--root", "sample", "--run-name", "w", "--epochs", "1", *TINY)
    cli("evaluate", "--checkpoint", "results/w/model.pt", "--test", "sample/visa.csv", "sample/headct.csv",
        "--root", "sample", "--run-name", "w")
    metrics = pd.read_csv(tmp_path / "results" / "w" / "metrics.csv")
    assert {"visa", "headct"} <= set(metrics.dataset) and metrics.image_auroc.notna().any()
    config = json.loads((tmp_path / "results" / "w" / "config.json").read_text())
    assert config["backbone_weights"] == "random"
    assert (tmp_path / "cache" / "manifests" / "sample" / "visa.csv").is_file()     # built from the adapter
