"""Command line: thin wrappers over the library functions the notebooks call.

    adaclip manifests                               rebuild data_manifests/ from the adapters
    adaclip manifest mvtec --root data --out m.csv  one manifest (any adapter, incl. `folder`)
    adaclip validate m.csv --root data              every problem in a manifest
    adaclip sources                                 where each dataset comes from
    adaclip download mvtec --root data              resumable, checksummed download + extract
    adaclip download mvtec --root data --url URL    the same from another link (--sha256 HASH to check it)
    adaclip train --train sample/mvtec.csv --root sample --run r --backbone adaclip-tiny --pretrained none --image-size 64
    adaclip train --method aprilgan ...             any method (its paper's recipe unless options say otherwise)
    adaclip evaluate --checkpoint results/r/model.pt --test sample/visa.csv --root sample --run r
    adaclip pipeline --run default                  run notebooks 00-04 with papermill (+ aprilgan, winclip, clip beside it)
    adaclip sweep notebooks/params/ablations_tiny.yaml --run tiny   notebooks 01-02 per configuration, sweep.csv
    adaclip compare default default/baselines/clip  paired tests (bootstrap, DeLong, Holm), each run against the first
    adaclip predict imgs/ --checkpoint results/r/model.pt --class-name bottle --out preds [--masks]
    adaclip export --checkpoint results/r/model.pt --class-name bottle --out bottle.onnx
    adaclip benchmark [--method winclip] [--backbone ViT-B-16 ...]   speed and memory numbers
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _manifests(args) -> int:
    from .data.registry import regenerate

    for path in regenerate():
        print(path)
    return 0


def _manifest(args) -> int:
    from .data import build_manifest, check, write_manifest
    from .data.registry import resolve_root

    root = resolve_root(args.root)
    kwargs = {"category": args.category} if args.category else {}
    if args.strips:
        kwargs["strips"] = args.strips
    df = build_manifest(args.dataset, root, folder=args.folder, name=args.name, **kwargs)
    check(df, root, deep=not args.quick)
    write_manifest(df, args.out)
    print(f"{len(df)} rows -> {args.out}")
    return 0


def _validate(args) -> int:
    from .data import read_manifest, validate
    from .data.registry import resolve_manifest, resolve_root

    problems = validate(read_manifest(resolve_manifest(args.manifest)), resolve_root(args.root), deep=not args.quick)
    print("\n".join(problems) if problems else "ok")
    return 1 if problems else 0


def _sources(args) -> int:
    from .data.download import sources_table

    print(sources_table().to_string(index=False))
    return 0


def _download(args) -> int:
    from .data.download import DownloadError, fetch
    from .data.registry import resolve_root

    try:
        print(fetch(args.dataset, resolve_root(args.root), url=args.url, sha256=args.sha256))
    except DownloadError as e:
        print(f"adaclip download: {e}", file=sys.stderr)
        return 1
    return 0


def _model_cfg(args):
    """The method's config at its paper's setting with the options given on the command line."""
    from . import methods

    given = dict(backbone=args.backbone, pretrained=args.pretrained, image_size=args.image_size,
                 quick_gelu=args.quick_gelu, prompt_depth=args.prompt_depth, prompt_length=args.prompt_length,
                 prompt_type=args.prompt_type, prompt_branch=args.prompt_branch,
                 use_hsf=False if args.no_hsf else None, k_clusters=args.k_clusters)
    cfg, unused = methods.config_from_params(args.method, **given)
    stray = [k for k in unused if given[k] is not None]
    if stray:
        raise SystemExit(f"adaclip train: option(s) {stray} do not apply to method {args.method!r}")
    return cfg


def _train(args) -> int:
    from .data.registry import resolve_manifest, resolve_root, results_root
    from .train import train

    from . import methods

    cfg = methods.train_config(args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               selection=args.selection, checkpoint_activations=args.checkpoint_activations,
                               num_workers=args.workers, image_cache=args.image_cache)
    train(_model_cfg(args), cfg, [resolve_manifest(m) for m in args.train], resolve_root(args.root),
          results_root() / args.run, resume=args.resume, max_steps=args.max_steps,
          test_manifests=[resolve_manifest(m) for m in args.test] if args.test else None)
    print(f"model: {results_root() / args.run / 'model.pt'}")
    return 0


def _evaluate(args) -> int:
    from . import EvalCfg
    from .data.registry import resolve_manifest, resolve_root, results_root
    from .evaluate import evaluate

    from .data import read_manifests

    from . import distributed

    model = _load_model(args).to(distributed.default_device())
    rows = read_manifests([resolve_manifest(m) for m in args.test])
    test = rows[rows.split == args.test_split].reset_index(drop=True) if args.test_split else rows
    cfg = EvalCfg(batch_size=args.batch_size, save_maps=args.save_maps, k_shot=args.k_shot, shot_seed=args.shot_seed,
                  aupro_cflow=not args.no_aupro_cflow, num_workers=args.workers, bootstrap=args.bootstrap,
                  bootstrap_seed=args.bootstrap_seed)
    result = evaluate(model, test, resolve_root(args.root), cfg, run_dir=results_root() / args.run, references=rows)
    if distributed.is_main():
        from .analysis import metrics_view

        view = metrics_view(result.metrics)          # percent, each with its 95% interval [lo, hi]
        print(view.data.to_string(index=False))
        print(view.caption)
    return 0


def _compare(args) -> int:
    import pandas as pd

    from .compare import compare_many, verdict
    from .data.registry import results_root
    from .io import write_csv
    from .metric_keys import METRIC_KEYS

    table = compare_many(results_root(), args.runs, args.metrics or METRIC_KEYS)
    out = Path(args.out) if args.out else results_root() / args.runs[0] / "compare.csv"
    write_csv(out, table)
    shown = table.assign(verdict=table.apply(verdict, axis=1))
    for col in ("a", "b", "difference", "difference_lo", "difference_hi"):
        shown[col] = shown[col] * 100
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(shown.drop(columns=["run_a"]).round({"a": 1, "b": 1, "difference": 2, "difference_lo": 2,
                                                   "difference_hi": 2, "p_value": 4, "p_holm": 4, "delong_p": 4,
                                                   "delong_p_holm": 4}).to_string(index=False))
    print(f"\nA = {args.runs[0]}; values in percent; p: paired bootstrap, Holm-corrected across datasets "
          f"(p_holm); image AUROC also DeLong. Written to {out}")
    return 0


def _checkpoint_arguments(parser) -> None:
    """The options `_load_model` reads: a checkpoint of ours, or a method's official file and its setting."""
    from .methods import available

    parser.add_argument("--checkpoint", required=True, help="a run's model.pt, or an official file with --official")
    parser.add_argument("--official", action="store_true", help="a release file of the method's reference code")
    parser.add_argument("--method", default="adaclip", choices=available(),
                        help="with --official: whose release file it is (default adaclip)")
    parser.add_argument("--backbone", default=None, help="with --official: the file's backbone (default: the method's)")
    parser.add_argument("--image-size", type=int, default=None, help="with --official: the file's input size")
    parser.add_argument("--pretrained", default=None,
                        help="CLIP weights, a file or tag: replaces the checkpoint's (--official: the method's tag)")
    _activation_arguments(parser, "with --official: ")


