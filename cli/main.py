"""`eclipse-prior`: the command line of the pipeline. Each subcommand calls one stage's entry function."""

import argparse
import json
import os
import sys

from pipeline.families import DEFAULT_FAMILY, FAMILIES

DESCRIPTION = """\
Train ECLIPSE text-to-image priors over a precomputed CLIP embedding store.

Stages (each one resumable; rerunning skips finished work):
  download    url list -> webdataset image shards (img2dataset)
  encode      image shards -> embedding store (decoder's CLIP encoders, Dask workers)
  precompute  download + encode in one go
  train       embedding store -> ECLIPSE / projection / diffusion prior
  export      a training checkpoint -> a prior folder in the released ECLIPSE layout
  evaluate    priors + store -> metrics.json and report.html
  generate    prompt -> image through a prior and a decoder
  demo        all of it on a synthetic world, on a CPU (the README's main command)
  reproduce   the paper's Table 2: every objective x seed on every dataset x decoder, one table
  serve       run the Prefect deployments (precompute/<dataset>, train, evaluate, retrain)
  store       look inside an embedding store
  plan        what a grid of precomputes and trainings will cost (rows, GB, GPU-hours), before it runs
"""


def _cmd_store_inspect(args: argparse.Namespace) -> int:
    from storage_schema.inspect import format_report, inspect_store

    report = inspect_store(args.store, verify=not args.no_verify)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["problems"] else 0


def _add_encode_args(p: argparse.ArgumentParser) -> None:
    from pipeline.cluster import ClusterConfig
    from pipeline.encode import EncodeConfig
    from training.config import config_default

    batch, wait = config_default(EncodeConfig, "batch_size"), config_default(ClusterConfig, "wait_timeout")
    p.add_argument("--encoder", required=True,
                   help=f"{' | '.join(FAMILIES)} | tiny-clip | open_clip:MODEL[/TAG] | an encoder folder")
    p.add_argument("--batch-size", type=int, default=batch, help=f"images per model call (default {batch})")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--workers", type=int, default=None, help="local CPU Dask workers (default 1; GPUs: one each)")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (many machines)")
    p.add_argument("--wait-timeout", type=float, default=wait,
                   help=f"seconds to wait for Dask workers (default {wait:g})")


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


def _add_download_args(p: argparse.ArgumentParser) -> None:
    from pipeline.download import DownloadConfig
    from training.config import config_default

    def d(name: str):
        return config_default(DownloadConfig, name)

    p.add_argument("--image-size", dest="image_size", type=int, default=d("image_size"),
                   help=f"stored image side in pixels (default {d('image_size')})")
    p.add_argument("--resize-mode", dest="resize_mode", default=d("resize_mode"),
                   help=f"img2dataset resize mode (default {d('resize_mode')})")
    p.add_argument("--processes", type=int, default=None, help="download processes (default: one per core)")
    p.add_argument("--threads", dest="thread_count", type=int, default=d("thread_count"),
                   help=f"download threads per process (default {d('thread_count')})")
    p.add_argument("--shard-size", dest="number_sample_per_shard", type=int, default=d("number_sample_per_shard"),
                   help=f"samples per shard (default {d('number_sample_per_shard')})")
    p.add_argument("--timeout", dest="timeout", type=int, default=d("timeout"),
                   help=f"seconds per network read of a url (default {d('timeout')})")
    p.add_argument("--max-download-seconds", type=float, default=None,
                   help="one url's whole download: connect, headers, body (default 3 x --timeout)")
    p.add_argument("--max-image-mib", type=int, default=d("max_image_bytes") >> 20, help="a larger image body is "
                   f"dropped as it arrives (default {d('max_image_bytes') >> 20}, the encode stage's limit for a tar's "
                   "image member)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming (wipes the folder)")
    p.add_argument("--metadata-dir", default=None,
                   help="a preset's files downloaded by hand (any names matching the preset's glob, e.g. *.parquet "
                   "or cc3m-train-*.tar; subfolders too): used instead of fetching them")
    p.add_argument("--max-error-rate", dest="max_error_rate", type=float, default=d("max_error_rate"),
                   help=f"fail when more than this fraction of the urls could not be fetched (default "
                   f"{d('max_error_rate')})")
    p.add_argument("--url-col", default=None, help="the url list's url column (default: guessed from url, URL, "
                   "link, ...; the guess is logged)")
    p.add_argument("--caption-col", default=None, help="the url list's caption column (default: guessed from "
                   "caption, TEXT, ...)")
    p.add_argument("--allow-local-files", action="store_true",
                   help="also download url rows that are not http(s) (file://, local paths); without it they are "
                   "dropped and counted, since a url list from someone else could name your files")


