"""Small real stores for tests: random fp16 embeddings written with the real writer."""

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
