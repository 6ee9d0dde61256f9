"""The cost plan: what a grid of precomputes and trainings will cost, before anything runs.

For each (dataset, decoder): store rows (image-text pairs), distinct images to download, download
and store size, encode GPU-hours (image tower once per distinct image, text tower once per caption).
For each training cell (dataset, decoder, objective, seed): GPU-hours of steps x batch through the
prior, and what the same cell costs **on the fly** (both CLIP towers run on every sample of every
step, as training without the cache does). The cache speed-up is on-the-fly GPU-hours against
preprocessed ones (encode once + train). FLOPs: :mod:`training.cost`; time = FLOPs / (peak x MFU).

Nothing here loads weights or touches the network. Dataset sizes of the presets are the public
figures in :data:`DATASET_SIZES`; a local url list is read (through the pipeline's own
:func:`pipeline.sources.prepare_url_list`) for its rows, distinct images and a sample of captions,
whose CLIP BPE token counts (open_clip's tokenizer, the 49408-token vocabulary both decoders'
text towers use) give the tokens per caption; otherwise :data:`DEFAULT_TOKENS_PER_CAPTION`.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.families import DEFAULT_FAMILY, FAMILIES
from pipeline.sources import SOURCE_PRESETS, SourceError, prepare_url_list, resolve_source
from training.config import TrainConfig, config_default
from training.cost import (
    DEFAULT_DEVICE,
    MFU_SOURCE,
    TEXT_TOWERS,
    VISION_TOWERS,
    device_kind,
    encoder_dims,
    gpu_hours,
    objective_train_flops_per_sample,
    text_flops_per_caption,
    vision_flops_per_image,
)
from training.objectives import OBJECTIVES

DECODERS = tuple(FAMILIES)  # each trains the prior preset of the same name
CONTEXT_LENGTH = 77


@dataclass(frozen=True)
class DatasetSize:
    """Public size of a dataset preset: store rows, distinct images, average bytes per downloaded image."""

    pairs: int
    images: int
    bytes_per_image: float
    source: str
    download_source: str


_ASSUMED = "an assumption (no published figure used)"
#: The presets' sizes (pipeline.sources.SOURCE_PRESETS describes the same figures in words).
DATASET_SIZES: dict[str, DatasetSize] = {
    "mscoco": DatasetSize(
        591_753, 118_287, 18e9 / 118_287,
        "COCO 2017 train: 118,287 images with 591,753 captions (captions_train2017.json); every caption is a row",
        "COCO's train2017.zip is 18 GB for its 118,287 images (cocodataset.org)"),
    "cc3m": DatasetSize(
        2_900_000, 2_900_000, 100e3,
        "~2.9M pairs in pixparse/cc3m-wds (the hub tars pipeline.sources reads), one caption per image",
        f"100 kB per image in the hub's tars: {_ASSUMED}"),
    "cc12m": DatasetSize(
        11_000_000, 11_000_000, 100e3,
        "~11M pairs in pixparse/cc12m-wds (the hub tars pipeline.sources reads), one caption per image",
        f"100 kB per image in the hub's tars: {_ASSUMED}"),
    "laion-highres-5m": DatasetSize(
        5_000_000, 5_000_000, 1.0e6,
        "the preset's seeded sample of 5,000,000 rows of laion/laion-high-resolution, one caption per image",
        f"1 MB per original image (>= 1024 x 1024 JPEG, fetched by img2dataset): {_ASSUMED}"),
}

#: Tokens per caption (BOS + text + EOS, as the store keeps them) when no url list can be sampled.
DEFAULT_TOKENS_PER_CAPTION = 20.0
DEFAULT_TOKENS_SOURCE = ("20, assumed for short alt-text and COCO-style captions (this repository's store "
                         "benchmarks use 17-20); a readable url list or --tokens-per-caption replaces it")

#: Store bytes per row besides the fp16 embeddings: key, caption and url (zstd), their offsets,
#: text_len, truncated and Parquet page overhead. Calibrated against a real store in tests/test_plan.py.
ROW_OVERHEAD_BYTES = 96.0

#: The paper's grid (ECLIPSE, CVPR 2024, Sec. 4.1): Karlo on MSCOCO, CC3M and CC12M, Kandinsky v2.2
#: on MSCOCO and LAION-HighRes; the three objectives; ~60,000 iterations at 4 x 256 on 4 x RTX A6000.
PAPER_PAIRS: tuple[tuple[str, str], ...] = tuple((d, name) for name, f in FAMILIES.items() for d in f.paper_datasets)
PAPER_STEPS, PAPER_BATCH, PAPER_DEVICE, PAPER_GPUS = 60_000, 4 * 256, "a6000", 4


@dataclass(frozen=True)
class PlanConfig:
    """What to cost. `pairs` (explicit (dataset, decoder) pairs) wins over datasets x decoders."""

    datasets: tuple[str, ...] = ("laion-highres-5m",)
    decoders: tuple[str, ...] = (DEFAULT_FAMILY,)
    objectives: tuple[str, ...] = ("eclipse",)
    seeds: int = 1
    steps: int = field(default_factory=lambda: config_default(TrainConfig, "steps"))
    batch_size: int = field(default_factory=lambda: config_default(TrainConfig, "batch_size"))  # all GPUs together
    device: str = DEFAULT_DEVICE
    gpus: int = 1  # how many train together (wall-clock hours = GPU-hours / gpus)
    prior_mfu: float | None = None  # None: the device kind's (an assumption; see training.cost)
    encoder_mfu: float | None = None
    tokens_per_caption: float | None = None  # None: sampled from a readable url list, else the default
    caption_sample: int = 1000
    pairs: tuple[tuple[str, str], ...] | None = None
    name: str = "custom"

    def cells(self) -> list[tuple[str, str]]:
        pairs = self.pairs or tuple((d, e) for d in self.datasets for e in self.decoders)
        for _, dec in pairs:
            if dec not in DECODERS:
                raise ValueError(f"unknown decoder {dec!r}; choose one of {', '.join(DECODERS)}")
        for obj in self.objectives:
            if obj not in OBJECTIVES:
                raise ValueError(f"unknown objective {obj!r}; choose one of {', '.join(OBJECTIVES)}")
        return list(pairs)


def paper_config(**overrides) -> PlanConfig:
    """The paper's grid and setting (4 x RTX A6000, 256 per GPU, 60,000 iterations, every objective)."""
    return PlanConfig(**{"pairs": PAPER_PAIRS, "objectives": OBJECTIVES, "steps": PAPER_STEPS,
                         "batch_size": PAPER_BATCH, "device": PAPER_DEVICE, "gpus": PAPER_GPUS, "name": "paper",
                         **overrides})