def _download_config(args: argparse.Namespace):
    from pipeline.download import DownloadConfig

    kw = dict(image_size=args.image_size, resize_mode=args.resize_mode, thread_count=args.thread_count,
              number_sample_per_shard=args.number_sample_per_shard, timeout=args.timeout,
              max_error_rate=args.max_error_rate, incremental_mode="overwrite" if args.overwrite else "incremental",
              allow_local_files=args.allow_local_files, max_download_seconds=args.max_download_seconds,
              max_image_bytes=args.max_image_mib << 20)
    if args.processes:
        kw["processes_count"] = args.processes
    return DownloadConfig(**kw)


def _source_options(args: argparse.Namespace) -> dict | None:
    options = {k: getattr(args, k) for k in ("metadata_dir", "url_col", "caption_col") if getattr(args, k)}
    return options or None


def _cmd_download(args: argparse.Namespace) -> int:
    import dataclasses

    from pipeline.download import download_main
    from pipeline.download_summary import format_summary

    urls = args.urls or args.urls_flag
    if not urls or (args.urls and args.urls_flag and args.urls != args.urls_flag):
        raise ValueError("give the url list once: `download URLS --out DIR` or `download --urls URLS --out DIR`")
    cfg = _download_config(args)
    summary = download_main(urls, args.out, retry=args.retry_failed, source_options=_source_options(args),
                            **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    print(format_summary(summary))
    return 0


def _cmd_precompute(args: argparse.Namespace) -> int:
    from pipeline.cluster import ClusterConfig
    from pipeline.download_summary import format_summary
    from pipeline.encode import EncodeConfig
    from pipeline.precompute import precompute

    result = precompute(
        args.urls, args.out,
        EncodeConfig(encoder=args.encoder, batch_size=args.batch_size, device=args.device, dtype=args.dtype),
        _download_config(args),
        ClusterConfig(address=args.scheduler, n_workers=args.workers, wait_timeout=args.wait_timeout),
        source_options=_source_options(args), retry_failed=args.retry_failed,
    )
    print(format_summary(result.download))
    print(result.encode.table())
    print(f"images in {result.images}; store in {result.store}: {result.encode.rows_written} rows written now, "
          f"{len(result.encode.already_done)} shards were already done")
    return 0


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


def _cmd_serve(args: argparse.Namespace) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print("note: PREFECT_API_URL is not set; deployments go to this profile's server "
              "(see docs/orchestration.md: start one with `prefect server start`)", file=sys.stderr)
    from flows.deployments import serve

    serve(args.data, args.dask_address, args.limit)
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `eclipse-prior evaluate` (argparse); `eval_config` turns them into an EvalConfig."""
    from evaluation.decoders import DECODERS
    from evaluation.evaluate import EvalConfig
    from training.config import config_default

    def e(name: str):
        return config_default(EvalConfig, name)

    p.add_argument("--prior", action="append", required=True, help="prior folder, run folder or checkpoint "
                   "(repeat to compare several)")
    p.add_argument("--store", required=True, help="embedding store directory")
    p.add_argument("--out", required=True, help="output folder for metrics.json and report.html")
    p.add_argument("--heldout-fraction", dest="heldout_fraction", type=float, default=None,
                   help="default: the split the runs trained with")
    p.add_argument("--heldout-seed", dest="heldout_seed", type=int, default=None)
    p.add_argument("--seeds", type=int, default=e("seeds"), help=f"noise seeds per prior (>= 3; default {e('seeds')})")
    p.add_argument("--max-rows", dest="max_rows", type=int, default=e("max_rows"),
                   help=f"held-out rows (retrieval gallery; default {e('max_rows')})")
    p.add_argument("--encoder", default=None, help="the store's text encoder for prompt suites (default: its preset)")
    p.add_argument("--no-prompts", dest="no_prompts", action="store_true", help="skip the T2I-CompBench suites")
    p.add_argument("--force", action="store_true", help="evaluate again even when OUT holds this evaluation (the "
                   "same priors' weights, store and settings: otherwise a rerun reads it back)")
    p.add_argument("--max-prompts", dest="max_prompts", type=int, default=None, help="per category (default all)")
    p.add_argument("--image-source", dest="image_source", default=None,
                   help="folder of webdataset tars / image files named by key, for example images; a row whose url "
                   "is a local path is shown only when that path lies inside this folder")
    p.add_argument("--decoder", choices=DECODERS, default=None, help="also render images")
    p.add_argument("--decoder-path", dest="decoder_path", default=None)
    p.add_argument("--n-generate", dest="n_generate", type=int, default=e("n_generate"),
                   help=f"prompts rendered per prior (default {e('n_generate')})")
    p.add_argument("--generate-from", dest="generate_from", default=e("generate_from"),
                   help=f"heldout captions or a T2I-CompBench category (default {e('generate_from')})")
    p.add_argument("--clip-model", dest="clip_model", default=None, help="local CLIP weights for CLIPScore")
    p.add_argument("--pickscore-model", dest="pickscore_model", default=None, help="local PickScore weights")
    p.add_argument("--pickscore-processor", dest="pickscore_processor", default=None,
                   help="its processor (default: the model folder, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    p.add_argument("--fid", action="store_true", help="FID of generated vs real images (needs torchmetrics/clean-fid)")
    p.add_argument("--device", default=None)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `eclipse-prior generate` (argparse), named as generate()'s parameters."""
    from evaluation.decoders import DECODERS

    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--prior", required=True, help="exported prior folder, run folder or checkpoint")
    p.add_argument("--decoder", choices=DECODERS, default=None,
                   help="default: the one of the prior's encoder (recorded in its run) or of its D")
    p.add_argument("--decoder-path", dest="decoder_path", default=None,
                   help="local decoder folder (default: the decoder's hub id from the Hugging Face cache)")
    p.add_argument("--out", default=None, help="output PNG (default: PROMPT-seedN.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", "--decoder-steps", dest="steps", type=int, default=None,
                   help="decoder denoising steps (default: 50 DDIM for Kandinsky 2.2, 25 for Karlo's 64 px decoder)")
    p.add_argument("--super-res-steps", dest="super_res_steps", type=int, default=None,
                   help="Karlo only: steps of its 64->256 px super-resolution stage (default 7)")
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float, default=None, help="default 7.5")
    p.add_argument("--negative-prompt", dest="negative_prompt", default=None, help="Kandinsky only")
    p.add_argument("--encoder", default=None, help="the prior's text encoder (default: recorded in the run folder)")
    p.add_argument("--height", type=int, default=None, help="Kandinsky only (default 512)")
    p.add_argument("--width", type=int, default=None, help="Kandinsky only (default 512)")
    p.add_argument("--device", default=None)


