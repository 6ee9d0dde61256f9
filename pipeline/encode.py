"""Encode stage: one webdataset image shard -> one embedding-store shard, each pair encoded once.

`encode_shard` is the unit of work; `encode` runs every shard of an image directory (one
Dask task each) and skips the ones the store already lists, so a killed run resumes where it
stopped and a rerun is a no-op. The fan-out rules live here for the CLI and the Prefect flow
alike: `shards_to_encode` picks the shards, `encode_shard_retrying` retries transient failures,
`collect_shards` stops the run on a permanent one.
"""

import hashlib
import io
import logging
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.errors import PermanentError, is_permanent
from pipeline.shards import completed_shards, shard_fingerprint
from pipeline.webdataset import IMAGE_EXTS, tar_samples
from storage_schema import CAPTION_SEP, StoreWriter, build_table
from storage_schema.writer import StoreError, read_manifest

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # the decoders Image.open may try (PIL tries every plugin otherwise)
# A 150 KB tar can hold a 13,000^2 PNG (0.5 GB decoded): an image over this is not decoded, its row is skipped
# with the reason. Pixels are read from the image's header first. Members: webdataset.MAX_MEMBER_BYTES.
MAX_IMAGE_PIXELS = 32_000_000  # width x height (e.g. 6,500 x 4,900); img2dataset's shards are far smaller
SHARD_ATTEMPTS = 3  # a shard failing for a transient reason (a timeout, a worker that died) is tried twice more
RETRY_DELAY_S = 5.0  # the pause before the second attempt; doubled before each later one
ROWS_PER_ITEM = 8  # rows a producer item may hold, in batches: bounds memory when rows keep reusing images


@dataclass
class EncodeConfig:
    encoder: str  # preset name, `open_clip:<model>[/<tag>]`, or an encoder folder
    batch_size: int = 64  # images per image-tower batch, captions per text-tower batch
    device: str | None = None  # default: cuda if present, else cpu
    dtype: str | None = None  # default: fp16 on GPU, fp32 on CPU
    decode_threads: int = 2  # image decoding + preprocessing threads, overlapped with the model
    prefetch_batches: int = 2  # bounded queue between decoding and the model
    torch_threads: int | None = None  # intra-op threads of the model on CPU (None: torch's default)
    # A sample whose KEY.json lists more captions (`alt_captions`, e.g. MS-COCO's five per image) gives
    # one pair per caption, keyed KEY#1, KEY#2, ... after KEY itself (see storage_schema.image_key: held-out
    # splits keep all of an image's rows on one side); False keeps the first caption only.
    alt_captions: bool = True


@dataclass
class Sample:
    key: str
    caption: str | None
    image: bytes | None
    url: str | None
    problem: str | None = None  # why the sample cannot become a row, found while reading the tar


@dataclass
class ShardResult:
    shard: str
    status: str  # "written" | "already-done"
    rows: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"key", "reason"}
    images: int = 0  # distinct images encoded (fewer than rows where rows share an image)


def image_shards(image_dir: str | Path) -> list[Path]:
    """The finished webdataset tars of a download folder, in shard order.

    img2dataset writes NNNNN_stats.json after a shard's tar is closed, so a tar without it
    may be half-written by a download still running (or killed) and is not encoded yet.
    """
    return completed_shards(image_dir)


