"""Evaluate priors against each other and against trivial baselines; write metrics.json + report.html.

    evaluate(EvalConfig(priors=["runs/eclipse", "runs/projection"], store="stores/cc3m", out="eval/cc3m"))

On the store's held-out split (the key-hash split the trainer never reads, `evaluation.split`):
every prior predicts image embeddings with several noise seeds (`evaluation.predict`); the baselines
are fitted on the training split only (`evaluation.baselines`): TextEmb (the text embedding itself),
text-shift (text - mean text + mean image), the mean image embedding, and ridge regression
text -> image. Every figure is averaged over the seeds and given with a seeded bootstrap
interval over rows (`evaluation.scoring`). Then, when the store's text encoder loads: the T2I-CompBench
prompt suites (`evaluation.prompts`); optionally images through a decoder and image metrics
(`evaluation.generate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluation.baselines import BASELINES, Baselines, TrainStats, scan_training_split
from evaluation.decoders import DECODERS, Decoder, DecoderKind
from evaluation.generate import generation_section
from evaluation.image_metrics import ClipImageScorer
from evaluation.images import ImageSource
from evaluation.metrics import rowwise_cosine, summarize
from evaluation.predict import PREDICTIONS_FILE, Heldout, predict_heldout, save_heldout
from evaluation.priors import PriorHandle, open_prior, read_training_log
from evaluation.prompts import CATEGORIES, run_prompt_suite
from evaluation.scoring import METRIC_INFO, caption_probe, comparisons, embedding_metrics, nearest_examples
from evaluation.split import Split, resolve_split
from evaluation.weights import default_device
from storage_schema import EmbeddingStore, EncoderInfo
from storage_schema.atomic import atomic_path, atomic_write_text
from training.data import check_store_dims
from training.export import TRAINING_INFO

METRICS_SCHEMA = 1
EXAMPLE_MODELS = ("TextEmb", "text-shift", "ridge")  # the baselines shown next to the priors in the examples


@dataclass
class EvalConfig:
    """Every option of an evaluation, with its default.

    priors: prior folders, run folders or checkpoints; store: the embedding store; out: the output folder.
    heldout_fraction/heldout_seed: default the split the runs trained with (run config).
    seeds: noise seeds per prior (>= 3). max_rows: about this many held-out rows are evaluated (also the
    retrieval gallery), a key-hash subsample of the split when it is larger; max_train_rows: likewise, the
    training rows for the baselines; probe_rows: likewise, the training rows the probe is fitted on.
    probe_families: family -> words, the probe's figure per family too (metrics.json probe.families); None:
    color, shape, texture (T2I-CompBench's words) and spatial positions, the overall figure over the first three.
    n_boot_fd: bootstrap draws for the Fréchet distance (each factorises a D x D covariance; default 200
    for D <= 256, else 20).
    encoder: the store's text encoder for the prompt suites (default: the store's preset).
    decoder/decoder_path: also render images (kandinsky22 | karlo) for `n_generate` prompts taken
    from the held-out captions or a T2I-CompBench category (`generate_from`), `generate_seeds` seeds
    each, the same prompts and seeds for every prior; clip_model /
    pickscore_model: local CLIP / PickScore weights for CLIPScore and PickScore win rates.
    Decoder and scorer weights are never downloaded unless local_files_only=False.
    train_shards: shards the priors trained on (default: from the run configs; baselines fit there).
    heldout_shards: evaluate every row of these shards instead (a composition hold-out; the priors must
    not have trained on them).
    """

    priors: Sequence[str | os.PathLike]
    store: str | os.PathLike
    out: str | os.PathLike
    # the split and its sampling
    heldout_fraction: float | None = None
    heldout_seed: int | None = None
    train_shards: Sequence[str] | None = None
    heldout_shards: Sequence[str] | None = None
    seeds: int = 3
    max_rows: int = 2000
    max_train_rows: int = 200_000
    probe_rows: int = 20_000
    batch_size: int = 256
    # intervals
    n_boot: int = 1000
    n_boot_fd: int | None = None
    ci: float = 0.95
    boot_seed: int = 0
    # prompt suites, probe, examples
    encoder: str | os.PathLike | None = None
    prompt_suite: bool = True
    prompt_categories: Sequence[str] = CATEGORIES
    max_prompts: int | None = None
    probe: bool = True
    probe_families: dict[str, list[str]] | None = None
    image_source: str | os.PathLike | None = None  # the only folder local images are read from (evaluation.images)
    n_examples: int = 6
    neighbours: int = 3
    # images through a decoder, and image metrics
    decoder: DecoderKind | None = None
    decoder_path: str | os.PathLike | None = None
    n_generate: int = 4
    generate_seeds: int = 1
    generate_from: str = "heldout"
    decoder_steps: int | None = None
    decoder_size: int | None = None
    clip_model: str | os.PathLike | None = None
    pickscore_model: str | os.PathLike | None = None
    pickscore_processor: str | os.PathLike | None = None
    fid: bool = False
    device: str | None = None
    local_files_only: bool = True
    force: bool = False  # evaluate again even when `out` holds this evaluation (same priors, store, settings)

    def __post_init__(self) -> None:
        if self.seeds < 3:
            raise ValueError("seeds must be >= 3: every figure is averaged over at least 3 noise seeds of each prior")
        if not self.priors:
            raise ValueError("no priors to evaluate")
        if self.generate_from != "heldout" and self.generate_from not in CATEGORIES:
            raise ValueError(f"generate_from must be 'heldout' or one of {list(CATEGORIES)}")
        for family, words in (self.probe_families or {}).items():
            if not family or isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"probe_families maps family names to lists of words (non-empty strings); "
                                 f"got {family!r}: {words!r}")
        if self.decoder is not None and self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}; choose one of {list(DECODERS)}")


INPUTS = ".evaluate-inputs.json"  # what the evaluation in a folder was made from, written after metrics.json


def inputs_fingerprint(cfg: EvalConfig) -> str:
    """The settings, the priors' weights (names, sizes, times) and the store's manifest: a change in any of them
    means evaluating again."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "force")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for p in cfg.priors:
        for f in sorted(Path(p).rglob("*.safetensors")):
            h.update(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    h.update((Path(cfg.store) / "_manifest.json").read_bytes())
    return h.hexdigest()


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate cfg.priors on cfg.store; write out/metrics.json and out/report.html (+ out/images/).
    Returns the metrics dict. A folder that holds this evaluation already (same priors' weights, store and
    settings: `inputs_fingerprint`) is read back instead, unless cfg.force."""
    out = Path(cfg.out)
    fingerprint = inputs_fingerprint(cfg)
    if not cfg.force and (out / "metrics.json").is_file() and (out / INPUTS).is_file() \
            and (out / INPUTS).read_text() == fingerprint:
        _log(f"{out} already holds this evaluation (same priors, store and settings); nothing to do (--force "
             "evaluates again)")
        return json.loads((out / "metrics.json").read_text())
    result = _evaluate(cfg)
    atomic_write_text(out / INPUTS, fingerprint)  # after metrics.json: completion recorded last
    return result


def _evaluate(cfg: EvalConfig) -> dict:
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device) if cfg.device is not None else default_device()
    store = EmbeddingStore(cfg.store)
    handles = open_priors(cfg.priors, store, dev)
    dec, scorers = load_image_models(cfg, handles, dev)  # requested weights load first: missing ones fail early
    split = resolve_split(handles, cfg.heldout_fraction, cfg.heldout_seed, cfg.train_shards, cfg.heldout_shards,
                          store)
    _log(f"{store.dir}: {store.num_rows} rows; held-out split fraction={split.fraction} seed={split.seed} "
         f"({split.source})")

    # The training side fits the baselines; the held-out side is predicted by every prior and baseline.
    n_held, n_train = split.count(store)
    train_keep = min(1.0, cfg.max_train_rows / max(n_train, 1))
    probe_keep = min(1.0, cfg.probe_rows / max(min(n_train, cfg.max_train_rows), 1)) if cfg.probe else 0.0
    stats = scan_training_split(store, split, train_keep, probe_keep)
    base = Baselines.fit(stats)
    _log(f"baselines fitted on {stats.rows} of {n_train} training rows (ridge alpha {base.ridge.alpha:g})")
    held = predict_heldout(store, split, handles, cfg.seeds, min(1.0, cfg.max_rows / max(n_held, 1)), cfg.batch_size)
    _log(f"{len(held.keys)} held-out rows predicted by {len(handles)} priors x {cfg.seeds} seeds")
    few = few_rows_warning(len(held.keys))
    if few:
        _log(f"warning: {few}")
    save_heldout(held, out / PREDICTIONS_FILE)
    models: dict[str, np.ndarray] = dict(held.preds) | {k: v[None] for k, v in base.predict(held.text).items()}
    prior_names = [h.name for h in handles]

    # Embedding figures with intervals, paired comparisons, the attribute probe, training curves.
    n_boot_fd = cfg.n_boot_fd if cfg.n_boot_fd is not None else (
        min(cfg.n_boot, 200) if store.encoder.image_dim <= 256 else 20)
    summaries, rows = embedding_metrics(models, held.image, held.text, cfg.n_boot, cfg.ci, cfg.boot_seed, n_boot_fd)
    result = _header(cfg, store, split, held, stats, (n_held, n_train), n_boot_fd, dev)
    if few:
        result["split"]["warning"] = few
    result["models"] = _model_entries(handles, base, summaries, cfg.seeds)
    result["comparisons"] = comparisons(rows, prior_names, cfg.n_boot, cfg.ci, cfg.boot_seed)
    if cfg.probe:
        result["probe"] = caption_probe(stats, held, models, cfg.n_boot, cfg.ci, cfg.boot_seed,
                                        families=cfg.probe_families)
        _log("attribute probe: " + (result["probe"].get("skipped") or f"{len(result['probe']['words'])} words")
             + "; families: " + ", ".join(f"{f} ({len(e['words'])} words)" if "words" in e else f"{f} skipped"
                                          for f, e in result["probe"]["families"].items()))
    result["training"] = {h.name: ({"log": str(h.log_path), "curves": read_training_log(h.log_path)}
                                   if h.log_path else {"log": None}) | {"config": h.train_config}
                          for h in handles}
    from evaluation.report import prior_budget

    for h in handles:  # recorded, so the report's budgets hold when metrics.json moves away from the runs
        result["models"][h.name]["budget"] = prior_budget(result, h.name)

    # What needs the store's text encoder: prompt suites and decoding.
    enc_name = os.fspath(cfg.encoder) if cfg.encoder is not None else store.encoder.preset
    enc, enc_error = None, None
    if cfg.prompt_suite or dec is not None:
        enc, enc_error = load_text_encoder(enc_name, store, dev)
    if cfg.prompt_suite:
        result["prompts"] = (_prompt_suite(cfg, enc, handles, base, held) | {"encoder": enc_name}
                             if enc is not None else {"skipped": enc_error})
    images: dict[str, Image.Image] = {}
    src = ImageSource(cfg.image_source)
    result["examples"] = nearest_examples(held, models, [*prior_names, *EXAMPLE_MODELS], cfg.n_examples,
                                          cfg.neighbours, src, images)
    if dec is not None:
        result["generation"] = generation_section(
            dec, enc, handles, held, cfg.generate_from, cfg.n_generate, cfg.generate_seeds, cfg.decoder_steps,
            cfg.decoder_size, scorers, cfg.fid, src, images, cfg.n_boot, cfg.ci, cfg.boot_seed,
        ) if enc is not None else {"skipped": enc_error}
    elif scorers or cfg.fid:
        result["generation"] = {"skipped": "image metrics need generated images: pass a decoder"}

    result["elapsed_s"] = round(time.time() - t_start, 2)
    write_outputs(out, result, images)
    _log(f"wrote {out / 'metrics.json'} and {out / 'report.html'} in {result['elapsed_s']:.0f} s")
    return result


# -- the steps ----------------------------------------------------------------------------------------------


def open_priors(paths: Sequence[str | os.PathLike], store: EmbeddingStore, dev: torch.device) -> list[PriorHandle]:
    """Load every prior, with unique names, and refuse any that cannot predict for this store."""
    handles = [open_prior(p, dev) for p in paths]
    _unique_names(handles)
    for h in handles:
        check_store_dims(store.encoder, h.embedding_dim, f"prior {h.name}")
        if h.encoder_info and EncoderInfo.from_dict(h.encoder_info) != store.encoder:
            raise ValueError(
                f"prior {h.name} was trained on embeddings of encoder {h.encoder_info.get('preset')!r} "
                f"({h.encoder_info.get('image_model')}); {store.dir} holds {store.encoder.preset!r} "
                f"({store.encoder.image_model}): its predictions would be meaningless there")
        if not h.encoder_info:  # the released layout alone (config.json + weights) does not record it
            _log(f"warning: prior {h.name} records no encoder (an exported prior without its run folder or "
                 f"{TRAINING_INFO}): only its D={h.embedding_dim} was checked against {store.encoder.preset!r}. "
                 f"Its figures mean something only if it was trained on that encoder's embeddings.")
    if len({h.text_length for h in handles}) > 1:  # one padded read of the store feeds every prior
        raise ValueError(f"the priors take different text lengths {[(h.name, h.text_length) for h in handles]}")
    return handles


def _unique_names(handles: list[PriorHandle]) -> None:
    """Rename priors in place so no two share a name and none is named like a baseline."""
    seen: dict[str, int] = {}
    for h in handles:
        base = h.name if h.name not in BASELINES else f"{h.name} (prior)"
        n = seen.get(base, 0)
        seen[base] = n + 1
        h.name = base if n == 0 else f"{base} #{n + 1}"


def load_image_models(cfg: EvalConfig, handles: Sequence[PriorHandle], dev: torch.device
                      ) -> tuple[Decoder | None, dict[str, ClipImageScorer]]:
    """The decoder and the image scorers the config asks for (none asked: None, {})."""
    dec = None
    if cfg.decoder is not None:
        dec = Decoder.load(cfg.decoder, cfg.decoder_path, dev, local_files_only=cfg.local_files_only)
        for h in handles:
            dec.check_prior(h)
    scorers = {}
    if cfg.clip_model is not None:
        scorers["clipscore"] = ClipImageScorer.load("clipscore", cfg.clip_model, device=dev,
                                                    local_files_only=cfg.local_files_only)
    if cfg.pickscore_model is not None:
        scorers["pickscore"] = ClipImageScorer.load("pickscore", cfg.pickscore_model, cfg.pickscore_processor,
                                                    device=dev, local_files_only=cfg.local_files_only)
    return dec, scorers


def load_text_encoder(name: str, store: EmbeddingStore, dev: torch.device):
    """(the store's text encoder, None) or (None, why it is unavailable): the embedding figures stand without it."""
    from pipeline.encoders import get_encoder

    try:
        enc = get_encoder(name, device=dev)
        if (enc.info.text_dim, enc.info.hidden_dim) != (store.encoder.text_dim, store.encoder.hidden_dim):
            raise ValueError(f"encoder {name!r} has text dim {enc.info.text_dim}/hidden {enc.info.hidden_dim}, "
                             f"the store {store.encoder.text_dim}/{store.encoder.hidden_dim}")
    except Exception as e:  # recorded in metrics.json instead of failing the evaluation
        error = f"text encoder {name!r} unavailable: {e}"
        _log(error)
        return None, error
    return enc, None


def _prompt_suite(cfg: EvalConfig, enc, handles: Sequence[PriorHandle], base: Baselines, held: Heldout) -> dict:
    """The T2I-CompBench prompt suites for every prior (cfg.seeds noise seeds) and baseline."""
    def prior_fn(h: PriorHandle):
        return lambda e, seed: h.predict_numpy(e.text_embed, e.text_hidden, e.text_mask, seed, cfg.batch_size)

    def base_fn(name: str):
        return lambda e, seed: base.predict(e.text_embed)[name]

    models = {h.name: (prior_fn(h), cfg.seeds) for h in handles}
    models |= {name: (base_fn(name), 1) for name in BASELINES}
    result = run_prompt_suite(enc, models, held.image, cfg.prompt_categories, cfg.max_prompts,
                              handles[0].text_length, cfg.n_boot, cfg.ci, cfg.boot_seed)
    _log(f"prompt suites: {', '.join(cfg.prompt_categories)}")
    return result


# With n held-out rows a 95 % interval on a rate such as R@1 spans about +-1/sqrt(n): under 100 rows it is wider than
# +-0.1, too wide to tell priors apart (the demo's differences are 0.01-0.1). The evaluation still runs, and says so.
MIN_HELDOUT_ROWS = 100


def few_rows_warning(rows: int) -> str | None:
    """The warning for an evaluation on fewer than MIN_HELDOUT_ROWS held-out rows (None: enough rows)."""
    if rows >= MIN_HELDOUT_ROWS:
        return None
    return (f"only {rows} held-out rows: a rate measured on them has a 95 % interval of about "
            f"+-{min(1.0, rows ** -0.5 if rows else 1.0):.2f}, too wide to rank priors (at least {MIN_HELDOUT_ROWS} "
            f"rows). Hold out more rows (train: --set heldout_fraction=F, evaluate: --heldout-fraction F; the default "
            f"0.01 suits stores of 10,000+ rows) or use a bigger store.")


def _header(cfg: EvalConfig, store: EmbeddingStore, split: Split, held: Heldout, stats: TrainStats,
            rows_in_store: tuple[int, int], n_boot_fd: int, dev: torch.device) -> dict:
    """metrics.json's description of the data, the split and the settings."""
    n_held, n_train = rows_in_store
    return {
        "schema": METRICS_SCHEMA,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "store": {"path": str(store.dir), "rows": store.num_rows, "encoder": store.encoder.to_dict()},
        "split": {"heldout_fraction": split.fraction, "heldout_seed": split.seed, "source": split.source,
                  "train_shards": split.train_shards, "heldout_shards": split.heldout_shards,
                  "heldout_rows_in_store": n_held, "heldout_rows": len(held.keys), "gallery_size": len(held.keys),
                  "train_rows_in_store": n_train, "train_rows_used": stats.rows},
        "settings": {"seeds": cfg.seeds, "n_boot": cfg.n_boot, "n_boot_fd": n_boot_fd, "ci": float(cfg.ci),
                     "bootstrap_seed": cfg.boot_seed, "max_rows": cfg.max_rows, "device": str(dev),
                     "probe_families": cfg.probe_families},
        "metric_info": {k: {"what": w, "better": b} for k, (w, b) in METRIC_INFO.items()},
        "dataset": {"cos_text_image": summarize(rowwise_cosine(held.text, held.image), cfg.n_boot, cfg.ci,
                                                cfg.boot_seed).to_dict()},
    }


def _model_entries(handles: Sequence[PriorHandle], base: Baselines, summaries: dict, seeds: int) -> dict:
    """metrics.json's "models": every prior, then every baseline, with its figures."""
    models = {}
    for h in handles:
        models[h.name] = {
            "kind": "prior", "path": str(h.source), "weights": str(h.prior_dir), "objective": h.objective_name,
            "seeds": seeds, "parameters": int(sum(p.numel() for p in h.model.parameters())),
            "encoder_checked": bool(h.encoder_info),  # False: a bare prior, its D checked only
            "metrics": summaries[h.name],
        }
    for name, what in BASELINES.items():
        info = {"kind": "baseline", "description": what, "seeds": 1, "metrics": summaries[name]}
        if name == "ridge":
            info["alpha"] = base.ridge.alpha
            info["validation_mse"] = {str(k): v for k, v in base.ridge.validation_mse.items()}
        models[name] = info
    return models


def write_outputs(out: Path, result: dict, images: dict[str, Image.Image]) -> None:
    """out/images/*.png, out/metrics.json, out/report.html (metrics.json before the report that renders it)."""
    from evaluation.report import write_report

    for name, im in images.items():
        with atomic_path(out / "images" / f"{name}.png") as tmp:
            im.save(tmp, format="PNG")
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=1, allow_nan=False, default=_json_default))
    write_report(result, out / "report.html", images)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _log(msg: str) -> None:
    print(f"evaluate: {msg}", file=sys.stderr, flush=True)


def format_summary(result: dict, keys: Sequence[str] = ("cos_image", "r1", "frechet", "norm_ratio")) -> str:
    """A plain-text table of the main figures (value [CI]), then the sections that were skipped and why."""
    lines = [f"{'model':<28}" + "".join(f"{k:>26}" for k in keys)]
    for name, m in result["models"].items():
        cells = []
        for k in keys:
            s = m["metrics"].get(k)
            cells.append(f"{_fmt(s['value'])} [{_fmt(s['ci'][0])}, {_fmt(s['ci'][1])}]" if s else "-")
        lines.append(f"{name[:27]:<28}" + "".join(f"{c:>26}" for c in cells))
    for section in ("prompts", "probe", "generation"):
        if isinstance(result.get(section), dict) and "skipped" in result[section]:
            lines.append(f"{section}: skipped: {result[section]['skipped']}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "nan" if v is None else f"{v:.4g}"