def eval_config(args: argparse.Namespace):
    """The EvalConfig of `eclipse-prior evaluate`'s flags (options without a flag keep their defaults)."""
    from evaluation.evaluate import EvalConfig

    return EvalConfig(
        priors=args.prior, store=args.store, out=args.out, heldout_fraction=args.heldout_fraction,
        heldout_seed=args.heldout_seed, seeds=args.seeds, max_rows=args.max_rows, encoder=args.encoder,
        prompt_suite=not args.no_prompts, max_prompts=args.max_prompts, image_source=args.image_source,
        decoder=args.decoder, decoder_path=args.decoder_path, n_generate=args.n_generate,
        generate_from=args.generate_from, clip_model=args.clip_model, pickscore_model=args.pickscore_model,
        pickscore_processor=args.pickscore_processor, fid=args.fid, device=args.device,
        force=args.force,
    )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from evaluation.evaluate import evaluate, format_summary

    result = evaluate(eval_config(args))
    print(format_summary(result))
    print(os.path.join(args.out, "report.html"))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from evaluation.generate import default_image_name, generate

    out = args.out or default_image_name(args.prompt, args.seed)
    generate(args.prompt, args.prior, decoder=args.decoder, decoder_path=args.decoder_path, out=out, seed=args.seed,
             steps=args.steps, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
             encoder=args.encoder, height=args.height, width=args.width, device=args.device,
             super_res_steps=args.super_res_steps)
    print(out)
    return 0


