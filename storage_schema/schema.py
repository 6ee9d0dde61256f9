"""The embedding-store contract: encoder description, Arrow schema, file metadata.

One store = one directory of Parquet shards + `_manifest.json`. Every shard carries
the encoder description in its file metadata so a shard can be judged on its own.
"""

import dataclasses
import json
from dataclasses import dataclass, field

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: embedding columns' list items are non-nullable (v1 stores: storage_schema.migrate)
METADATA_KEY = b"eclipse_store"
MANIFEST_NAME = "_manifest.json"  # leading "_": pyarrow/pandas skip it when reading the dir

# The columns every shard has, in order. Embedding columns hold raw fp16 values.
KEY, CAPTION, URL = "key", "caption", "url"
# Rows that share one image (e.g. MS-COCO's five captions) have keys IMAGEKEY#1, IMAGEKEY#2, ...:
# the part before "#" names the image, and held-out splits keep such rows on one side.
CAPTION_SEP = "#"
# Largest |value| writers store and readers accept in image_embed, text_embed and text_hidden. Raw CLIP
# embeddings and hidden states after the final LayerNorm stay within a few tens per component (a LayerNorm
# output is at most |gamma| x sqrt(H) + |beta|), so a value beyond this is damaged bytes or a broken encoder,
# not data: a flipped high byte of an fp16 value gives NaN, Inf or a huge exponent far more often than not.
MAX_ABS = 1e4


def image_key(key: str) -> str:
    """The key of the image a row was encoded from (the row key up to CAPTION_SEP)."""
    return key.split(CAPTION_SEP, 1)[0]
IMAGE_EMBED, TEXT_EMBED = "image_embed", "text_embed"
TEXT_HIDDEN, TEXT_LEN, TRUNCATED = "text_hidden", "text_len", "truncated"
COLUMNS = (KEY, CAPTION, URL, IMAGE_EMBED, TEXT_EMBED, TEXT_HIDDEN, TEXT_LEN, TRUNCATED)
EMBEDDING_COLUMNS = (IMAGE_EMBED, TEXT_EMBED, TEXT_HIDDEN)


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eclipse-prior")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class EncoderInfo:
    """What produced the embeddings. Two shards may share a store only if these agree."""

    preset: str
    image_model: str
    text_model: str
    image_dim: int  # D of image_embeds
    text_dim: int  # D of text_embeds (equals image_dim for CLIP)
    hidden_dim: int  # width H of the text tower's last_hidden_state
    tokenizer: str
    context_length: int
    image_revision: str | None = None
    text_revision: str | None = None
    dtype: str = "float16"
    columns: dict[str, str] = field(
        default_factory=lambda: {
            IMAGE_EMBED: "vision image_embeds: visual projection of the pooled token; raw, not L2-normalised",
            TEXT_EMBED: "text text_embeds: text projection of the EOS token; raw, not L2-normalised",
            TEXT_HIDDEN: "text last_hidden_state after the final LayerNorm, before projection; "
            "real tokens only (BOS..EOS), row-major [text_len, hidden_dim] fp16 bytes",
        }
    )

    def __post_init__(self) -> None:
        if self.dtype != "float16":
            raise ValueError(f"store dtype must be float16, got {self.dtype!r}")
        for name in ("image_dim", "text_dim", "hidden_dim", "context_length"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"EncoderInfo.{name} must be positive, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def embedding_type(dim: int) -> pa.DataType:
    """fixed_size_list<float16 not null>[dim]: an array per row for every tool, and non-nullable items,
    whose Parquet decode skips the definition levels (faster than v1's nullable items: BENCHMARKS.md)."""
    return pa.list_(pa.field("item", pa.float16(), nullable=False), int(dim))


def arrow_schema(info: EncoderInfo) -> pa.Schema:
    """Arrow schema of one shard, with the encoder description as file metadata.

    Layout, chosen with numbers (BENCHMARKS.md): the pooled embeddings are
    fixed_size_list<float16 not null>[D] so pandas, polars, DuckDB and embedding-reader see one
    float16 array per row (a fixed_size_binary column would read faster but reach them as
    opaque bytes); every column but `url` is non-nullable (schema version 2). The per-token
    hidden states are one fp16 byte string per row (row-major [text_len, H]): Parquet has
    no fast decode path for nested fp16 lists (apache/arrow#43891), and these bytes are
    ~90 % of the store. `storage_schema.hidden_states(...)` turns a cell back into an array.
    """
    fields = [
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(CAPTION, pa.string(), nullable=False),
        pa.field(URL, pa.string(), nullable=True),
        pa.field(IMAGE_EMBED, embedding_type(info.image_dim), nullable=False),
        pa.field(TEXT_EMBED, embedding_type(info.text_dim), nullable=False),
        pa.field(TEXT_HIDDEN, pa.large_binary(), nullable=False),
        pa.field(TEXT_LEN, pa.int16(), nullable=False),
        pa.field(TRUNCATED, pa.bool_(), nullable=False),
    ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(file_metadata(info)).encode()})


def file_metadata(info: EncoderInfo) -> dict:
    return {"schema_version": SCHEMA_VERSION, "encoder": info.to_dict(), "code_version": code_version()}


def read_file_metadata(metadata: dict[bytes, bytes] | None) -> dict:
    """Parse our metadata block from a Parquet/Arrow key-value metadata dict."""
    if not metadata or METADATA_KEY not in metadata:
        raise ValueError("no eclipse_store metadata: not a shard of an embedding store")
    meta = json.loads(metadata[METADATA_KEY])
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(version_problem(meta.get("schema_version")))
    return meta


def version_problem(version) -> str:
    """Why a store (or shard) of schema `version` cannot be used by this code, and the fix."""
    if version == 1:
        return (
            f"store schema version 1; this code reads version {SCHEMA_VERSION} (non-nullable embedding items, "
            f"decoded faster; the values are the same). Migrate the store in place: "
            f"`python -m storage_schema.migrate STORE_DIR` (rewrites each shard atomically, resumable)"
        )
    return (
        f"store schema version {version!r} is not supported: this code reads version {SCHEMA_VERSION} "
        f"(a newer store needs a newer eclipse-prior)"
    )