def iter_webdataset(tar_path: Path, alt_captions: bool = False) -> Iterator[Sample]:
    """Samples of one webdataset tar: KEY.jpg + KEY.txt (+ KEY.json), as img2dataset or a hub copy writes them.

    ``alt_captions``: also yield KEY#1, KEY#2, ... for the extra captions listed in KEY.json.
    Samples are grouped by `webdataset.tar_samples`, so their keys are unique (the alt captions'
    included); one it refuses (a key used twice, not UTF-8 or holding CAPTION_SEP, a member too
    large) comes with its `problem` and nothing of it read.
    """
    import json

    with tarfile.open(tar_path) as tar:
        for s in tar_samples(tar):
            if s.problem:
                yield Sample(s.key, None, None, None, problem=s.problem)
                continue
            data = {ext: tar.extractfile(m).read() for ext, m in s.members.items()}  # type: ignore[union-attr]
            image = next((data[e] for e in IMAGE_EXTS if e in data), None)
            caption = data["txt"].decode("utf-8", errors="replace") if "txt" in data else None
            meta: dict = {}
            if "json" in data:
                try:
                    meta = json.loads(data["json"])
                except ValueError:
                    meta = {}
            meta = meta if isinstance(meta, dict) else {}
            url = meta.get("url") if isinstance(meta.get("url"), str) else None
            extra = meta.get("alt_captions") if alt_captions and isinstance(meta.get("alt_captions"), list) else []
            yield Sample(s.key, caption, image, url)
            for i, c in enumerate(extra, start=1):  # a caption that is not text is skipped as missing
                yield Sample(f"{s.key}{CAPTION_SEP}{i}", c if isinstance(c, str) else None, image, url)


def _row_problem(sample: Sample) -> str | None:
    """Why a row cannot become a pair before its image is even looked at (None: it can)."""
    if sample.problem:
        return sample.problem
    if sample.caption is None or not sample.caption.strip():
        return "missing or empty caption"
    if sample.image is None:
        return "no image in the sample"
    return None


def _decode(data: bytes) -> tuple[Image.Image | None, str | None]:
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                return None, f"image too large: {im.width}x{im.height} pixels (limit {MAX_IMAGE_PIXELS:,})"
            return im.convert("RGB"), None
    except Exception as e:  # PIL raises many types for broken files
        return None, f"corrupt image: {type(e).__name__}: {e}"


@dataclass
class _Work:
    """One item from the producer: rows whose images are all encoded once this item's are."""

    rows: list[Sample]
    image_index: list[int]  # per row: its distinct image's position among the shard's images
    pixels: torch.Tensor | None  # the images first seen in this item, preprocessed, in index order


def _batches(tar_path: Path, encoder, cfg: EncodeConfig, skipped: list[dict], out: queue.Queue, stop):
    """Producer thread: read the tar, decode and preprocess each distinct image once, hand work to the model.

    Rows that carry the same image bytes (MS-COCO's five captions of one image, or one image under
    two urls) share one decode, one preprocess and one image-tower row: an image is named by a
    digest of its bytes, and its embedding is a function of those bytes alone. An item closes when
    it holds `batch_size` new images (so the image tower gets full batches) or `ROWS_PER_ITEM` rows.
    """
    try:
        with ThreadPoolExecutor(cfg.decode_threads) as pool:
            index_of: dict[bytes, int] = {}  # image digest -> its position among the shard's images
            broken: dict[bytes, str] = {}  # image digest -> why it cannot be decoded
            new: dict[bytes, bytes] = {}  # digest -> bytes of the images first seen in this item
            rows: list[tuple[Sample, bytes | str]] = []  # (row, its image's digest or why the row is skipped)

            def emit() -> None:
                images = []
                for digest, (img, reason) in zip(new, pool.map(_decode, new.values()), strict=True):
                    if reason:
                        broken[digest] = reason
                    else:
                        index_of[digest] = len(index_of)
                        images.append(img)
                good, index = [], []
                for sample, ref in rows:
                    reason = ref if isinstance(ref, str) else broken.get(ref)
                    if reason:
                        skipped.append({"key": sample.key, "reason": reason})
                    else:
                        good.append(sample)
                        index.append(index_of[ref])
                if good:
                    out.put(_Work(good, index, encoder.preprocess(images) if images else None))
                new.clear()
                rows.clear()

            for sample in iter_webdataset(tar_path, cfg.alt_captions):
                if stop.is_set():
                    return
                problem = _row_problem(sample)
                if problem:
                    rows.append((sample, problem))
                else:
                    digest = hashlib.blake2b(sample.image, digest_size=16).digest()
                    if digest not in index_of and digest not in broken:
                        new.setdefault(digest, sample.image)
                    rows.append((sample, digest))
                if len(new) == cfg.batch_size or len(rows) >= ROWS_PER_ITEM * cfg.batch_size:
                    emit()
            if rows:
                emit()
        out.put(None)
    except BaseException as e:  # surface producer errors in the consumer
        out.put(e)