def demo_params(args: argparse.Namespace):
    """The demo's DemoParams from `eclipse-prior demo`'s flags."""
    from flows.demo import DemoParams

    params = DemoParams.quick() if args.quick else DemoParams()
    update = {"lambdas": args.lambdas} if args.lambdas else {}
    if args.sum_lambdas is not None:
        update["sum_lambdas"] = args.sum_lambdas
    return params.model_copy(update=update)


def _cmd_demo(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    # `import prefect` writes to ~/.prefect unless PREFECT_HOME is set; keep the demo's state beside it.
    os.environ.setdefault("PREFECT_HOME", os.path.join(out, ".prefect"))
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the temporary local API sends nothing
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.demo import demo

    result = demo(out=out, params=demo_params(args))
    print(result["table"])  # the flow's own prints went to its log; the answer goes to stdout
    print(f"report:  {result['report']}\nmetrics: {result['metrics']}")
    return 0


def reproduce_params(args: argparse.Namespace):
    """The reproduce flow's ReproduceParams from `eclipse-prior reproduce`'s flags (a named grid, then overrides)."""
    from flows.reproduce import ReproduceParams

    base = {"quick": ReproduceParams.quick, "rehearsal": ReproduceParams.rehearsal,
            "paper": ReproduceParams.paper}[args.grid]()
    given = {"datasets": args.datasets, "decoders": args.decoders, "objectives": args.objectives,
             "lambdas": args.lambdas, "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size,
             "workers": args.workers}
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("datasets") or given.get("decoders"):
        given["pairs"] = None  # the grid is datasets x decoders again
    if args.teacher_steps is not None:
        given["world"] = {**base.world.model_dump(), "teacher_steps": args.teacher_steps}
    return ReproduceParams.model_validate({**base.model_dump(), **given})


def _cmd_reproduce(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    os.environ.setdefault("PREFECT_HOME", os.path.join(out, ".prefect"))  # as `demo`: state beside the run
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.reproduce import reproduce

    result = reproduce(out=out, params=reproduce_params(args))
    print(f"table:  {result['table']}\ncsv:    {result['csv']}\nreport: {result['report']}")
    if result["failed_cells"]:
        print(f"{result['failed_cells']} cells failed (reasons in the table); rerun the same command to retry them")
    return 0


def _subcommand(sub, name: str, handler, **kw) -> argparse.ArgumentParser:
    """A subcommand whose `handler(args) -> exit status` runs when it is chosen."""
    parser = sub.add_parser(name, **kw)
    parser.set_defaults(func=handler)
    return parser


def _add_store_command(sub) -> None:
    store = sub.add_parser("store", help="look inside an embedding store")
    store_sub = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    insp = _subcommand(
        store_sub, "inspect", _cmd_store_inspect,
        help="rows, shards, dims, encoder, size and problems of a store",
        description="Validate a store (manifest, every shard, duplicate keys, and checksums: re-hashing every shard "
        "reads the whole store from disk once, as long as reading it through) and summarise it. Exit status 1 when "
        "problems are found.",
    )
    insp.add_argument("store", help="store directory (holds _manifest.json and *.parquet shards)")
    insp.add_argument("--json", action="store_true", help="print a JSON report (keys: rows, shards, image_dim, "
                      "text_dim, encoder, problems, ...)")
    insp.add_argument("--no-verify", action="store_true", help="skip re-hashing every shard (that reads the whole "
                      "store once; without it, bytes changed inside a shard of the same size go unseen)")


def _add_download_command(sub) -> None:
    dl = _subcommand(
        sub, "download", _cmd_download,
        help="url list or dataset preset -> webdataset image shards (img2dataset)",
        description="Download image-text pairs with img2dataset. URLS is a parquet/csv/tsv/jsonl file or folder "
        "with url and caption columns, or a preset (laion-highres-5m, mscoco, cc3m, cc12m). Duplicate urls are "
        "dropped first; finished shards are kept on a rerun; a summary with failure reasons is printed and "
        "written to OUT/_pipeline/download_summary.json.",
    )
    dl.add_argument("urls", nargs="?", help="url list file/folder or dataset preset (or --urls, as precompute takes "
                    "it)")
    dl.add_argument("--urls", dest="urls_flag", metavar="URLS", help="the same as URLS")
    dl.add_argument("--out", required=True, help="folder for the image shards")
    dl.add_argument("--retry-failed", action="store_true", help="afterwards, re-feed urls that failed")
    _add_download_args(dl)


def _add_precompute_command(sub) -> None:
    pre = _subcommand(
        sub, "precompute", _cmd_precompute,
        help="download + encode in one go (images in OUT/images, the store in OUT/store)",
        description="Download (img2dataset) and encode (Dask workers) in one command. Running it twice on the "
        "same input is a no-op the second time; a killed run resumes where it stopped.",
    )
    pre.add_argument("--urls", required=True, help="url list file/folder or dataset preset")
    pre.add_argument("--out", required=True, help="output folder")
    pre.add_argument("--retry-failed", action="store_true", help="re-feed urls that failed once, before encoding")
    _add_encode_args(pre)
    _add_download_args(pre)


def _add_encode_command(sub) -> None:
    enc = _subcommand(
        sub, "encode", _cmd_encode,
        help="image shards -> embedding store (one Dask task per shard)",
        description="Encode every webdataset image shard in IMAGES with the decoder's CLIP encoders into the "
        "store. Finished shards are skipped, so a killed run resumes and a rerun is a no-op. Corrupt images "
        "and empty captions are skipped and recorded with their key and reason in the store manifest.",
    )
    enc.add_argument("images", help="folder of *.tar webdataset shards (the download stage's output)")
    enc.add_argument("--store", required=True, help="store directory to create or extend")
    _add_encode_args(enc)


def _add_train_command(sub) -> None:
    from training.config import TrainConfig, config_default
    from training.objectives import OBJECTIVES
    from training.prior import PRIOR_PRESETS

    def t(name: str):
        return config_default(TrainConfig, name)

    tr = _subcommand(
        sub, "train", _cmd_train,
        help="train a prior on an embedding store",
        description="Train an ECLIPSE / projection / diffusion prior. Defaults are the paper's recipe (AdamW, lr 5e-5, "
        "CosineAnnealingWarmRestarts, batch 256 per process, 60,000 steps); precedence: defaults < --config file < "
        "flags < --set. Multi-GPU: torchrun --nproc_per_node N -m cli.main train ... . RUN gets checkpoints/, "
        "logs/ (train.jsonl, tb/) and the exported prior/.",
    )
    tr.add_argument("--store", help="embedding store directory (required, unless --config or --resume's saved "
                    "config names it)")
    tr.add_argument("--out", help="run folder RUN")
    tr.add_argument("--objective", choices=OBJECTIVES, help=f"default: {t('objective')}")
    tr.add_argument("--preset", choices=list(PRIOR_PRESETS), help="prior size and D; default: kandinsky22 on a "
                    "store of D=1280, karlo on D=768, else tiny sized to the store")
    tr.add_argument("--steps", type=int, help=f"training steps (default {t('steps')})")
    tr.add_argument("--config", help="YAML or JSON file of config keys (see training/config.py)")
    tr.add_argument("--resume", action="store_true", help="continue RUN from its newest complete checkpoint")
    tr.add_argument("--batch-size", type=int, help=f"per process (default {t('batch_size')})")
    tr.add_argument("--lr", type=float, help=f"learning rate (default {t('lr'):g})")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--ema", dest="ema_decay", type=float, metavar="DECAY", help="keep an EMA of the weights")
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"])
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--ckpt-every", type=int, help=f"checkpoint every N steps (default {t('ckpt_every')})")
    tr.add_argument("--log-every", type=int, help=f"log every N steps (default {t('log_every')})")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="any other config key, e.g. --set eclipse_tau=0.05 (repeatable)")


def _add_export_command(sub) -> None:
    exp = _subcommand(
        sub, "export", _cmd_export,
        help="export a checkpoint as a diffusers-style prior folder",
        description="Write config.json + diffusion_pytorch_model.safetensors + a README.md model card. CKPT is a "
        "checkpoint folder or a run folder (its newest complete checkpoint).",
    )
    exp.add_argument("ckpt", metavar="CKPT", help="checkpoint folder or run folder")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                     help="export the EMA weights (default: when the run kept them)")


