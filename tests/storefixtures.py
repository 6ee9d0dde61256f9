"""Small real stores for tests and benchmarks: random fp16 embeddings written with the real writer."""

import os
from pathlib import Path

import numpy as np

from storage_schema import EncoderInfo, StoreWriter, build_table


def tiny_info(dim: int = 16, hidden: int = 16, preset: str = "test-enc", context_length: int = 77) -> EncoderInfo:
    return EncoderInfo(
        preset=preset, image_model=f"{preset}/vision", text_model=f"{preset}/text", image_dim=dim, text_dim=dim,
        hidden_dim=hidden, tokenizer=f"{preset}/tokenizer", context_length=context_length,
    )


def random_rows(n: int, info: EncoderInfo, seed: int = 0, prefix: str = "k"):
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, 12, size=n)
    return dict(
        keys=[f"{prefix}{i:06d}" for i in range(n)],
        captions=[f"caption number {i}" for i in range(n)],
        image_embeds=rng.standard_normal((n, info.image_dim)).astype(np.float16),
        text_embeds=rng.standard_normal((n, info.text_dim)).astype(np.float16),
        text_hidden=[rng.standard_normal((int(k), info.hidden_dim)).astype(np.float16) for k in lens],
        truncated=[bool(k == 11) for k in lens],
        urls=[f"http://127.0.0.1/{i}.jpg" for i in range(n)],
    )


def write_store(path: Path, shards: int = 3, rows: int = 50, info: EncoderInfo | None = None, seed: int = 0):
    info = info or tiny_info()
    writer = StoreWriter(path, info)
    all_rows = []
    for s in range(shards):
        r = random_rows(rows, info, seed=seed + s, prefix=f"s{s}-")
        writer.write_shard(f"{s:05d}", build_table(info, **r))
        all_rows.append(r)
    return info, all_rows


def write_synthetic_store(
    path: str | os.PathLike,
    rows: int,
    dim: int,
    hidden_dim: int | None = None,
    shards: int = 4,
    seed: int = 0,
    tokens: tuple[int, int] = (4, 20),
    key_prefix: str = "s",
) -> EncoderInfo:
    """Write a store whose image embeddings are a fixed function of the text (plus a constant gap).

    text_hidden ~ N(0, 1) with a random 4..20 real tokens; text_embed = a random projection of
    the mean hidden state; image_embed = text_embed @ A + gap + small noise. Random, seeded,
    learnable: the tests use it to see a prior learn, the benchmarks to measure reading speed.
    """
    hidden_dim = hidden_dim or dim
    info = tiny_info(dim, hidden_dim, preset="synthetic")  # hidden_dim set just above
    rng = np.random.default_rng(seed)
    w_text = rng.standard_normal((hidden_dim, dim)) / np.sqrt(hidden_dim)
    a_img = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    gap = rng.standard_normal(dim)
    writer = StoreWriter(path, info)
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    for s in range(shards):
        n = int(bounds[s + 1] - bounds[s])
        lengths = rng.integers(tokens[0], tokens[1] + 1, size=n)
        hidden = [rng.standard_normal((int(t), hidden_dim)).astype(np.float16) for t in lengths]
        text = np.stack([h.astype(np.float32).mean(0) for h in hidden]) @ w_text * 2.0
        image = text @ a_img + gap + 0.05 * rng.standard_normal((n, dim))
        keys = [f"{key_prefix}{bounds[s] + i:08d}" for i in range(n)]
        table = build_table(info, keys, [f"caption {k}" for k in keys], image.astype(np.float16),
                            text.astype(np.float16), hidden, [False] * n)
        writer.write_shard(f"shard-{s:05d}", table)
    return info


def downgrade_to_v1(path: Path) -> None:
    """Rewrite a store as schema version 1 wrote it (nullable list items, version 1 in the metadata and
    the manifest), so tests can see a v1 store refused and migrated. The values stay the same."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage_schema.schema import MANIFEST_NAME, METADATA_KEY
    from storage_schema.writer import file_sha256, read_manifest, write_parquet

    manifest = read_manifest(path)
    for name, entry in manifest["shards"].items():
        table = pq.read_table(path / name)
        meta = json.loads(table.schema.metadata[METADATA_KEY])
        fields = [pa.field(f.name, pa.list_(pa.float16(), f.type.list_size), nullable=False)
                  if pa.types.is_fixed_size_list(f.type) else f for f in table.schema]
        v1 = pa.schema(fields, metadata={METADATA_KEY: json.dumps({**meta, "schema_version": 1}).encode()})
        write_parquet(table.cast(v1).replace_schema_metadata(v1.metadata), path / name)
        entry.update(bytes=(path / name).stat().st_size, sha256=file_sha256(path / name))
    manifest["schema_version"] = 1
    (path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
