"""Image-text sources: dataset presets and local url lists -> one de-duplicated url list.

A :class:`Source` says where the (url, caption) metadata lives, how its columns are
named, which rows to keep and whether to sample. :func:`prepare_url_list` turns it
into the single Parquet file the download stage feeds to img2dataset::

    url: string, caption: string, <extra columns...>

Presets (facts from the public dataset pages; the paper is ECLIPSE, Table 1/§4). Their
files are found on the Hugging Face hub by listing the repo and matching a glob (see
:mod:`pipeline.hub`), never by hard-coded names:

``laion-highres-5m``  the paper's Kandinsky v2.2 setting: a 5M-pair subset of
    LAION-HighRes (``laion/laion-high-resolution``: 170M pairs >= 1024x1024 from
    LAION-5B, Parquet parts ``*.parquet``; the repo is gated: accept its terms on the hub
    and log in, see :mod:`pipeline.hub`). Columns: ``URL``, ``TEXT``,
    ``WIDTH``, ``HEIGHT``, ``similarity``, ``hash``, ``punsafe``, ``pwatermark``,
    ``LANGUAGE``. The paper does not publish its filters or sampling; ours (documented
    choices, all overridable): caption present (>= 5 chars); WIDTH and HEIGHT >= 1024
    (the dataset's own definition, re-checked); ``LANGUAGE == "en"`` because the
    Kandinsky text tower (CLIP ViT-bigG/14, LAION-2B-en) is English; ``punsafe < 0.5``
    and ``pwatermark < 0.8`` (LAION's usual thresholds). Then a seeded sample of
    exactly 5,000,000 rows: every row gets ``score = siphash(seed, URL)`` and the
    smallest scores are kept. That is a uniform sample without replacement that does
    not depend on file order or on how many files were read, and samples of different
    sizes with one seed are nested (the 1M sample is a subset of the 5M one). Rows are
    written in score order, so every download shard is itself a random mixture.
``mscoco``  COCO 2017 train captions as url/text pairs (img2dataset's example):
    ``ChristophSchuhmann/MS_COCO_2017_URL_TEXT`` (``*.parquet``, one 18 MB file),
    columns ``URL``, ``TEXT``; ~591k captions of ~118k images (the paper's "0.6M").
    Five captions share one url: de-duplication keeps the first caption in
    ``caption`` and the other ones in the list column ``alt_captions``, so each image
    is downloaded once, and the encode stage makes every caption its own pair
    (``EncodeConfig.alt_captions``, on by default).
``cc3m``  Conceptual Captions as a webdataset on the hub (``pixparse/cc3m-wds``, tars
    ``cc3m-train-*.tar`` of ``KEY.jpg`` + ``KEY.txt``; ~2.9M pairs). Google's TSV urls
    answer 403 and many image links have rotted, so the images are taken from the tars.
``cc12m``  Conceptual 12M, likewise (``pixparse/cc12m-wds``, ``cc12m-train-*.tar``, ~11M pairs).

A webdataset source (``kind="webdataset"``) skips the url list and img2dataset: its tars
are laid out as image shards for the encode stage (:func:`pipeline.webdataset.materialize_webdataset`).

Any local ``.parquet`` / ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` file, or a folder
of them, is a source too; url and caption columns are auto-detected
(:data:`URL_COLUMNS`, :data:`CAPTION_COLUMNS`). A folder (or file) of ``.tar`` files is a
local webdataset source.

Files downloaded by hand: pass ``metadata_dir`` (``--metadata-dir``). Every file under it
whose name matches the source's glob (:func:`local_glob`, e.g. ``*.parquet`` or
``cc3m-train-*.tar``) is used, whatever the rest of its name, and nothing is fetched.

Network: hub files go through huggingface_hub and its cache (``HF_ENDPOINT``,
``HF_HOME``, ``HF_TOKEN`` honoured); plain http(s) files are fetched once into a cache
folder (``metadata_dir``, or ``$ECLIPSE_METADATA_CACHE``, or
``~/.cache/eclipse-prior/metadata/<name>``). When a file is missing, the fetch first
refuses outright under ``HF_HUB_OFFLINE=1`` / ``ECLIPSE_OFFLINE=1`` (using the cache
where it can), then probes the host with a bounded timeout (DNS included), so an offline
machine gets a clear error in seconds, never a hang.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SourceError, SourceUnavailableError
from pipeline.hub import check_reachable, fetch_files, offline_flag
from storage_schema.atomic import atomic_path

log = logging.getLogger(__name__)

#: Column names tried, in order, when a source does not name its url / caption column.
URL_COLUMNS = ("url", "URL", "image_url", "img_url", "imageurl", "image", "link")
CAPTION_COLUMNS = ("caption", "TEXT", "text", "captions", "alt_text", "alt", "title", "prompt", "description")
#: img2dataset reserves these names for its own metadata (save_additional_columns refuses them),
#: so extra source columns with these names are kept under ``src_<name>``.
RESERVED_COLUMNS = frozenset(
    {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
     "error_message", "exif", "md5", "sha256", "sha512"}
)
FORMATS = ("parquet", "csv", "tsv", "jsonl", "json")
URL_LIST_METADATA_KEY = b"eclipse.url_list"


@dataclass(frozen=True)
class Filters:
    """Row filters; each one applies only when its column exists in the metadata."""

    min_caption_chars: int = 1  # captions shorter than this (after strip) count as empty
    min_width: int = 0
    min_height: int = 0
    width_col: str = "WIDTH"
    height_col: str = "HEIGHT"
    languages: tuple[str, ...] | None = None  # keep rows whose language is one of these
    language_col: str = "LANGUAGE"
    max_punsafe: float | None = None  # LAION's NSFW probability
    punsafe_col: str = "punsafe"
    max_pwatermark: float | None = None  # LAION's watermark probability
    pwatermark_col: str = "pwatermark"


@dataclass(frozen=True)
class Source:
    """Where image-text metadata lives and how to turn it into a url list."""

    name: str
    files: tuple[str, ...]  # local paths or http(s) urls of metadata files (or of tars, for a webdataset)
    file_format: str  # one of FORMATS, or "tar" for a webdataset
    url_col: str | None = None  # None: auto-detect from URL_COLUMNS
    caption_col: str | None = None  # None: auto-detect from CAPTION_COLUMNS
    header: tuple[str, ...] | None = None  # column names for header-less csv/tsv files
    extra_cols: tuple[str, ...] | None = None  # kept in the url list; None: all other columns
    filters: Filters = field(default_factory=Filters)
    sample_size: int | None = None  # seeded subset size; None: keep every row
    seed: int = 0
    collect_alt_captions: bool = False  # keep captions of duplicate urls in `alt_captions`
    metadata_dir: str | None = None  # where remote metadata files are cached / pre-placed
    description: str = ""
    kind: str = "pairs"  # "pairs": url/caption metadata for img2dataset; "webdataset": image-text tars
    hub_repo: str | None = None  # Hugging Face dataset repo holding the files (listed, not named)
    hub_pattern: str | None = None  # glob over the repo's file paths, e.g. "*.parquet"
    hub_revision: str = "main"
    max_files: int | None = None  # webdataset: use only the first N tars (a smaller run)
    # Rows whose url is not http(s) are dropped: a url list from a stranger could otherwise name local files
    # (file:///home/me/secret.png, file:///dev/zero), which img2dataset would read. True: keep them (your own list).
    allow_local_files: bool = False

    @property
    def is_remote(self) -> bool:
        return self.hub_repo is not None or any(_is_url(f) for f in self.files)


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


WEB_URL = r"(?i)^https?://"  # the url rows a download accepts unless Source.allow_local_files
REFUSED = "not an http(s) url"  # its UrlListReport.filtered_out reason
# A caption that is only a missing-value marker (str(None), a CSV's "NaN"): dropped like an empty one.
MISSING_CAPTIONS = ("nan", "none", "null", "<na>", "n/a")
MARKER = "caption is a missing-value marker (nan, None, null)"


def _webdataset_preset(name: str, repo: str, title: str, pairs: str) -> Source:
    return Source(name=name, files=(), kind="webdataset", hub_repo=repo, hub_pattern=f"{name}-train-*.tar",
                  file_format="tar", description=f"{title}, webdataset tars from the hub ({repo}, {pairs} pairs)")


SOURCE_PRESETS: dict[str, Source] = {
    "laion-highres-5m": Source(
        name="laion-highres-5m",
        files=(),
        hub_repo="laion/laion-high-resolution",
        hub_pattern="*.parquet",
        file_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        extra_cols=("WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "LANGUAGE"),
        filters=Filters(
            min_caption_chars=5, min_width=1024, min_height=1024, languages=("en",),
            max_punsafe=0.5, max_pwatermark=0.8,
        ),
        sample_size=5_000_000,
        seed=0,
        description="ECLIPSE/Kandinsky v2.2 setting: seeded 5M subset of LAION-HighRes (laion/laion-high-resolution, "
        "gated: log in)",
    ),
    "mscoco": Source(
        name="mscoco",
        files=(),
        hub_repo="ChristophSchuhmann/MS_COCO_2017_URL_TEXT",
        hub_pattern="*.parquet",
        file_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        extra_cols=(),
        collect_alt_captions=True,
        description="MS-COCO 2017 train captions (~591k pairs of ~118k images; every caption becomes a pair)",
    ),
    "cc3m": _webdataset_preset("cc3m", "pixparse/cc3m-wds", "Conceptual Captions 3M", "~2.9M"),
    "cc12m": _webdataset_preset("cc12m", "pixparse/cc12m-wds", "Conceptual 12M", "~11M"),
}


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description (for a CLI's help)."""
    return {name: src.description for name, src in SOURCE_PRESETS.items()}