def _add_evaluate_command(sub) -> None:
    ev = _subcommand(
        sub, "evaluate", _cmd_evaluate,
        help="embedding metrics, prompt suites, optional decoder images -> metrics.json + report.html",
        description="Evaluate one or more priors on the store's held-out split (never trained on): cosine to the "
        "true image, retrieval R@k, Fréchet distance, norm ratio, each over >= 3 noise seeds with bootstrap CIs, "
        "next to the TextEmb, text-shift, mean-image and ridge baselines; T2I-CompBench prompt probes; and "
        "decoder images when --decoder is given. Writes OUT/metrics.json and a self-contained OUT/report.html.",
    )
    add_evaluate_arguments(ev)


def _add_generate_command(sub) -> None:
    gen = _subcommand(
        sub, "generate", _cmd_generate,
        help="prompt -> image through a prior and an unCLIP decoder (Kandinsky v2.2 or Karlo)",
        description="Encode PROMPT with the prior's text encoder, predict its image embedding with the prior, and "
        "decode it with Kandinsky v2.2 (KandinskyV22Pipeline) or Karlo's decoder. Weights come from --decoder-path "
        "or the local Hugging Face cache.",
    )
    add_generate_arguments(gen)


def _add_demo_command(sub) -> None:
    dm = _subcommand(
        sub, "demo", _cmd_demo,
        help="the whole DAG on a CPU on a synthetic compositional world (no GPU, no internet)",
        description="Render a synthetic world of colored, textured shapes, train a small teacher CLIP on it, "
        "serve the images on loopback, download + encode them (img2dataset, Dask), train projection, eclipse and "
        "diffusion priors over several seeds on held-in compositions (eclipse at lambda 0.02, 0.2 and 2, and at 0.2 "
        "with Eq. 3 summed over D), evaluate "
        "them on held-in rows and on held-out compositions, and print a results table and the testbed figures. "
        "Writes OUT/metrics.json and OUT/report.html. About 8-10 minutes on 2 cores; --quick about 3. "
        "Rerunning resumes.",
    )
    dm.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    dm.add_argument("--quick", action="store_true", help="fewer images, steps and seeds (CI)")
    dm.add_argument("--lambdas", type=float, nargs="+", metavar="L",
                    help="eclipse's λ values to sweep (default 0.02 0.2 2; --quick: 0.2); projection is λ=0")
    dm.add_argument("--sum-lambdas", type=float, nargs="*", metavar="L",
                    help="eclipse's λ values with Eq. 3 summed over D (its letter), a column each beside the sweep "
                    "(default 0.2; none: the flag alone)")


