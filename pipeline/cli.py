"""`eclipse-prior`: the command line of the pipeline. Each subcommand calls one stage's entry function."""

import argparse
import json
import sys

DESCRIPTION = """\
Train ECLIPSE text-to-image priors over a precomputed CLIP embedding store.

Stages (each one resumable; rerunning skips finished work):
  download    image-text pairs -> webdataset image shards (img2dataset)
  encode      image shards -> embedding store (decoder's CLIP encoders, Dask workers)
  precompute  download + encode in one go
  train       embedding store -> ECLIPSE / projection / diffusion prior
  store       look inside an embedding store
"""


def _cmd_store_inspect(args: argparse.Namespace) -> int:
    from storage_schema.inspect import format_report, inspect_store

    report = inspect_store(args.store, verify=not args.no_verify)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["problems"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eclipse-prior", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    store = sub.add_parser("store", help="look inside an embedding store")
    store_sub = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    insp = store_sub.add_parser(
        "inspect",
        help="rows, shards, dims, encoder, size and problems of a store",
        description="Validate a store (manifest, every shard, checksums, duplicate keys) and summarise it. "
        "Exit status 1 when problems are found.",
    )
    insp.add_argument("store", help="store directory (holds _manifest.json and *.parquet shards)")
    insp.add_argument("--json", action="store_true", help="print a JSON report (keys: rows, shards, image_dim, "
                      "text_dim, encoder, problems, ...)")
    insp.add_argument("--no-verify", action="store_true", help="skip re-hashing every shard (faster)")
    insp.set_defaults(func=_cmd_store_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