def encode_shard(tar_path: str | Path, store_dir: str | Path, cfg: EncodeConfig) -> ShardResult:
    """Encode one image shard into the store (atomic; a finished shard is not redone).

    The image tower runs once per distinct image of the shard, the text tower once per row.
    """
    from pipeline.encoders import get_encoder

    tar_path = Path(tar_path)
    name = tar_path.name.removesuffix(".tar")
    manifest = read_manifest(Path(store_dir))
    if manifest and f"{name}.parquet" in manifest["shards"]:
        entry = manifest["shards"][f"{name}.parquet"]
        return ShardResult(name, "already-done", entry["rows"], images=entry.get("images", 0))
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    encoder = get_encoder(cfg.encoder, cfg.device, cfg.dtype)
    writer = StoreWriter(store_dir, encoder.info)  # refuses a store made by another encoder

    skipped: list[dict] = []
    q: queue.Queue = queue.Queue(maxsize=cfg.prefetch_batches)
    stop = threading.Event()
    producer = threading.Thread(target=_batches, args=(tar_path, encoder, cfg, skipped, q, stop), daemon=True)
    producer.start()
    keys, captions, urls, img_parts, row_image, txt_parts, hidden, truncated = [], [], [], [], [], [], [], []
    try:
        with torch.inference_mode():
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if item.pixels is not None:
                    img_parts.append(encoder.encode_images(item.pixels).to(torch.float16).cpu().numpy())
                row_image += item.image_index
                for start in range(0, len(item.rows), cfg.batch_size):
                    samples = item.rows[start : start + cfg.batch_size]
                    caps = [s.caption.strip() for s in samples]
                    txt = encoder.encode_texts(caps)
                    txt_parts.append(txt.text_embeds.to(torch.float16).cpu().numpy())
                    hidden += [h.astype(np.float16, copy=False) for h in txt.hidden]
                    truncated += txt.truncated
                    keys += [s.key for s in samples]
                    captions += caps
                    urls += [s.url for s in samples]
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
    producer.join()
    info = encoder.info
    images = np.concatenate(img_parts) if img_parts else np.zeros((0, info.image_dim), np.float16)
    table = build_table(
        info, keys, captions,
        images[np.asarray(row_image, dtype=np.int64)],
        np.concatenate(txt_parts) if txt_parts else np.zeros((0, info.text_dim), np.float16),
        hidden, truncated, urls,
    )
    writer.write_shard(name, table, extra={"source": tar_path.name, "source_fingerprint": shard_fingerprint(tar_path),
                                           "images": len(images), "skipped": skipped})
    if skipped:
        log.warning("shard %s: skipped %d samples (first: %s)", name, len(skipped), skipped[0])
    return ShardResult(name, "written", table.num_rows, skipped, images=len(images))


class EncodeFailed(PermanentError, RuntimeError):
    """A shard failed for a reason a retry cannot fix (e.g. the encoder's weights are missing); the run stopped."""


def check_store_encoder(store_dir: str | Path, encoder: str) -> None:
    """Refuse, before any work, an encoder name that does not load or a store another encoder made.

    The writer refuses such a store's shards too, but only for shards still to do: a rerun that
    finds every shard listed would otherwise exit 0 with the old encoder's store.
    """
    from pipeline.encoders import check_encoder

    label = check_encoder(encoder)
    manifest = read_manifest(Path(store_dir))
    if manifest is None or manifest["encoder"].get("preset") == label:
        return
    existing = manifest["encoder"].get("preset")
    raise StoreError(
        f"{store_dir}: this store was made by encoder {existing!r}, not {label!r}. Pass --encoder {existing} to "
        f"resume it, or encode {label!r} into a new store folder (precompute: another --out, or --overwrite to "
        "start this one over)."
    )


