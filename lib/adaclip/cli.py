"""Command line: thin wrappers over the library functions the notebooks call.

    adaclip manifests                               rebuild data_manifests/ from the adapters
    adaclip manifest mvtec --root data --out m.csv  one manifest (any adapter, incl. `folder`)
    adaclip validate m.csv --root data              every problem in a manifest
    adaclip sources                                 where each dataset comes from
    adaclip download mvtec --root data              resumable, checksummed download + extract
    adaclip pipeline --run default                  run notebooks 00-03 with papermill
"""
from __future__ import annotations

import argparse
import sys


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
    from .data.download import fetch
    from .data.registry import resolve_root

    print(fetch(args.dataset, resolve_root(args.root)))
    return 0


def _pipeline(args) -> int:
    from .pipeline import run_pipeline

    params = dict(kv.split("=", 1) for kv in args.param)
    run_pipeline(args.run, params=params, notebooks_to_run=args.notebooks or None, force=args.force)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adaclip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("manifests", help="rebuild data_manifests/").set_defaults(fn=_manifests)

    m = sub.add_parser("manifest", help="write one manifest")
    m.add_argument("dataset")
    m.add_argument("--root", default=None, help="data root (path, 'sample' or 'shared'; default $ADACLIP_DATA_ROOT)")
    m.add_argument("--folder", default=None, help="folder under the root (default: the adapter's)")
    m.add_argument("--name", default=None, help="value of the dataset column")
    m.add_argument("--category", default=None, help="category name (folder adapter)")
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
    d.set_defaults(fn=_download)

    r = sub.add_parser("pipeline", help="run the notebooks headless with papermill")
    r.add_argument("--run", default="default", help="run name: results/<run>/")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="notebook parameter (repeatable), e.g. -p epochs=5")
    r.add_argument("--notebooks", nargs="*", help="subset of notebooks to run (default: all, in order)")
    r.add_argument("--force", action="store_true", help="rerun notebooks that already finished")
    r.set_defaults(fn=_pipeline)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
