"""The embedding-store contract: schema, atomic writer, validating reader, inspect."""

from storage_schema.migrate import migrate_store
from storage_schema.reader import TEXT_MASK, EmbeddingStore, hidden_states
from storage_schema.schema import (
    CAPTION,
    CAPTION_SEP,
    COLUMNS,
    IMAGE_EMBED,
    KEY,
    SCHEMA_VERSION,
    TEXT_EMBED,
    TEXT_HIDDEN,
    TEXT_LEN,
    TRUNCATED,
    URL,
    EncoderInfo,
    arrow_schema,
    image_key,
)
from storage_schema.writer import StoreError, StoreWriter, build_table

__all__ = [
    "CAPTION", "CAPTION_SEP", "COLUMNS", "IMAGE_EMBED", "KEY", "SCHEMA_VERSION", "TEXT_EMBED", "TEXT_HIDDEN",
    "TEXT_LEN", "TEXT_MASK", "TRUNCATED", "URL", "EmbeddingStore", "EncoderInfo", "StoreError", "StoreWriter",
    "arrow_schema", "build_table", "hidden_states", "image_key", "migrate_store",
]