def _format_of(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    for fmt in (*FORMATS, "tar"):
        if name.endswith("." + fmt):
            return fmt
    return None


def resolve_source(name_or_path: str | os.PathLike[str], **overrides: object) -> Source:
    """A preset name or a local file/folder -> :class:`Source`. Touches no network.

    ``overrides`` replace Source fields, e.g. ``sample_size=100_000, seed=1``,
    ``metadata_dir="/data/laion-hr-meta"``, ``url_col="link"``; a ``filters`` dict
    replaces individual :class:`Filters` fields.
    """
    key = str(name_or_path)
    if key in SOURCE_PRESETS:
        src = SOURCE_PRESETS[key]
    else:
        path = Path(key).expanduser()
        if not path.exists():
            raise SourceError(
                f"{key!r} is neither a preset ({', '.join(SOURCE_PRESETS)}) nor an existing file or folder"
            )
        if path.is_dir():
            by_format: dict[str, list[Path]] = {}
            for p in sorted(path.iterdir()):
                if p.is_file() and (fmt := _format_of(p)):
                    by_format.setdefault(fmt, []).append(p)
            if not by_format:
                raise SourceError(f"{path}: no {'/'.join(FORMATS)} (or webdataset .tar) files inside")
            if len(by_format) > 1:
                raise SourceError(f"{path}: mixes formats {sorted(by_format)}; keep one format per folder")
            fmt, files = next(iter(by_format.items()))
        else:
            fmt = _format_of(path)
            if fmt is None:
                raise SourceError(f"{path}: unknown format (expected one of {', '.join(FORMATS)}, optionally .gz)")
            files = [path]
        src = Source(name=path.name.split(".")[0] or "local", files=tuple(str(p.resolve()) for p in files),
                     file_format=fmt, kind="webdataset" if fmt == "tar" else "pairs")
    if overrides:
        filt = overrides.pop("filters", None)
        if isinstance(filt, dict):
            overrides["filters"] = dataclasses.replace(src.filters, **filt)
        elif filt is not None:
            overrides["filters"] = filt
        unknown = set(overrides) - {f.name for f in dataclasses.fields(Source)}
        if unknown:
            raise SourceError(f"unknown source option(s) {sorted(unknown)}")
        src = dataclasses.replace(src, **overrides)  # type: ignore[arg-type]
    return src


# ---------------------------------------------------------------------------- network


def _cache_dir(src: Source) -> Path:
    if src.metadata_dir:
        return Path(src.metadata_dir).expanduser()
    root = os.environ.get("ECLIPSE_METADATA_CACHE") or Path.home() / ".cache" / "eclipse-prior" / "metadata"
    return Path(root) / src.name


def _download_file(url: str, dest: Path, timeout: float) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "eclipse-prior/0.1"})
    with atomic_path(dest) as tmp, urllib.request.urlopen(req, timeout=timeout) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)