def tokens_per_caption(captions: Sequence[str], context_length: int = CONTEXT_LENGTH) -> float:
    """Mean real tokens per caption as the store keeps them: BOS + CLIP BPE tokens + EOS, cut at the context."""
    from open_clip.tokenizer import SimpleTokenizer

    if not captions:
        raise ValueError("no captions to count tokens of")
    tok = SimpleTokenizer()
    return sum(min(len(tok.encode(str(c))) + 2, context_length) for c in captions) / len(captions)


@dataclass(frozen=True)
class UrlListStats:
    pairs: int
    images: int
    captions: list[str]  # the sample


def read_url_list(path: str | Path, sample: int = 1000, seed: int = 0) -> UrlListStats:
    """Rows, distinct images and a seeded sample of captions of a local url list, read the way the
    download stage reads it (de-duplicated by url; captions listed in `alt_captions` are rows too)."""
    src = resolve_source(path)
    if src.kind == "webdataset":
        raise SourceError(f"{path}: a webdataset (tars) has no url list to count; give a url list or a preset")
    with tempfile.TemporaryDirectory() as tmp:
        table = pq.read_table(prepare_url_list(src, tmp))
    captions = table.column("caption").to_pylist()
    pairs = len(captions)
    if "alt_captions" in table.column_names:
        alts = [a for row in table.column("alt_captions").to_pylist() for a in (row or [])]
        pairs += len(alts)
        captions += alts
    random.Random(seed).shuffle(captions)
    return UrlListStats(pairs=pairs, images=table.num_rows, captions=captions[:sample])