def _activation_arguments(parser, when: str = "") -> None:
    """``quick_gelu``: None (the method's default) unless one of the two flags says otherwise."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick-gelu", dest="quick_gelu", action="store_true", default=None,
                       help=f"{when}QuickGELU activation (default: the method's, AdaCLIP exact GELU as its reference ran)")
    group.add_argument("--gelu", dest="quick_gelu", action="store_false", help=f"{when}exact GELU activation")


def _load_model(args):
    """Our checkpoint, or an official release file built with the given (default: its paper's) setting."""
    from . import methods

    if args.official:
        backbone = {k: v for k, v in dict(name=args.backbone, pretrained=args.pretrained, image_size=args.image_size,
                                          quick_gelu=args.quick_gelu).items() if v is not None}
        return methods.from_official(args.method, args.checkpoint, backbone=backbone)
    return methods.load(args.checkpoint, **({"pretrained": args.pretrained} if args.pretrained else {}))


def _predict(args) -> int:
    from .methods import CheckpointError
    from .predict import Thresholds, collect_images, predict_files, stored_thresholds
    from .predictor import Predictor

    try:
        files = collect_images(args.inputs)
        thresholds = stored_thresholds(args.checkpoint, args.class_name)
        if args.threshold is not None:
            thresholds = Thresholds(args.threshold, thresholds.pixel if thresholds else args.threshold, "--threshold")
        if thresholds is None:
            raise ValueError(f"no decision threshold: {args.checkpoint} has no thresholds.json beside it (evaluate "
                             f"the model first: notebook 02 or `adaclip evaluate`), so pass --threshold T")
        if args.pixel_threshold is not None:
            thresholds.pixel = args.pixel_threshold
        model = _load_model(args)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"adaclip predict: {e}", file=sys.stderr)
        return 2
    print(f"image threshold {thresholds.image:.4g}, pixel threshold {thresholds.pixel:.4g} from {thresholds.source}")
    if model.random_weights:
        print("random backbone weights: these scores say nothing about detection quality")
    predictor = Predictor(model.to(args.device), batch_size=args.batch_size)
    table, failures = predict_files(predictor, files, args.class_name, args.out, thresholds, masks=args.masks)
    for message in failures:
        print(f"skipped: {message}", file=sys.stderr)
    print(f"{len(table)} image(s) scored, {int(table.decision.sum())} anomalous -> {Path(args.out) / 'predictions.csv'}"
          + (f"; {len(failures)} file(s) could not be read" if failures else ""))
    return 1 if failures else 0