def _add_reproduce_command(sub) -> None:
    rp = _subcommand(
        sub, "reproduce", _cmd_reproduce,
        help="the paper's Table 2 as one resumable run: precompute, train every cell, evaluate, one table",
        description="Train the same prior with every objective (projection, eclipse at each λ, diffusion) and seed "
        "on every dataset x decoder row, with one training budget, evaluate each cell, and write OUT/table.json, "
        "OUT/table.csv and OUT/report.html (means over seeds with t-intervals, paired differences eclipse - "
        "projection and eclipse - diffusion). A cost plan comes first (OUT/plan.json). Datasets: presets, url "
        "lists, store folders, or world:N (the demo's synthetic world with N held-in rows, on a CPU). Cells run "
        "in parallel, one per GPU or core; rerunning skips finished cells and retries failed ones.",
    )
    rp.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    grid = rp.add_mutually_exclusive_group()
    grid.add_argument("--quick", dest="grid", action="store_const", const="quick",
                      help="two small world sizes, one seed (CI; a few minutes)")
    grid.add_argument("--rehearsal", dest="grid", action="store_const", const="rehearsal",
                      help="the default: world:1500 and world:12000, three seeds, on 2 cores (see BENCHMARKS.md)")
    grid.add_argument("--paper", dest="grid", action="store_const", const="paper",
                      help="the paper's grid: its datasets and decoders, 60k steps x 1024 (needs GPUs and the hub)")
    rp.set_defaults(grid="rehearsal")
    rp.add_argument("--datasets", nargs="+", help="override: presets, url lists, store folders or world:N")
    rp.add_argument("--decoders", nargs="+", choices=list(FAMILIES), help="override the decoders")
    rp.add_argument("--objectives", nargs="+", choices=["projection", "eclipse", "diffusion"])
    rp.add_argument("--lambdas", type=float, nargs="+", metavar="L", help="eclipse's λ values (one column each)")
    rp.add_argument("--seeds", type=int, help="training seeds per cell")
    rp.add_argument("--steps", type=int, help="training steps of every cell")
    rp.add_argument("--batch-size", type=int, help="batch per worker")
    rp.add_argument("--workers", type=int, help="cells in parallel (default: one per GPU, else one per core)")
    rp.add_argument("--teacher-steps", type=int, metavar="N",
                    help="world:N rows: training steps of the world's teacher CLIP (default: the grid's)")