def store_bytes_per_row(dim: int, hidden: int, tokens: float, overhead: float = ROW_OVERHEAD_BYTES) -> float:
    """Bytes per store row: image_embed + text_embed (2 x D fp16) + text_hidden (tokens x H fp16) + overhead."""
    return 2 * dim * 2 + tokens * hidden * 2 + overhead


def encode_flops_per_sample(decoder: str) -> float:
    """Both towers' forward FLOPs for one pair: the image tower at 224 px, the text tower at the full context."""
    return vision_flops_per_image(VISION_TOWERS[decoder]) + text_flops_per_caption(TEXT_TOWERS[decoder])


@dataclass(frozen=True)
class PrecomputeCost:
    dataset: str
    decoder: str
    pairs: int
    images: int
    tokens_per_caption: float
    dim: int
    hidden: int
    bytes_per_row: float
    store_gb: float
    download_gb: float
    image_gpu_hours: float
    text_gpu_hours: float
    encode_gpu_hours: float
    sizes_source: str
    tokens_source: str
    download_source: str


@dataclass(frozen=True)
class TrainCost:
    dataset: str
    decoder: str
    objective: str
    seed: int
    samples: int  # steps x batch
    train_gflop_per_sample: float
    train_gpu_hours: float
    on_the_fly_gpu_hours: float  # the same cell with both towers run on every sample of every step


@dataclass
class Plan:
    config: PlanConfig
    device: dict
    precompute: list[PrecomputeCost]
    train: list[TrainCost]

    @property
    def totals(self) -> dict:
        encode = sum(p.encode_gpu_hours for p in self.precompute)
        train = sum(t.train_gpu_hours for t in self.train)
        fly = sum(t.on_the_fly_gpu_hours for t in self.train)
        pre = encode + train
        return {
            "cells": len(self.train), "pairs": sum(p.pairs for p in self.precompute),
            "images": sum(p.images for p in self.precompute),
            "download_gb": sum(p.download_gb for p in self.precompute),
            "store_gb": sum(p.store_gb for p in self.precompute),
            "encode_gpu_hours": encode, "train_gpu_hours": train, "preprocessed_gpu_hours": pre,
            "on_the_fly_gpu_hours": fly, "cache_speedup": fly / pre if pre else float("nan"),
            "wall_hours_preprocessed": pre / self.config.gpus, "wall_hours_on_the_fly": fly / self.config.gpus,
        }

    def per_model(self) -> list[dict]:
        """One model per (dataset, decoder) as the paper counts it: on the fly vs train only vs encode + train."""
        rows = []
        for p in self.precompute:
            cells = [t for t in self.train if (t.dataset, t.decoder) == (p.dataset, p.decoder)]
            if not cells:
                continue
            one = cells[0]  # objectives differ by < 2 % (the diffusion prior's one extra position)
            rows.append({"dataset": p.dataset, "decoder": p.decoder, "on_the_fly_gpu_hours": one.on_the_fly_gpu_hours,
                         "train_gpu_hours": one.train_gpu_hours,
                         "encode_once_plus_train_gpu_hours": p.encode_gpu_hours + one.train_gpu_hours})
        return rows

    def to_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "device": self.device,
                "precompute": [dataclasses.asdict(p) for p in self.precompute],
                "train": [dataclasses.asdict(t) for t in self.train], "per_model": self.per_model(),
                "totals": self.totals}

    def table(self) -> str:
        return format_plan(self)


