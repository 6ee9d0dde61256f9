"""Encode stage: one webdataset image shard -> one embedding-store shard, each pair encoded once.

`encode_shard` is the unit of work (a Dask task in `pipeline.cluster`); `encode` runs every
shard of an image directory and skips the ones the store already lists, so a killed run
resumes where it stopped and a rerun is a no-op.
"""

import io
import logging
import queue
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from storage_schema import CAPTION_SEP, StoreWriter, build_table
from storage_schema.writer import read_manifest

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class EncodeConfig:
    encoder: str  # preset name, `open_clip:<model>[/<tag>]`, or an encoder folder
    batch_size: int = 64
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


@dataclass
class ShardResult:
    shard: str
    status: str  # "written" | "already-done"
    rows: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"key", "reason"}


def image_shards(image_dir: str | Path) -> list[Path]:
    """The finished webdataset tars of a download folder, in shard order.

    img2dataset writes NNNNN_stats.json after a shard's tar is closed, so a tar without it
    may be half-written by a download still running (or killed) and is not encoded yet.
    """
    from pipeline.download import completed_shards

    return completed_shards(image_dir)


def iter_webdataset(tar_path: Path, alt_captions: bool = False) -> Iterator[Sample]:
    """Samples of one webdataset tar: KEY.jpg + KEY.txt (+ KEY.json), as img2dataset or a hub copy writes them.

    ``alt_captions``: also yield KEY#1, KEY#2, ... for the extra captions listed in KEY.json.
    """
    import json

    current: dict[str, bytes] = {}
    current_key: str | None = None

    def flush() -> list[Sample]:
        if current_key is None:
            return []
        image = next((current[e] for e in IMAGE_EXTS if e in current), None)
        caption = current["txt"].decode("utf-8", errors="replace") if "txt" in current else None
        meta: dict = {}
        if "json" in current:
            try:
                meta = json.loads(current["json"])
            except ValueError:
                meta = {}
        meta = meta if isinstance(meta, dict) else {}
        url = meta.get("url")
        extra = (meta.get("alt_captions") or []) if alt_captions else []
        return [Sample(current_key, caption, image, url)] + [
            Sample(f"{current_key}{CAPTION_SEP}{i}", str(c), image, url) for i, c in enumerate(extra, start=1)
        ]

    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            if key != current_key:
                yield from flush()
                current, current_key = {}, key
            current[ext.lower()] = tar.extractfile(member).read()
    yield from flush()


def _decode(sample: Sample) -> tuple[Image.Image | None, str | None]:
    if sample.caption is None or not sample.caption.strip():
        return None, "missing or empty caption"
    if sample.image is None:
        return None, "no image in the sample"
    try:
        with Image.open(io.BytesIO(sample.image)) as im:
            return im.convert("RGB"), None
    except Exception as e:  # PIL raises many types for broken files
        return None, f"corrupt image: {type(e).__name__}: {e}"


def _batches(tar_path: Path, encoder, cfg: EncodeConfig, skipped: list[dict], out: queue.Queue, stop):
    """Producer thread: read the tar, decode and preprocess batches, hand them to the model."""
    try:
        with ThreadPoolExecutor(cfg.decode_threads) as pool:
            pending: list[Sample] = []

            def emit(samples: list[Sample]) -> None:
                good, images = [], []
                for s, (img, reason) in zip(samples, pool.map(_decode, samples), strict=True):
                    if reason:
                        skipped.append({"key": s.key, "reason": reason})
                    else:
                        good.append(s)
                        images.append(img)
                if good:
                    out.put((good, encoder.preprocess(images)))

            for sample in iter_webdataset(tar_path, cfg.alt_captions):
                if stop.is_set():
                    return
                pending.append(sample)
                if len(pending) == cfg.batch_size:
                    emit(pending)
                    pending = []
            if pending:
                emit(pending)
        out.put(None)
    except BaseException as e:  # surface producer errors in the consumer
        out.put(e)


