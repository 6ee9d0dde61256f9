"""Precompute stage: download image-text pairs, then encode each pair once into the store.

Layout of an output folder: DIR/images (webdataset shards from img2dataset) and
DIR/store (the embedding store). Both steps skip finished shards, so running the same
command twice is a no-op the second time. The encoder is checked against the store before
the download starts; starting over (`incremental_mode="overwrite"`) starts both folders over.
"""

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.cluster import ClusterConfig
from pipeline.download import DownloadConfig, download_main
from pipeline.download_summary import DownloadSummary
from pipeline.encode import EncodeConfig, EncodeSummary, check_store_encoder, encode
from storage_schema.writer import MANIFEST_NAME

log = logging.getLogger(__name__)


@dataclass
class PrecomputeResult:
    images: Path
    store: Path
    download: DownloadSummary
    encode: EncodeSummary


def output_dirs(out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    return out / "images", out / "store"


def precompute(
    urls: str | Path,
    out: str | Path,
    encode_cfg: EncodeConfig,
    download_cfg: DownloadConfig | None = None,
    cluster: ClusterConfig | None = None,
    source_options: dict | None = None,
    progress: bool = True,
    retry_failed: bool = False,
) -> PrecomputeResult:
    """urls: a url list file/folder or a dataset preset (see `pipeline.sources`); `retry_failed` re-feeds the
    urls that failed once before the download is judged (`pipeline.download.download_main`)."""
    images, store = output_dirs(out)
    download_cfg = download_cfg or DownloadConfig()
    prepare_store(store, encode_cfg.encoder, start_over=download_cfg.incremental_mode == "overwrite")
    dl = download_main(urls, images, source_options=source_options, retry=retry_failed, **_fields(download_cfg))
    log.info("download: %d images in %d shards (error rate %.1f%%)", dl.successes, len(dl.shards),
             100 * dl.error_rate)
    enc = encode(images, store, encode_cfg, cluster=cluster, progress=progress)
    return PrecomputeResult(images, store, dl, enc)


def prepare_store(store: Path, encoder: str, start_over: bool) -> None:
    """Before the download: check the encoder name, then remove the store (starting over: the images are
    downloaded again, so its rows would be the old images') or refuse one that another encoder made."""
    from pipeline.encoders import check_encoder

    if start_over:
        check_encoder(encoder)
        _remove_store(store)
    else:
        check_store_encoder(store, encoder)


def _remove_store(store: Path) -> None:
    if not store.exists():
        return
    # The manifest goes first: a removal killed half-way leaves no store that looks complete.
    (store / MANIFEST_NAME).unlink(missing_ok=True)
    trash = store.with_name(f".{store.name}.removing-{os.getpid()}")
    os.replace(store, trash)
    shutil.rmtree(trash)
    log.info("removed %s to start over", store)


def _fields(cfg: DownloadConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