def _export(args) -> int:
    import torch

    from .export import compare_with_torch, export_onnx, uses_hsf
    from .methods import CheckpointError

    try:
        model = _load_model(args)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"adaclip export: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"adaclip-{args.class_name}.onnx")
    if uses_hsf(model):
        print("HSF is exported exactly: its k-means runs all of its Lloyd steps in the graph")
    export_onnx(model, args.class_name, out, batch_size=args.batch_size)
    size = model.image_size
    diffs = compare_with_torch(out, model, torch.rand(args.batch_size, 3, size, size) * 4 - 2)
    print(f"{out}: images ({args.batch_size}, 3, {size}, {size}) -> image_scores, anomaly_maps; largest difference "
          f"from PyTorch: scores {diffs['image_scores']:.2e}, maps {diffs['anomaly_maps']:.2e}")
    return 0


def _pipeline(args) -> int:
    from .pipeline import run_pipeline

    params = {}
    if args.params_file:
        import yaml

        try:
            loaded = yaml.safe_load(open(args.params_file)) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SystemExit(f"cannot read parameters file {args.params_file}: {e}")
        if not isinstance(loaded, dict):
            raise SystemExit(f"parameters file {args.params_file} must be a mapping of name: value")
        params.update(loaded)
    params.update(dict(kv.split("=", 1) for kv in args.param))
    run_pipeline(args.run, params=params, notebooks_to_run=args.notebooks or None, force=args.force,
                 baselines=args.baselines, jobs=args.jobs)
    return 0