def local_glob(src: Source) -> str:
    """The file-name glob that recognises the source's files in a hand-filled metadata_dir."""
    if src.hub_pattern:
        return src.hub_pattern.rpartition("/")[2]
    return f"*.{src.file_format}*"  # also .gz


def local_matches(src: Source) -> list[Path]:
    """Files under ``src.metadata_dir`` (any depth, hidden folders skipped) whose name matches :func:`local_glob`."""
    if not src.metadata_dir:
        return []
    root = Path(src.metadata_dir).expanduser()
    if not root.is_dir():
        return []
    pattern = local_glob(src)
    return sorted(p for p in root.rglob(pattern)
                  if p.is_file() and _format_of(p) == src.file_format
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def local_files(src: Source, probe_timeout: float = 3.0, fetch_timeout: float = 60.0) -> list[Path]:
    """The source's metadata files on local disk, fetching missing remote ones.

    Files put by hand into ``metadata_dir`` (any names matching :func:`local_glob`) need
    no network at all. Hub sources go through huggingface_hub and its cache
    (:func:`pipeline.hub.fetch_files`); plain urls are fetched into :func:`_cache_dir`.
    """
    if not src.is_remote:
        return [Path(f) for f in src.files]
    placed = local_matches(src)
    if placed:
        log.info("%s: using the %d file(s) matching %r in %s", src.name, len(placed), local_glob(src),
                 src.metadata_dir)
        return placed
    if src.metadata_dir:
        log.warning("%s: no file matching %r in metadata_dir %s; fetching instead", src.name, local_glob(src),
                    src.metadata_dir)
    if src.hub_repo:
        return fetch_files(src.hub_repo, src.hub_pattern or "*", src.hub_revision)
    cache = _cache_dir(src)
    wanted = [(u, cache / Path(urllib.parse.urlsplit(u).path).name) for u in src.files]
    missing = [(u, p) for u, p in wanted if not p.exists()]
    if not missing:
        return [p for _, p in wanted]
    hint = (f"download the metadata once on a connected machine (or by hand) into a folder and pass "
            f"--metadata-dir (metadata_dir=...) (files: {src.files[0]}{' ...' if len(src.files) > 1 else ''})")
    flag = offline_flag()
    if flag:
        raise SourceUnavailableError(
            f"source {src.name!r} needs {len(missing)} metadata file(s) from the internet but {flag} is set; {hint}"
        )
    try:
        check_reachable(missing[0][0], timeout=probe_timeout)
    except SourceUnavailableError as err:
        raise SourceUnavailableError(f"source {src.name!r} needs the internet: {err}; {hint}") from None
    for i, (url, path) in enumerate(missing):
        log.info("%s: fetching metadata %d/%d %s", src.name, i + 1, len(missing), url)
        try:
            _download_file(url, path, fetch_timeout)
        except OSError as err:
            raise SourceUnavailableError(f"source {src.name!r}: fetching {url} failed: {err}; {hint}") from err
    return [p for _, p in wanted]


# ---------------------------------------------------------------------------- reading


def _read_file(path: Path, src: Source) -> pd.DataFrame:
    fmt = src.file_format
    if fmt == "parquet":
        return pd.read_parquet(path)
    if fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else ","
        # dtype=str: urls and captions stay text even when they look numeric; quoting off for
        # TSV because CC3M/CC12M captions contain bare quotes.
        kw: dict[str, object] = {"sep": sep, "dtype": str, "keep_default_na": False}
        if fmt == "tsv":
            kw["quoting"] = 3  # csv.QUOTE_NONE
        if src.header:
            kw.update(header=None, names=list(src.header))
        return pd.read_csv(path, **kw)  # type: ignore[arg-type]
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    if fmt == "json":
        return pd.read_json(path, dtype=False)
    raise SourceError(f"unsupported format {fmt}")


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise SourceError(f"{path}: no {what} column {wanted!r} (columns: {columns})")
        return wanted
    for c in candidates:  # exact names first, then case-insensitive
        if c in columns:
            return c
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    raise SourceError(
        f"{path}: cannot find the {what} column (tried {', '.join(candidates)}; columns: {columns}); "
        f"name it with --{what}-col (source option {what}_col=...)"
    )


@dataclass
class UrlListReport:
    """What prepare_url_list kept and dropped (also stored in the Parquet file's metadata)."""

    source: str
    files: int = 0
    rows_read: int = 0
    empty_captions_dropped: int = 0
    filtered_out: dict[str, int] = field(default_factory=dict)
    duplicates_dropped: int = 0
    sampled_out: int = 0
    rows_written: int = 0
    url_col: str = ""
    caption_col: str = ""
    extra_cols: list[str] = field(default_factory=list)
    sample_size: int | None = None
    seed: int = 0
    source_spec: str = ""  # hash of the Source and its input files (size, mtime) for reuse checks
    refused_urls: list[str] = field(default_factory=list)  # the first few urls dropped as not http(s)
    seconds: float = 0.0


def _apply_filters(df: pd.DataFrame, f: Filters, report: UrlListReport) -> pd.DataFrame:
    def drop(mask: pd.Series, why: str) -> pd.DataFrame:
        n = int((~mask).sum())
        if n:
            report.filtered_out[why] = report.filtered_out.get(why, 0) + n
        return df[mask]

    if f.min_width and f.width_col in df:
        df = drop(pd.to_numeric(df[f.width_col], errors="coerce").fillna(0) >= f.min_width, f"width<{f.min_width}")
    if f.min_height and f.height_col in df:
        df = drop(pd.to_numeric(df[f.height_col], errors="coerce").fillna(0) >= f.min_height,
                  f"height<{f.min_height}")
    if f.languages is not None and f.language_col in df:
        df = drop(df[f.language_col].isin(f.languages), f"language not in {list(f.languages)}")
    if f.max_punsafe is not None and f.punsafe_col in df:
        # Missing scores count as unsafe: unknown is not evidence of safe.
        df = drop(pd.to_numeric(df[f.punsafe_col], errors="coerce").fillna(1.0) < f.max_punsafe,
                  f"punsafe>={f.max_punsafe}")
    if f.max_pwatermark is not None and f.pwatermark_col in df:
        df = drop(pd.to_numeric(df[f.pwatermark_col], errors="coerce").fillna(0.0) < f.max_pwatermark,
                  f"pwatermark>={f.max_pwatermark}")
    return df


def _score(urls: pd.Series, seed: int) -> pd.Series:
    """Seeded 64-bit hash of each url: the sampling key (vectorised SipHash, keyed by the seed)."""
    key = hashlib.sha256(str(seed).encode()).hexdigest()[:16]
    return pd.Series(pd.util.hash_pandas_object(urls, index=False, hash_key=key).to_numpy(), index=urls.index)


def source_spec(src: Source) -> str:
    """A short hash of the Source and of its local input files (path, size, mtime), no network.

    Remote files are named by immutable-in-practice urls or a hub repo, revision and glob, so
    the Source itself identifies them; hand-placed files in metadata_dir are listed with their
    sizes and mtimes.
    """
    paths = [Path(f) for f in src.files if not _is_url(f)] + local_matches(src)
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.exists()]
    blob = json.dumps({"source": dataclasses.asdict(src), "files": stats}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _normalise(df: pd.DataFrame, src: Source, path: Path, report: UrlListReport) -> pd.DataFrame:
    cols = [str(c) for c in df.columns]
    df.columns = cols
    url_col = _pick(cols, src.url_col, URL_COLUMNS, "url", path)
    cap_col = _pick(cols, src.caption_col, CAPTION_COLUMNS, "caption", path)
    if src.extra_cols is None:
        extras = [c for c in cols if c not in (url_col, cap_col) and not c.startswith("__index_level_")]
    else:
        missing = [c for c in src.extra_cols if c not in cols]
        if missing:
            log.warning("%s: extra column(s) %s not found; skipped", path, missing)
        extras = [c for c in src.extra_cols if c in cols and c not in (url_col, cap_col)]
    if (url_col, cap_col) != (report.url_col, report.caption_col):  # once per list, or when a file differs
        log.info("%s: url column %r, caption column %r%s", path, url_col, cap_col,
                 "" if src.url_col and src.caption_col else " (guessed; --url-col/--caption-col set them)")
    report.url_col, report.caption_col = url_col, cap_col
    out = pd.DataFrame({"url": df[url_col], "caption": df[cap_col]})
    for c in extras:
        name = f"src_{c}" if c in RESERVED_COLUMNS or c in ("alt_captions",) else c
        out[name] = _one_type(df[c], path, c).to_numpy()
    if not report.extra_cols:
        report.extra_cols = [c for c in out.columns if c not in ("url", "caption")]
    return out


def _one_type(col: pd.Series, path: Path, name: str) -> pd.Series:
    """An extra column whose values mix types (numbers and text: Parquet cannot store it) becomes text."""
    if col.dtype != object or pd.api.types.infer_dtype(col, skipna=True) == "string":
        return col  # the common case, text, without a trial conversion of every value
    try:
        pa.array(col, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        log.warning("%s: extra column %r mixes value types (%s); kept as text (a source's extra_cols=[...] "
                    "can leave it out)", path, name, ", ".join(sorted({type(v).__name__ for v in col.dropna()})))
        return col.astype("string")
    return col


def _is_missing_marker(cap: pd.Series) -> pd.Series:
    """Captions that are a writer's missing-value marker ("nan", "None", "null"), not text anyone wrote."""
    return cap.str.lower().isin(MISSING_CAPTIONS).fillna(False).astype(bool)


def _iter_frames(src: Source, files: list[Path], report: UrlListReport) -> Iterator[pd.DataFrame]:
    for path in files:
        report.files += 1
        try:
            raw = _read_file(path, src)
        except (OSError, ValueError) as err:
            raise SourceError(f"{path}: cannot read as {src.file_format}: {err}") from err
        report.rows_read += len(raw)
        raw = _apply_filters(raw, src.filters, report)
        df = _normalise(raw, src, path, report)
        url = df["url"].astype("string").str.strip()
        cap = df["caption"].astype("string").str.strip()
        ok_url = url.notna() & (url != "")
        if int((~ok_url).sum()):
            report.filtered_out["empty url"] = report.filtered_out.get("empty url", 0) + int((~ok_url).sum())
        if not src.allow_local_files:
            web = url.str.contains(WEB_URL, regex=True).fillna(False).astype(bool)
            refused = ok_url & ~web
            if int(refused.sum()):
                report.filtered_out[REFUSED] = report.filtered_out.get(REFUSED, 0) + int(refused.sum())
                report.refused_urls += [u[:200] for u in url[refused].head(max(0, 5 - len(report.refused_urls)))]
                log.warning("%s: %d row(s) whose url is not http(s) dropped (e.g. %s); a url list can name local "
                            "files: pass --allow-local-files only for a list you wrote", path, int(refused.sum()),
                            list(url[refused].head(3)))
            ok_url = ok_url & web
        marker = ok_url & _is_missing_marker(cap)
        if int(marker.sum()):
            report.filtered_out[MARKER] = report.filtered_out.get(MARKER, 0) + int(marker.sum())
        ok_cap = cap.notna() & (cap.str.len() >= max(src.filters.min_caption_chars, 1)) & ~marker
        report.empty_captions_dropped += int((ok_url & ~ok_cap).sum())
        keep = ok_url & ok_cap
        df = df[keep.fillna(False).astype(bool)].copy()
        df["url"] = url[df.index].astype(str)
        df["caption"] = cap[df.index].astype(str)
        yield df.reset_index(drop=True)


def _dedup(df: pd.DataFrame, collect_alt: bool) -> pd.DataFrame:
    """Keep the first row of each url; optionally keep the other distinct captions in alt_captions."""
    if collect_alt:
        alts = df.groupby("url", sort=False)["caption"].agg(lambda s: list(dict.fromkeys(s))[1:])
    df = df.drop_duplicates("url", keep="first")
    if collect_alt:
        df = df.assign(alt_captions=df["url"].map(alts))
    return df


def _seeded_sample(frames: Iterable[pd.DataFrame], k: int, seed: int, report: UrlListReport
                   ) -> tuple[pd.DataFrame | None, int]:
    """(the k rows of distinct urls with the smallest seeded scores, in score order; rows read).

    Time linear in the rows read and memory bounded by the sample (LAION-HighRes: 170M rows -> 5M): once k
    distinct candidates exist, the k-th smallest score is a threshold no later row above it can beat, so each
    file is filtered by it before any merge, and the candidates are merged (de-duplicated: the first row of a
    url, as the unsampled path keeps; sorted; cut to k) only when they pass 2k. The sample is the one a full
    sort of every row gives, and a smaller sample of the same seed is its head. Duplicates are counted among
    the candidates only: a row above the threshold is not read for its url.
    """
    pending: list[pd.DataFrame] = []
    n_pending, passed, threshold = 0, 0, None
    kept: pd.DataFrame | None = None

    def merge() -> pd.DataFrame:
        merged = pd.concat(pending, ignore_index=True)  # earlier files first: the first row of a url wins
        deduped = merged.drop_duplicates("url", keep="first")
        report.duplicates_dropped += len(merged) - len(deduped)
        return deduped.sort_values("_score", kind="stable").head(k)

    for df in frames:
        passed += len(df)
        df = df.assign(_score=_score(df["url"], seed))
        if threshold is not None:
            df = df[df["_score"].to_numpy() <= threshold]
        pending.append(df)
        n_pending += len(df)
        if n_pending > 2 * k:
            kept = merge()
            pending, n_pending = [kept], len(kept)
            threshold = kept["_score"].iloc[-1] if len(kept) >= k else None
    if pending:
        kept = merge()
    return (kept.drop(columns="_score") if kept is not None else None), passed


def prepare_url_list(source: Source, out_dir: str | os.PathLike[str], *, filename: str | None = None) -> Path:
    """Write ``out_dir/<source.name>.urls.parquet`` (url, caption, extras; unique urls) and return it.

    Empty captions and duplicate urls are dropped (counts logged and stored as JSON
    in the file's metadata under ``eclipse.url_list``; see :func:`read_url_list_report`).
    Deterministic for a given source: rerunning yields the same rows in the same
    order, which is what lets the download stage resume by shard id. Written
    atomically (temp file + rename).
    """
    if source.kind == "webdataset":
        raise SourceError(f"source {source.name!r} is a webdataset (image-text tars): it has no url list; its tars "
                          "go to the encode stage as they are (download_main / precompute do this)")
    t0 = time.monotonic()
    files = local_files(source)
    report = UrlListReport(source=source.name, sample_size=source.sample_size, seed=source.seed,
                           source_spec=source_spec(source))
    passed = 0  # rows that survive filters and the caption check
    if source.sample_size is None:
        frames = list(_iter_frames(source, files, report))
        if not frames:
            raise SourceError(f"source {source.name!r}: no files to read")
        merged = pd.concat(frames, ignore_index=True)
        passed = len(merged)
        kept = _dedup(merged, source.collect_alt_captions)
        report.duplicates_dropped = passed - len(kept)
    else:
        kept, passed = _seeded_sample(_iter_frames(source, files, report), source.sample_size, source.seed, report)
        if kept is None:
            raise SourceError(f"source {source.name!r}: no files to read")
        if source.collect_alt_captions:
            kept = kept.assign(alt_captions=[[] for _ in range(len(kept))])
        report.sampled_out = passed - report.duplicates_dropped - len(kept)
        if len(kept) < source.sample_size:
            log.warning("%s: only %d rows pass the filters, fewer than sample_size=%d",
                        source.name, len(kept), source.sample_size)
    kept = kept.reset_index(drop=True)
    report.rows_written = len(kept)
    report.seconds = round(time.monotonic() - t0, 3)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / (filename or f"{source.name}.urls.parquet")
    table = _to_arrow(kept, source.name)
    meta = dict(table.schema.metadata or {})
    meta[URL_LIST_METADATA_KEY] = json.dumps(dataclasses.asdict(report)).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)
    log.info(
        "%s: %d rows read from %d file(s) -> %d urls written to %s (dropped: %d empty captions, %d duplicate "
        "urls, %s filtered, %d not sampled)",
        source.name, report.rows_read, report.files, report.rows_written, dest, report.empty_captions_dropped,
        report.duplicates_dropped, report.filtered_out or 0, report.sampled_out,
    )
    return dest


def _to_arrow(kept: pd.DataFrame, name: str) -> pa.Table:
    try:
        return pa.Table.from_pandas(kept, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # A column of one type in each file but of different types across files (numbers here, text there).
        mixed = [c for c in kept.columns if kept[c].dtype == object and c != "alt_captions"
                 and len({type(v) for v in kept[c].dropna()}) > 1]
        if not mixed:
            raise
        log.warning("%s: extra column(s) %s hold numbers in some files and text in others; kept as text", name, mixed)
        return pa.Table.from_pandas(kept.astype({c: "string" for c in mixed}), preserve_index=False)


def read_url_list_report(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """The :class:`UrlListReport` (as a dict) stored in a url list written by prepare_url_list."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(URL_LIST_METADATA_KEY)
    return json.loads(raw) if raw else None