def encode_shard(tar_path: str | Path, store_dir: str | Path, cfg: EncodeConfig) -> ShardResult:
    """Encode one image shard into the store (atomic; a finished shard is not redone)."""
    from pipeline.encoders import get_encoder

    tar_path = Path(tar_path)
    name = tar_path.name.removesuffix(".tar")
    manifest = read_manifest(Path(store_dir))
    if manifest and f"{name}.parquet" in manifest["shards"]:
        return ShardResult(name, "already-done", manifest["shards"][f"{name}.parquet"]["rows"])
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    encoder = get_encoder(cfg.encoder, cfg.device, cfg.dtype)
    writer = StoreWriter(store_dir, encoder.info)  # refuses a store made by another encoder

    skipped: list[dict] = []
    q: queue.Queue = queue.Queue(maxsize=cfg.prefetch_batches)
    stop = threading.Event()
    producer = threading.Thread(target=_batches, args=(tar_path, encoder, cfg, skipped, q, stop), daemon=True)
    producer.start()
    keys, captions, urls, img_parts, txt_parts, hidden, truncated = [], [], [], [], [], [], []
    try:
        with torch.inference_mode():
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                samples, pixels = item
                caps = [s.caption.strip() for s in samples]
                img = encoder.encode_images(pixels)
                txt = encoder.encode_texts(caps)
                img_parts.append(img.to(torch.float16).cpu().numpy())
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
    table = build_table(
        info, keys, captions,
        np.concatenate(img_parts) if img_parts else np.zeros((0, info.image_dim), np.float16),
        np.concatenate(txt_parts) if txt_parts else np.zeros((0, info.text_dim), np.float16),
        hidden, truncated, urls,
    )
    writer.write_shard(name, table, extra={"source": tar_path.name, "skipped": skipped})
    if skipped:
        log.warning("shard %s: skipped %d samples (first: %s)", name, len(skipped), skipped[0])
    return ShardResult(name, "written", table.num_rows, skipped)


@dataclass
class EncodeSummary:
    store: str
    written: list[ShardResult] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard -> error

    @property
    def rows_written(self) -> int:
        return sum(r.rows for r in self.written)

    @property
    def skipped(self) -> list[dict]:
        return [s for r in self.written for s in r.skipped]

    def table(self) -> str:
        lines = [f"{'shard':<12}{'status':<14}{'rows':>8}{'skipped':>9}  first reason"]
        for r in self.written:
            reason = r.skipped[0]["reason"] if r.skipped else ""
            lines.append(f"{r.shard:<12}{'written':<14}{r.rows:>8}{len(r.skipped):>9}  {reason[:60]}")
        for name in self.already_done:
            lines.append(f"{name:<12}{'already done':<14}")
        for name, err in self.failed.items():
            lines.append(f"{name:<12}{'FAILED':<14}{'':>8}{'':>9}  {err[:60]}")
        return "\n".join(lines)


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
    Raises after all shards ran if any failed; finished shards stay written.
    """
    from distributed import as_completed
    from tqdm import tqdm

    from pipeline.cluster import dask_client
    from storage_schema import StoreError

    store_dir = Path(store_dir)
    tars = image_shards(image_dir)
    if not tars:
        raise FileNotFoundError(
            f"{image_dir}: no finished image shards (*.tar with *_stats.json); run the download stage first"
        )
    manifest = read_manifest(store_dir)
    done = set(manifest["shards"]) if manifest else set()
    summary = EncodeSummary(str(store_dir))
    todo = []
    for t in tars:
        name = t.name.removesuffix(".tar")
        if f"{name}.parquet" in done:
            summary.already_done.append(name)
        else:
            todo.append(t)
    if not todo:
        log.info("all %d shards already encoded in %s", len(tars), store_dir)
        return summary

    def run(c) -> None:
        futures = {c.submit(encode_shard, str(t), str(store_dir), cfg, key=f"encode-{t.name}", pure=False): t
                   for t in todo}
        bar = tqdm(total=len(futures), desc="encode shards", unit="shard", disable=not progress)
        for fut in as_completed(futures):
            name = futures[fut].name.removesuffix(".tar")
            try:
                result = fut.result()
            except StoreError as e:
                # A store made by another encoder: every other shard would fail the same way.
                for other in futures:
                    other.cancel()
                bar.close()
                raise StoreError(f"shard {name}: {e}") from e
            except Exception as e:
                summary.failed[name] = f"{type(e).__name__}: {e}"
            else:
                if result.status == "written":
                    summary.written.append(result)
                else:
                    summary.already_done.append(name)
            bar.update(1)
            bar.set_postfix(rows=summary.rows_written, failed=len(summary.failed))
        bar.close()

    if client is not None:
        run(client)
    else:
        with dask_client(cluster) as c:
            run(c)
    if summary.failed:
        raise RuntimeError(f"{len(summary.failed)} shard(s) failed; rerun to retry them:\n{summary.table()}")
    return summary