def _cmd_plan(args: argparse.Namespace) -> int:
    from training.plan import PlanConfig, make_plan, paper_config

    def names(given: list[str] | None) -> tuple[str, ...] | None:
        """Space- or comma-separated, as reproduce takes them (`a b`) or as plan once did (`a,b`)."""
        return tuple(x.strip() for item in given for x in item.split(",") if x.strip()) if given else None

    given = {"datasets": names(args.datasets), "decoders": names(args.decoders), "objectives": names(args.objectives),
             "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size, "device": args.device,
             "gpus": args.gpus, "prior_mfu": args.prior_mfu, "encoder_mfu": args.encoder_mfu,
             "tokens_per_caption": args.tokens_per_caption}
    given = {k: v for k, v in given.items() if v is not None}
    if args.paper and not ({"datasets", "decoders"} & set(given)):
        cfg = paper_config(**given)
    else:
        cfg = paper_config(pairs=None, **given) if args.paper else PlanConfig(**given)
    plan = make_plan(cfg)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0


def _add_plan_command(sub) -> None:
    from training.cost import DEFAULT_DEVICE, DEVICES

    pl = _subcommand(
        sub, "plan", _cmd_plan,
        help="the cost of a grid before it runs: rows, images, download and store GB, encode and train GPU-hours",
        description="Print what precomputing and training a grid will cost, without running anything: per dataset x "
        "decoder the rows, distinct images, download and store size and the encode GPU-hours (image tower once per "
        "image, text tower once per caption); per training cell (dataset x decoder x objective x seed) its GPU-hours "
        "and what it would cost on the fly (both CLIP towers on every sample of every step); totals and the cache "
        "speed-up. GPU-hours = analytic FLOPs / (the device's datasheet bf16 peak x an assumed MFU; both printed "
        "with their sources). --paper is the paper's grid: Karlo on mscoco, cc3m, cc12m and Kandinsky v2.2 on "
        "mscoco, laion-highres-5m, three objectives, 60,000 steps x 1,024 on 4 x a6000.",
    )
    pl.add_argument("--paper", action="store_true", help="the paper's grid and setting (other flags override it)")
    pl.add_argument("--datasets", nargs="+", help="presets (mscoco, cc3m, cc12m, laion-highres-5m) or local url "
                    "lists (read for rows, images and tokens per caption), as `reproduce` takes them (commas work "
                    "too); default laion-highres-5m")
    pl.add_argument("--decoders", nargs="+", help=f"{', '.join(FAMILIES)} (default {DEFAULT_FAMILY})")
    pl.add_argument("--objectives", nargs="+", help="eclipse, projection, diffusion (default eclipse)")
    pl.add_argument("--seeds", type=int, help="seeds per cell (default 1)")
    pl.add_argument("--steps", type=int, help="training steps per cell (default: train's, 60000)")
    pl.add_argument("--batch-size", type=int, help="global batch, all GPUs together (default: train's, 256)")
    pl.add_argument("--device", choices=list(DEVICES), help=f"GPU kind (default {DEFAULT_DEVICE})")
    pl.add_argument("--gpus", type=int, help="GPUs working together, for wall-clock hours (default 1)")
    pl.add_argument("--prior-mfu", type=float, help="model FLOP utilisation of prior training (default: assumed 0.30; "
                    "benchmarks/gpu/bench_gpu.py measures it)")
    pl.add_argument("--encoder-mfu", type=float, help="of the CLIP towers' inference (default: assumed 0.40)")
    pl.add_argument("--tokens-per-caption", type=float, help="instead of sampling the url list / the default 20")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (config, device, precompute, train, "
                    "per_model, totals)")


def _add_serve_command(sub) -> None:
    srv = _subcommand(
        sub, "serve", _cmd_serve,
        help="register every Prefect deployment and run them (one process, one machine)",
        description="Register the deployments (precompute/<dataset>, precompute/local, ...) with the Prefect server "
        "at PREFECT_API_URL and serve them until interrupted. Then: `prefect deployment run "
        "precompute/laion-highres-5m`.",
    )
    srv.add_argument("--data", default="runs", help="folder the dataset deployments write to (default runs/)")
    srv.add_argument("--dask-address", default=None, help="run shard tasks on this Dask scheduler")
    srv.add_argument("--limit", type=int, default=None, help="max concurrent flow runs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eclipse-prior", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_store_command(sub)
    _add_download_command(sub)
    _add_precompute_command(sub)
    _add_encode_command(sub)
    _add_train_command(sub)
    _add_export_command(sub)
    _add_evaluate_command(sub)
    _add_generate_command(sub)
    _add_demo_command(sub)
    _add_reproduce_command(sub)
    _add_serve_command(sub)
    _add_plan_command(sub)
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