def _sizes(dataset: str, cfg: PlanConfig) -> tuple[int, int, float | None, str, str, str, list[str] | None]:
    """(pairs, images, bytes per image, sizes source, download source, label, sampled captions)."""
    if dataset in DATASET_SIZES:
        s = DATASET_SIZES[dataset]
        return s.pairs, s.images, s.bytes_per_image, s.source, s.download_source, dataset, None
    if dataset in SOURCE_PRESETS:
        raise ValueError(f"preset {dataset!r} has no recorded size in training.plan.DATASET_SIZES")
    stats = read_url_list(dataset, cfg.caption_sample)
    return (stats.pairs, stats.images, None, f"read from the url list {dataset}",
            "unknown: the url list does not say how large its images are", Path(dataset).name, stats.captions)


def make_plan(cfg: PlanConfig) -> Plan:
    """The cost plan of `cfg` (see the module docstring); pure arithmetic plus, for a local url list, one read."""
    dev = device_kind(cfg.device)
    prior_mfu = cfg.prior_mfu or dev.prior_mfu
    encoder_mfu = cfg.encoder_mfu or dev.encoder_mfu
    mfu_source = MFU_SOURCE if cfg.prior_mfu is None or cfg.encoder_mfu is None else "given"
    device = {"kind": dev.name, "peak_bf16_tflops": dev.peak_bf16 / 1e12, "peak_source": dev.source,
              "prior_mfu": prior_mfu, "encoder_mfu": encoder_mfu, "mfu_source": mfu_source}
    samples = cfg.steps * cfg.batch_size
    precompute, train = [], []
    read: dict[str, tuple] = {}
    for dataset, decoder in cfg.cells():
        if dataset not in read:
            read[dataset] = _sizes(dataset, cfg)
        pairs, images, per_image, sizes_src, dl_src, label, captions = read[dataset]
        if cfg.tokens_per_caption is not None:
            tokens, tok_src = float(cfg.tokens_per_caption), "given"
        elif captions:
            tokens = tokens_per_caption(captions)
            tok_src = f"sampled: CLIP BPE tokens of {len(captions)} captions of the url list"
        else:
            tokens, tok_src = DEFAULT_TOKENS_PER_CAPTION, DEFAULT_TOKENS_SOURCE
        dim, hidden = encoder_dims(decoder)
        per_row = store_bytes_per_row(dim, hidden, tokens)
        img_h = gpu_hours(images * vision_flops_per_image(VISION_TOWERS[decoder]), dev.peak_bf16, encoder_mfu)
        txt_h = gpu_hours(pairs * text_flops_per_caption(TEXT_TOWERS[decoder]), dev.peak_bf16, encoder_mfu)
        precompute.append(PrecomputeCost(
            dataset=label, decoder=decoder, pairs=pairs, images=images, tokens_per_caption=tokens, dim=dim,
            hidden=hidden, bytes_per_row=per_row, store_gb=pairs * per_row / 1e9,
            download_gb=images * per_image / 1e9 if per_image else float("nan"), image_gpu_hours=img_h,
            text_gpu_hours=txt_h, encode_gpu_hours=img_h + txt_h, sizes_source=sizes_src, tokens_source=tok_src,
            download_source=dl_src))
        fly_h = gpu_hours(samples * encode_flops_per_sample(decoder), dev.peak_bf16, encoder_mfu)
        for objective in cfg.objectives:
            per_sample = objective_train_flops_per_sample(decoder, objective)
            train_h = gpu_hours(samples * per_sample, dev.peak_bf16, prior_mfu)
            for seed in range(cfg.seeds):
                train.append(TrainCost(label, decoder, objective, seed, samples, per_sample / 1e9, train_h,
                                       train_h + fly_h))
    return Plan(cfg, device, precompute, train)


def plan_dict(cfg: PlanConfig) -> dict:
    """The plan as plain JSON-able data (what `eclipse-prior plan --json` prints and a flow can publish)."""
    return make_plan(cfg).to_dict()