def shards_to_encode(image_dir: str | Path, store_dir: str | Path) -> tuple[list[Path], list[str]]:
    """(the finished image shards the store does not list yet, the names of those it already lists).

    Refuses a store whose shards were encoded from image shards that have since been replaced (the
    images downloaded again): resuming would keep the old images' rows as if they were the new ones.
    """
    manifest = read_manifest(Path(store_dir))
    done = manifest["shards"] if manifest else {}
    todo: list[Path] = []
    already: list[str] = []
    stale: list[str] = []
    for tar in image_shards(image_dir):
        name = tar.name.removesuffix(".tar")
        entry = done.get(f"{name}.parquet")
        if entry is None:
            todo.append(tar)
            continue
        already.append(name)
        recorded = entry.get("source_fingerprint")  # absent in stores written before it was recorded
        if recorded is not None and recorded != shard_fingerprint(tar):
            stale.append(name)
    if stale:
        raise StoreError(
            f"{store_dir}: {len(stale)} shard(s) ({', '.join(stale[:5])}{', ...' if len(stale) > 5 else ''}) were "
            f"encoded from image shards of {image_dir} that have since been downloaded again; the store still "
            "holds the old images' rows. Encode into a new store folder, or remove this store to encode it again "
            "(precompute --overwrite starts both folders over)."
        )
    return todo, already


