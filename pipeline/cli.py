"""`eclipse-prior`: the command line of the pipeline. Each subcommand calls one stage's entry function."""

import argparse
import json
import os
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


def _add_encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True,
                   help="kandinsky22 | karlo | tiny-clip | open_clip:MODEL[/TAG] | an encoder folder")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--workers", type=int, default=None, help="local CPU Dask workers (default 1; GPUs: one each)")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (many machines)")
    p.add_argument("--wait-timeout", type=float, default=120.0, help="seconds to wait for Dask workers")


def _run_encode(args: argparse.Namespace, image_dir, store_dir) -> int:
    from pipeline.cluster import ClusterConfig
    from pipeline.encode import EncodeConfig, encode

    cfg = EncodeConfig(encoder=args.encoder, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    cluster = ClusterConfig(address=args.scheduler, n_workers=args.workers, wait_timeout=args.wait_timeout)
    summary = encode(image_dir, store_dir, cfg, cluster=cluster)
    print(summary.table())
    print(f"store {store_dir}: {summary.rows_written} rows written, {len(summary.already_done)} shards already done, "
          f"{len(summary.skipped)} samples skipped (reasons in _manifest.json)")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    return _run_encode(args, args.images, args.store)


def _cmd_train(args: argparse.Namespace) -> int:
    from training.config import cli_config
    from training.trainer import train

    flags = {k: getattr(args, k) for k in ("store", "out", "objective", "preset", "steps", "batch_size", "lr",
                                           "seed", "ema_decay", "device", "ckpt_every", "log_every")}
    flags["compile"] = True if args.compile else None
    print(train(cli_config(args.config, flags, args.set, args.resume)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_checkpoint

    print(export_checkpoint(args.ckpt, args.out, use_ema=args.ema))
    return 0


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

    enc = sub.add_parser(
        "encode",
        help="image shards -> embedding store (one Dask task per shard)",
        description="Encode every webdataset image shard in IMAGES with the decoder's CLIP encoders into the "
        "store. Finished shards are skipped, so a killed run resumes and a rerun is a no-op. Corrupt images "
        "and empty captions are skipped and recorded with their key and reason in the store manifest.",
    )
    enc.add_argument("images", help="folder of *.tar webdataset shards (the download stage's output)")
    enc.add_argument("--store", required=True, help="store directory to create or extend")
    _add_encode_args(enc)
    enc.set_defaults(func=_cmd_encode)

    tr = sub.add_parser(
        "train",
        help="train a prior on an embedding store",
        description="Train an ECLIPSE / projection / diffusion prior. Defaults are the paper's recipe (AdamW, lr 5e-5, "
        "CosineAnnealingWarmRestarts, batch 256 per process, 60,000 steps); precedence: defaults < --config file < "
        "flags < --set. Multi-GPU: torchrun --nproc_per_node N -m pipeline.cli train ... . RUN gets checkpoints/, "
        "logs/ (train.jsonl, tb/) and the exported prior/.",
    )
    tr.add_argument("--store", help="embedding store directory")
    tr.add_argument("--out", help="run folder RUN")
    tr.add_argument("--objective", choices=["eclipse", "projection", "diffusion"], help="default: eclipse")
    tr.add_argument("--preset", choices=["kandinsky22", "karlo", "tiny"], help="prior size and D; default kandinsky22")
    tr.add_argument("--steps", type=int, help="training steps (default 60000)")
    tr.add_argument("--config", help="YAML or JSON file of config keys (see training/config.py)")
    tr.add_argument("--resume", action="store_true", help="continue RUN from its newest complete checkpoint")
    tr.add_argument("--batch-size", type=int, help="per process (default 256)")
    tr.add_argument("--lr", type=float, help="learning rate (default 5e-5)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--ema", dest="ema_decay", type=float, metavar="DECAY", help="keep an EMA of the weights")
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"])
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (default 1000)")
    tr.add_argument("--log-every", type=int, help="log every N steps (default 10)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="any other config key, e.g. --set eclipse_tau=0.05 (repeatable)")
    tr.set_defaults(func=_cmd_train)

    exp = sub.add_parser(
        "export",
        help="export a checkpoint as a diffusers-style prior folder",
        description="Write config.json + diffusion_pytorch_model.safetensors + a README.md model card. CKPT is a "
        "checkpoint folder or a run folder (its newest complete checkpoint).",
    )
    exp.add_argument("ckpt", metavar="CKPT", help="checkpoint folder or run folder")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                     help="export the EMA weights (default: when the run kept them)")
    exp.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # stage errors are written for people; tracebacks on request
        if os.environ.get("ECLIPSE_PRIOR_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
