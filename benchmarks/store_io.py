"""Store read speed and size overhead for a realistic store (D=1280, ~20 tokens per caption).

Prints, last: store_read_gbps_per_core=<x> (fp16 payload bytes per second, one reader
thread, the trainer's path: shuffled batches of image_embed, text_embed, text_hidden)
and store_bytes_ratio=<x> (bytes on disk / fp16 payload). Also prints the raw numbers
for the two hidden-state layouts considered (nested fp16 lists vs one fp16 byte string).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage_schema import EmbeddingStore, EncoderInfo, StoreWriter, build_table  # noqa: E402
from storage_schema.inspect import inspect_store  # noqa: E402


def make_store(path: Path, shards: int, rows: int, dim: int) -> None:
    info = EncoderInfo(preset="bench", image_model="bench/vision", text_model="bench/text", image_dim=dim,
                       text_dim=dim, hidden_dim=dim, tokenizer="bench/tok", context_length=77)
    writer = StoreWriter(path, info)
    rng = np.random.default_rng(0)
    for s in range(shards):
        lens = np.clip(rng.poisson(20, rows), 3, 77)
        writer.write_shard(f"{s:05d}", build_table(
            info,
            keys=[f"{s}-{i}" for i in range(rows)],
            captions=["a photo of something fairly ordinary on a table"] * rows,
            image_embeds=rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16),
            text_embeds=rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16),
            text_hidden=[rng.standard_normal((int(k), dim), dtype=np.float32).astype(np.float16) for k in lens],
            truncated=[False] * rows,
            urls=[f"https://example.com/{s}/{i}.jpg" for i in range(rows)],
        ))


def nested_layout_gbps(store: EmbeddingStore, tmp: Path) -> float:
    """The pandas-friendliest alternative: text_hidden as list<fixed_size_list<float16>>."""
    name = store.shards[0]
    t = store.read_shard(name, ["text_hidden", "text_len"])
    dim = store.encoder.hidden_dim
    flat = np.frombuffer(b"".join(c.as_py() for c in t.column("text_hidden")), dtype=np.float16)
    offsets = np.concatenate([[0], np.cumsum(t.column("text_len").to_numpy())]).astype(np.int32)
    nested = pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(flat), dim))
    p = tmp / "nested.parquet"
    pq.write_table(pa.table({"text_hidden": nested}), p, compression="none", use_dictionary=False,
                   write_statistics=False, row_group_size=512)
    return _best_read(p, flat.nbytes)


def binary_layout_gbps(store: EmbeddingStore) -> float:
    p = store.dir / store.shards[0]
    payload = int(pq.read_table(p, columns=["text_len"]).column("text_len").to_numpy().astype(np.int64).sum())
    return _best_read(p, payload * store.encoder.hidden_dim * 2, columns=["text_hidden"])


def _best_read(path: Path, payload_bytes: int, columns=None) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        pq.read_table(path, columns=columns, use_threads=False)
        best = min(best, time.perf_counter() - t0)
    return payload_bytes / best / 1e9


def trainer_path_gbps(store: EmbeddingStore, pad_to: int | None) -> float:
    cols = ["image_embed", "text_embed", "text_hidden"]
    best = float("inf")
    payload = 0
    for _ in range(2):
        payload = 0
        t0 = time.perf_counter()
        for b in store.iter_batches(256, columns=cols, shuffle=True, seed=0, buffer_size=2048, pad_to=pad_to):
            payload += b["image_embed"].nbytes + b["text_embed"].nbytes
            payload += int(b["text_len"].astype(np.int64).sum()) * store.encoder.hidden_dim * 2
        best = min(best, time.perf_counter() - t0)
    return payload / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=1280)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_store(tmp / "store", args.shards, args.rows, args.dim)
        print(f"wrote {args.shards * args.rows} rows in {time.perf_counter() - t0:.1f}s")
        store = EmbeddingStore(tmp / "store")
        report = inspect_store(tmp / "store", verify=False)
        print(f"layout nested list<fixed_size_list<f16>> text_hidden: {nested_layout_gbps(store, tmp):.2f} GB/s")
        print(f"layout large_binary text_hidden (ours):              {binary_layout_gbps(store):.2f} GB/s")
        print(f"trainer path, padded to batch max:                   {trainer_path_gbps(store, None):.2f} GB/s")
        print(f"trainer path, padded to 77 on the host:              {trainer_path_gbps(store, 77):.2f} GB/s")
        print(f"bytes per sample {report['bytes_per_sample']:.0f}, avg tokens {report['tokens'] / report['rows']:.1f}")
        print(f"store_read_gbps_per_core={trainer_path_gbps(store, None):.2f}")
        print(f"store_bytes_ratio={report['bytes_ratio']:.4f}")


if __name__ == "__main__":
    main()