def _num(x: float, digits: int | None = None) -> str:
    """A figure for the table: 2 decimals below 10, else 1; '?' when unknown (NaN)."""
    if x != x:
        return "?"
    return f"{x:,.{digits if digits is not None else (2 if abs(x) < 10 else 1)}f}"


def format_plan(plan: Plan) -> str:
    """A readable table of the plan, with the sources of its figures."""
    c, d, t = plan.config, plan.device, plan.totals
    lines = [f"cost plan '{c.name}': {c.steps:,} steps x batch {c.batch_size:,} (global) on {c.gpus} x {d['kind']} "
             f"({d['peak_bf16_tflops']:g} TFLOP/s dense bf16; prior MFU {d['prior_mfu']:.0%}, encoders "
             f"{d['encoder_mfu']:.0%})", "", "precompute (once per dataset x decoder)"]
    head = ("dataset", "decoder", "rows", "images", "download GB", "tokens/cap", "bytes/row", "store GB",
            "image GPU-h", "text GPU-h", "encode GPU-h")
    body = [(p.dataset, p.decoder, f"{p.pairs:,}", f"{p.images:,}", _num(p.download_gb), _num(p.tokens_per_caption),
             f"{p.bytes_per_row:,.0f}", _num(p.store_gb), _num(p.image_gpu_hours), _num(p.text_gpu_hours),
             _num(p.encode_gpu_hours)) for p in plan.precompute]
    lines += _table(head, body)
    lines += ["", "training (one row per cell)"]
    head = ("dataset", "decoder", "objective", "seed", "samples", "GFLOP/sample", "train GPU-h", "on-the-fly GPU-h")
    body = [(x.dataset, x.decoder, x.objective, str(x.seed), f"{x.samples:,}", _num(x.train_gflop_per_sample),
             _num(x.train_gpu_hours), _num(x.on_the_fly_gpu_hours)) for x in plan.train]
    lines += _table(head, body)
    lines += ["", "one model per dataset x decoder (the paper's unit)"]
    head = ("dataset", "decoder", "on the fly GPU-h", "train only GPU-h", "encode once + train GPU-h")
    body = [(r["dataset"], r["decoder"], _num(r["on_the_fly_gpu_hours"]), _num(r["train_gpu_hours"]),
             _num(r["encode_once_plus_train_gpu_hours"])) for r in plan.per_model()]
    lines += _table(head, body)
    lines += [
        "",
        f"totals: {t['cells']} cells, {t['pairs']:,} rows, {t['images']:,} images, download {_num(t['download_gb'])} "
        f"GB, store {_num(t['store_gb'])} GB",
        f"  preprocessed: encode {_num(t['encode_gpu_hours'])} + train {_num(t['train_gpu_hours'])} = "
        f"{_num(t['preprocessed_gpu_hours'])} GPU-h ({_num(t['wall_hours_preprocessed'])} h on {c.gpus} GPU(s))",
        f"  on the fly:   {_num(t['on_the_fly_gpu_hours'])} GPU-h ({_num(t['wall_hours_on_the_fly'])} h on "
        f"{c.gpus} GPU(s))",
        f"  cache speed-up: {_num(t['cache_speedup'], 2)}x",
        "",
        "sources:",
        f"  peak: {d['peak_source']}",
        f"  MFU: {d['mfu_source']}",
        "  FLOPs: training/cost.py (matmuls + attention, 2 per multiply-add, training = 3 x forward; text tower at "
        "77 positions; on the fly = both towers on every sample of every step, image decoding not counted)",
    ]
    seen = set()
    for p in plan.precompute:
        if p.dataset not in seen:
            seen.add(p.dataset)
            lines += [f"  {p.dataset}: rows: {p.sizes_source}; tokens: {p.tokens_source}; download: "
                      f"{p.download_source}"]
    return "\n".join(lines)


_TEXT_COLUMNS = {"dataset", "decoder", "objective"}


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if h in _TEXT_COLUMNS else c.rjust(w)
                         for h, c, w in zip(head, cells, widths, strict=True)).rstrip()

    return [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]
