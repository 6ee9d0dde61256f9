"""Store read speed and size overhead for a realistic store (D=1280, ~20 tokens per caption).

Prints the raw numbers for the layouts considered, then the trainer's batch path against the raw
Parquet read of the same columns, one core each (fp16 payload bytes per second: both embeddings
plus the real tokens of text_hidden):
  layouts      text_hidden as nested fp16 lists vs one fp16 byte string per row (ours); the pooled
               embeddings as fixed_size_list<float16> with nullable items (schema v1), with
               non-nullable items (v2, ours) and as fixed_size_binary (fastest, but pandas, polars,
               DuckDB and embedding-reader would see bytes); each read row group by row group
  raw read     pyarrow reads every shard's columns that the loader reads (training.data.TRAIN_COLUMNS
               and text_len), memory-mapped as the loader does
  batch path   training.data.StoreLoader without its read-ahead thread: the same columns (pyarrow
               decodes all but text_hidden, whose cells are fp16 views into the mapped pages,
               storage_schema.pages), then shuffle (seeded buffer of row references), gather each
               batch's rows (the one copy of the payload) and wrap them as
               torch tensors (StoreBatch). As the trainer runs it on a GPU (pad_on_device): the host packs
               the real tokens without padding and StoreBatch.to() pads to 77 on the device, so that
               padding is not in this number; the `.to("cpu")` line prints what it costs when the
               "device" is this CPU. Also: padded to 77 on the host (pad_on_device=False, what the
               trainer does on a CPU, where host and device are one).
Last lines: batch_path_vs_raw_read=<x> (the trainer's GPU setting; goal >= 0.7),
store_read_gbps_per_core=<x> (the same batch path) and store_bytes_ratio=<x> (bytes on
disk / fp16 payload).
"""

import argparse
import os
import statistics
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
from training.data import TRAIN_COLUMNS, StoreLoader  # noqa: E402


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


def embedding_layouts_gbps(store: EmbeddingStore, tmp: Path) -> dict[str, float]:
    """image_embed + text_embed of one shard rewritten in each candidate layout, read row group by row group."""
    t = store.read_shard(store.shards[0], ["image_embed", "text_embed"])
    n, dim = t.num_rows, store.encoder.image_dim
    values = {c: t.column(c).combine_chunks().flatten() for c in t.column_names}
    layouts = {
        "fixed_size_list<float16>[D], nullable items (schema v1)": lambda v: pa.FixedSizeListArray.from_arrays(v, dim),
        "fixed_size_list<float16 not null>[D] (v2, ours)": lambda v: pa.FixedSizeListArray.from_arrays(
            v, type=pa.list_(pa.field("item", pa.float16(), nullable=False), dim)),
        "fixed_size_binary[2D] (tools see bytes)": lambda v: pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(2 * dim), n, [None, pa.py_buffer(v.to_numpy().tobytes())]),
    }
    out = {}
    for i, (name, make) in enumerate(layouts.items()):
        p = tmp / f"embeddings-{i}.parquet"
        pq.write_table(pa.table({c: make(v) for c, v in values.items()}), p, compression="none",
                       use_dictionary=False, write_statistics=False, row_group_size=512)
        out[name] = _best_read(p, 2 * n * dim * 2, by_row_group=True)
    return out


def binary_layout_gbps(store: EmbeddingStore) -> float:
    p = store.dir / store.shards[0]
    payload = int(pq.read_table(p, columns=["text_len"]).column("text_len").to_numpy().astype(np.int64).sum())
    return _best_read(p, payload * store.encoder.hidden_dim * 2, columns=["text_hidden"])


def _best_read(path: Path, payload_bytes: int, columns=None, by_row_group: bool = False) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        if by_row_group:
            pf = pq.ParquetFile(path, memory_map=True)
            for rg in range(pf.num_row_groups):
                pf.read_row_group(rg, columns=columns, use_threads=False)
        else:
            pq.read_table(path, columns=columns, use_threads=False)
        best = min(best, time.perf_counter() - t0)
    return payload_bytes / best / 1e9


def trainer_columns_payload(store: EmbeddingStore) -> int:
    """fp16 payload bytes of the trainer's columns: both embeddings and the real tokens."""
    lengths = [store.read_shard(name, ["text_len"]).column("text_len").to_numpy().astype(np.int64)
               for name in store.shards]
    rows, tokens = sum(len(x) for x in lengths), sum(int(x.sum()) for x in lengths)
    return rows * (store.encoder.image_dim + store.encoder.text_dim) * 2 + tokens * store.encoder.hidden_dim * 2