def encode_shard_retrying(tar_path: str | Path, store_dir: str | Path, cfg: EncodeConfig,
                          attempts: int = SHARD_ATTEMPTS, delay_s: float = RETRY_DELAY_S) -> ShardResult:
    """`encode_shard`, tried again after a pause (doubling) while it fails for a reason a retry may fix.

    A permanent error (`pipeline.errors.is_permanent`: another encoder's store, weights that cannot
    load) is raised at once: retrying it only delays the message.
    """
    for attempt in range(1, attempts + 1):
        try:
            return encode_shard(tar_path, store_dir, cfg)
        except Exception as e:
            if is_permanent(e) or attempt == attempts:
                raise
            wait = delay_s * 2 ** (attempt - 1)
            log.warning("shard %s: attempt %d of %d failed (%s: %s); retrying in %.0f s", Path(tar_path).name,
                        attempt, attempts, type(e).__name__, e, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


@dataclass
class EncodeSummary:
    store: str
    written: list[ShardResult] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard -> error
    cancelled: list[str] = field(default_factory=list)  # not run: an earlier shard failed permanently
    errors: dict[str, BaseException] = field(default_factory=dict, repr=False)  # shard -> the exception

    @property
    def rows_written(self) -> int:
        return sum(r.rows for r in self.written)

    @property
    def skipped(self) -> list[dict]:
        return [s for r in self.written for s in r.skipped]

    def record(self, name: str, outcome: ShardResult | BaseException) -> None:
        """File one shard's result (or the exception it ended with) under its status."""
        if isinstance(outcome, BaseException):
            self.failed[name] = f"{type(outcome).__name__}: {outcome}"
            self.errors[name] = outcome
        elif outcome.status == "written":
            self.written.append(outcome)
        else:
            self.already_done.append(name)

    def rows(self) -> list[dict]:
        """One row per shard: shard, status, rows, skipped, first_reason (the CLI table, the flow's artifact)."""
        out = [{"shard": r.shard, "status": "written", "rows": r.rows, "skipped": len(r.skipped),
                "first_reason": r.skipped[0]["reason"] if r.skipped else ""} for r in self.written]
        out += [{"shard": n, "status": "already done", "rows": 0, "skipped": 0, "first_reason": ""}
                for n in self.already_done]
        out += [{"shard": n, "status": "FAILED", "rows": 0, "skipped": 0, "first_reason": err}
                for n, err in self.failed.items()]
        out += [{"shard": n, "status": "cancelled", "rows": 0, "skipped": 0, "first_reason": ""}
                for n in self.cancelled]
        return out

    def table(self) -> str:
        lines = [f"{'shard':<12}{'status':<14}{'rows':>8}{'skipped':>9}  first reason"]
        for r in self.rows():
            counts = f"{r['rows']:>8}{r['skipped']:>9}" if r["status"] == "written" else f"{'':>8}{'':>9}"
            lines.append(f"{r['shard']:<12}{r['status']:<14}{counts}  {r['first_reason'][:60]}".rstrip())
        return "\n".join(lines)

    def raise_if_failed(self, total: int) -> None:
        """EncodeFailed when a shard failed permanently (the run stopped), RuntimeError for transient failures."""
        if not self.failed:
            return
        permanent = [e for e in self.errors.values() if is_permanent(e)]
        first = (permanent or list(self.errors.values()))[0]  # the cause to fix; the table lists them all
        msg = (f"{len(self.failed)} of {total} shard(s) failed ({'not retried: ' if permanent else ''}"
               f"{type(first).__name__}: {first}); finished shards are kept, rerun once this is fixed\n{self.table()}")
        raise (EncodeFailed if permanent else RuntimeError)(msg)


def collect_shards(futures: dict[Any, str], as_completed: Callable[[list], Iterable], summary: EncodeSummary,
                   on_done: Callable[[int], None] | None = None, cancel: bool = True) -> EncodeSummary:
    """Wait for one future per shard (`futures`: future -> shard name) and file each outcome in `summary`.

    The one rule for shard failures, for the CLI (Dask futures) and the flow (Prefect futures):
    the shards were run by `encode_shard_retrying`, so what fails here failed for good. A
    permanent failure stops the run: the shards not finished yet are cancelled (when `cancel`;
    Prefect futures cannot be) and EncodeFailed is raised. A transient one is reported for its
    shard while the others go on, and RuntimeError is raised at the end. Finished shards stay written.
    `on_done(n)` is called after the n-th shard finished (a progress bar).
    """
    stopping = False
    for n, fut in enumerate(as_completed(list(futures)), start=1):
        name = futures[fut]
        try:
            summary.record(name, fut.result())
        except CancelledError:
            summary.cancelled.append(name)
        except Exception as e:
            summary.record(name, e)
            if cancel and not stopping and is_permanent(e):
                stopping = True
                for other in futures:
                    if not other.done():
                        other.cancel()
        if on_done is not None:
            on_done(n)
    summary.raise_if_failed(len(futures))
    return summary


def encode(
    image_dir: str | Path,
    store_dir: str | Path,
    cfg: EncodeConfig,
    client=None,
    cluster=None,
    progress: bool = True,
) -> EncodeSummary:
    """Encode every image shard not yet in the store, one Dask task per shard.

    Uses `client` if given, else starts a cluster from `cluster` (`pipeline.cluster.ClusterConfig`).
    Failures are handled by `collect_shards`: finished shards stay written, a rerun retries the rest.
    """
    from distributed import as_completed
    from tqdm import tqdm

    from pipeline.cluster import dask_client

    check_store_encoder(store_dir, cfg.encoder)
    todo, already = shards_to_encode(image_dir, store_dir)
    summary = EncodeSummary(str(store_dir), already_done=already)
    if not todo and not already:
        raise FileNotFoundError(
            f"{image_dir}: no finished image shards (*.tar with *_stats.json); run the download stage first"
        )
    if not todo:
        log.info("all %d shards already encoded in %s", len(already), store_dir)
        return summary

    def run(c) -> None:
        futures = {c.submit(encode_shard_retrying, str(t), str(store_dir), cfg, key=f"encode-{t.name}", pure=False):
                   t.name.removesuffix(".tar") for t in todo}
        with tqdm(total=len(futures), desc="encode shards", unit="shard", disable=not progress) as bar:
            def advance(_: int) -> None:
                bar.update(1)
                bar.set_postfix(rows=summary.rows_written, failed=len(summary.failed))

            collect_shards(futures, as_completed, summary, on_done=advance)

    if client is not None:
        run(client)
    else:
        with dask_client(cluster) as c:
            run(c)
    return summary