def _sweep(args) -> int:
    from .sweep import run_sweep

    slurm = {"partition": args.partition, "time_min": args.time_min, "gpus_per_job": args.gpus_per_job}
    table = run_sweep(args.file, args.run, force=args.force, jobs=args.jobs, launcher=args.launcher, slurm=slurm)
    status = table.drop_duplicates("config_id").set_index("config_id")["status"]
    print(status.to_string())
    failed = status[status == "failed"]
    if len(failed):
        print(f"{len(failed)} configuration(s) failed; their errors are in sweep.csv and <config>/error.txt")
    return 1 if len(failed) else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["benchmark"]:                      # its own argument parser
        from .benchmark import main as benchmark

        benchmark(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="adaclip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("manifests", help="rebuild data_manifests/").set_defaults(fn=_manifests)

    m = sub.add_parser("manifest", help="write one manifest")
    m.add_argument("dataset")
    m.add_argument("--root", default=None, help="data root (path, 'sample' or 'shared'; default $ADACLIP_DATA_ROOT)")
    m.add_argument("--folder", default=None, help="folder under the root (default: the adapter's)")
    m.add_argument("--name", default=None, help="value of the dataset column")
    m.add_argument("--category", default=None, help="category name (folder adapter)")
    m.add_argument("--strips", type=int, default=None,
                   help="ksdd: one row per horizontal part of each image (3 = the reference's cut)")
    m.add_argument("--out", required=True)
    m.add_argument("--quick", action="store_true", help="check headers only, do not decode every file")
    m.set_defaults(fn=_manifest)

    v = sub.add_parser("validate", help="check a manifest and its files")
    v.add_argument("manifest")
    v.add_argument("--root", default=None)
    v.add_argument("--quick", action="store_true")
    v.set_defaults(fn=_validate)

    sub.add_parser("sources", help="where each dataset comes from").set_defaults(fn=_sources)

    d = sub.add_parser("download", help="download and extract a dataset")
    d.add_argument("dataset")
    d.add_argument("--root", default=None)
    d.add_argument("--url", default=None, help="download from this link instead of the known ones (e.g. a mirror)")
    d.add_argument("--sha256", default=None,
                   help="expected sha256 of the archive (default: the published one; '' skips the check)")
    d.set_defaults(fn=_download)

    from .methods import available
    from .pipeline import DEFAULT_BASELINES

    t = sub.add_parser("train", help="train a method on annotated manifests (training-free methods: a run folder)")
    t.add_argument("--train", nargs="+", required=True, help="training manifests (e.g. sample/mvtec.csv)")
    t.add_argument("--test", nargs="*", help="test manifests: only checked for overlap")
    t.add_argument("--root", default=None)
    t.add_argument("--run", "--run-name", dest="run", required=True,
                   help="results/<run>/ (under torchrun write --run-name: torchrun takes --run for its --run-path)")
    t.add_argument("--method", default="adaclip", choices=available())
    t.add_argument("--backbone", default=None, help="open_clip ViT (default: the method's, e.g. ViT-L-14-336)")
    t.add_argument("--pretrained", default=None, help="open_clip tag, weights file, or 'none' (default: the method's)")
    t.add_argument("--image-size", type=int, default=None)
    t.add_argument("--prompt-depth", type=int, default=None, help="adaclip (default 4)")
    t.add_argument("--prompt-length", type=int, default=None, help="adaclip (default 5)")
    t.add_argument("--prompt-type", default=None, help="adaclip: S, D or SD (default)")
    t.add_argument("--prompt-branch", default=None, help="adaclip: V, L or VL (default)")
    t.add_argument("--no-hsf", action="store_true", help="adaclip: no Hybrid Semantic Fusion")
    t.add_argument("--k-clusters", type=int, default=None, help="adaclip (default 20)")
    _activation_arguments(t)
    t.add_argument("--epochs", type=int, default=None, help="default: the method's recipe (adaclip 5, aprilgan 3)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--selection", default=None, choices=["last", "val", "test_f1"])
    t.add_argument("--resume", action="store_true")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    t.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute the frozen blocks in backward: same gradients, less memory")
    t.add_argument("--workers", type=int, default=None, help="loader worker processes (default: one per core)")
    t.add_argument("--image-cache", default=None, choices=["memory", "disk", "off"],
                   help="decoded, resized images kept for later epochs (default memory, 2 GiB)")
    t.set_defaults(fn=_train)

    e = sub.add_parser("evaluate", help="zero-shot evaluation of a checkpoint")
    _checkpoint_arguments(e)
    e.add_argument("--test", nargs="+", required=True)
    e.add_argument("--root", default=None)
    e.add_argument("--run", "--run-name", dest="run", required=True,
                   help="results/<run>/ (under torchrun write --run-name: torchrun takes --run for its --run-path)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--save-maps", action="store_true")
    e.add_argument("--workers", type=int, default=None, help="loader worker processes (default: one per core)")
    e.add_argument("--no-aupro-cflow", action="store_true",
                   help="skip the cflow-style AUPRO (the variant AnomalyCLIP and Crane publish)")
    e.add_argument("--test-split", default="test", help="rows of this split are evaluated ('' for all)")
    e.add_argument("--k-shot", type=int, default=0, help="few-shot: normal references per category from the "
                                                          "manifests' train split (0: zero-shot)")
    e.add_argument("--shot-seed", type=int, default=0)
    e.add_argument("--bootstrap", type=int, default=1000,
                   help="replicates of the 95%% intervals over test images (default 1000; 0: none)")
    e.add_argument("--bootstrap-seed", type=int, default=0,
                   help="which images the replicates draw; runs compared must share it (default 0)")
    e.set_defaults(fn=_evaluate)

    c = sub.add_parser("compare", help="paired tests of runs evaluated on the same images: each against the first")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run names under results/ (RUN_A RUN_B [RUN_C ...])")
    c.add_argument("--metrics", nargs="*", default=None, help="metrics to compare (default: all reported)")
    c.add_argument("--out", default=None, help="CSV path (default: results/<RUN_A>/compare.csv)")
    c.set_defaults(fn=_compare)

    q = sub.add_parser("predict", help="score your own images: overlays, masks, predictions.csv")
    q.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    _checkpoint_arguments(q)
    q.add_argument("--class-name", required=True, help="what the images show; it fills the text prompts")
    q.add_argument("--threshold", type=float, default=None,
                   help="image-score threshold (default: evaluation's F1-optimal one, thresholds.json)")
    q.add_argument("--pixel-threshold", type=float, default=None, help="mask threshold (default: evaluation's)")
    q.add_argument("--out", default="predictions", help="output folder")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--masks", action="store_true", help="also write binary mask PNGs")
    q.add_argument("--device", default="cpu")
    q.set_defaults(fn=_predict)

    x = sub.add_parser("export", help="export the inference graph for one class name to ONNX")
    _checkpoint_arguments(x)
    x.add_argument("--class-name", required=True)
    x.add_argument("--out", default=None, help="default: adaclip-<class name>.onnx")
    x.add_argument("--batch-size", type=int, default=1, help="the graph's fixed batch size")
    x.set_defaults(fn=_export)

    r = sub.add_parser("pipeline", help="run the notebooks headless with papermill")
    r.add_argument("--run", default="default", help="run name: results/<run>/")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="notebook parameter (repeatable), e.g. -p epochs=5")
    r.add_argument("--params-file", default=None, help="YAML file of notebook parameters (e.g. notebooks/params/paper.yaml)")
    r.add_argument("--notebooks", nargs="*", help="subset of notebooks to run (default: all, in order)")
    r.add_argument("--force", action="store_true", help="rerun notebooks that already finished")
    r.add_argument("--baselines", nargs="*", default=list(DEFAULT_BASELINES), choices=available(),
                   help="methods run beside it (notebooks 01, 02 into <run>/baselines/<name>) and compared "
                        f"in 03; default: {' '.join(DEFAULT_BASELINES)}; give none to skip")
    r.add_argument("--jobs", type=int, default=None,
                   help="notebook chains (the run's, each baseline's) at once; default: the cores + 2 on a CPU, 1 "
                        "with a GPU")
    r.set_defaults(fn=_pipeline)

    w = sub.add_parser("sweep", help="run notebooks 01 and 02 for every configuration of a sweep file")
    w.add_argument("file", help="YAML: base, grid and/or configs (e.g. notebooks/params/ablations_tiny.yaml)")
    w.add_argument("--run", required=True, help="results/<run>/<config-id>/ and results/<run>/sweep.csv")
    w.add_argument("--force", action="store_true", help="rerun configurations that already finished")
    w.add_argument("--jobs", type=int, default=1, help="configurations at once: one per GPU, or N CPU processes")
    w.add_argument("--launcher", default="processes", choices=["processes", "slurm", "submitit-local"],
                   help="slurm: one Slurm job per configuration through submitit")
    w.add_argument("--partition", default=None, help="slurm: partition")
    w.add_argument("--time-min", type=int, default=240, help="slurm: time limit per job in minutes")
    w.add_argument("--gpus-per-job", type=int, default=1, help="slurm: GPUs per job")
    w.set_defaults(fn=_sweep)

    args = p.parse_args(argv)
    if args.command in ("train", "evaluate"):
        from . import distributed

        distributed.init_from_env()          # under torchrun: join its process group (no-op otherwise)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