def raw_read_seconds(store: EmbeddingStore) -> float:
    """One pass of pyarrow alone reading the columns the batch path reads, every shard, one thread.

    Memory-mapped like the batch path, so the ratio is the batch path's own cost.
    """
    t0 = time.perf_counter()
    for name in store.shards:
        pq.read_table(store.dir / name, columns=[*TRAIN_COLUMNS, "text_len"], use_threads=False, memory_map=True)
    return time.perf_counter() - t0


def batch_path_seconds(store: EmbeddingStore, pad_on_device: bool) -> tuple[float, int]:
    """One pass of StoreLoader (no read-ahead thread: one core) over the whole store: (seconds, payload bytes)."""
    hidden, payload = store.encoder.hidden_dim, 0
    t0 = time.perf_counter()
    loader = StoreLoader(store, 256, shuffle=True, seed=0, infinite=False, drop_last=False, buffer_size=2048,
                         pad_to=77, pad_on_device=pad_on_device, prefetch=0)
    for b in loader:
        tokens = int(b.text_len.sum()) if b.text_len is not None else int(b.text_mask.sum())
        payload += b.image_embed.nbytes + b.text_embed.nbytes + tokens * hidden * 2
    return time.perf_counter() - t0, payload


def to_cpu_seconds(store: EmbeddingStore, pad_on_device: bool, rounds: int = 3) -> float:
    """Median over passes of the summed StoreBatch.to("cpu") calls of one pass (fp16 -> fp32, and the
    padding to 77 for packed batches): the device's side of the batch path, here on the CPU."""
    passes = []
    for _ in range(rounds):
        total = 0.0
        for b in StoreLoader(store, 256, shuffle=True, seed=0, infinite=False, drop_last=False, buffer_size=2048,
                             pad_to=77, pad_on_device=pad_on_device, prefetch=0):
            t0 = time.perf_counter()
            b.to("cpu")
            total += time.perf_counter() - t0
        passes.append(total)
    return statistics.median(passes)


def batch_path_vs_raw(store: EmbeddingStore, rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (median GB/s, median ratio to the raw read). The passes alternate and each ratio
    pairs a pass with the raw read right before it: this machine's speed drifts within seconds."""
    payload = trainer_columns_payload(store)
    speeds: dict[str, list[float]] = {"raw": [], "trainer": [], "host_77": []}
    ratios: dict[str, list[float]] = {"trainer": [], "host_77": []}
    for _ in range(rounds):
        t_raw = raw_read_seconds(store)
        speeds["raw"].append(payload / t_raw / 1e9)
        for name, on_device in (("trainer", True), ("host_77", False)):
            t, got = batch_path_seconds(store, on_device)
            assert got == payload, (got, payload)  # every row once, the same bytes as the raw read
            speeds[name].append(payload / t / 1e9)
            ratios[name].append(t_raw / t)
    ratios["raw"] = [1.0]
    return {k: (statistics.median(v), statistics.median(ratios[k])) for k, v in speeds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--rounds", type=int, default=7, help="alternating raw-read / batch-path rounds")
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
        for name, gbps in embedding_layouts_gbps(store, tmp).items():
            print(f"layout embeddings {name}: {gbps:.2f} GB/s")
        res = batch_path_vs_raw(store, args.rounds)
        (raw, _), (trainer, ratio), (host_77, ratio_77) = res["raw"], res["trainer"], res["host_77"]
        print(f"medians of {args.rounds} alternating rounds:")
        print(f"raw read of the trainer's columns:                   {raw:.2f} GB/s")
        print(f"batch path as the trainer runs it (packed; .to() pads): {trainer:.2f} GB/s ({ratio:.2f}x raw)")
        print(f"batch path padded to 77 on the host:                 {host_77:.2f} GB/s ({ratio_77:.2f}x raw)")
        for name, on_device in (("packed, padded to 77 in .to()", True), ("padded to 77 on the host", False)):
            print(f'StoreBatch.to("cpu") per pass, {name}: {to_cpu_seconds(store, on_device) * 1e3:.0f} ms')
        print(f"bytes per sample {report['bytes_per_sample']:.0f}, avg tokens {report['tokens'] / report['rows']:.1f}")
        print(f"batch_path_vs_raw_read={ratio:.2f}")
        print(f"store_read_gbps_per_core={trainer:.2f}")
        print(f"store_bytes_ratio={report['bytes_ratio']:.4f}")


if __name__ == "__main__":
    main()
