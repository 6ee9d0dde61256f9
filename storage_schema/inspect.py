"""`eclipse-prior store inspect`: what a store holds and what is wrong with it."""

import os
import time
from pathlib import Path

from storage_schema.reader import EmbeddingStore, validate_shard
from storage_schema.schema import IMAGE_EMBED, MANIFEST_NAME, TEXT_EMBED, EncoderInfo
from storage_schema.writer import StoreError, read_manifest

NORM_ROWS = 4096  # rows read for the embedding norms: a bounded read, whatever the store's size


def inspect_store(path: str | os.PathLike, verify: bool = True) -> dict:
    """Summarise a store. Problems are collected, not raised, so one report shows them all.

    `verify=True` (the default) also re-hashes every shard against the sha256 in the manifest, the one check
    that sees bytes changed inside a shard of the same size: it reads the whole store from disk once, so it
    takes as long as reading the store through. The report's `verify` says what it read and how long it took.
    Every key is read too, for the duplicate check (the key column only).
    """
    store_dir = Path(path)
    problems: list[str] = []
    report: dict = {"path": str(store_dir), "rows": 0, "shards": 0, "image_dim": None, "text_dim": None,
                    "hidden_dim": None, "encoder": None, "bytes_on_disk": 0, "problems": problems}
    try:
        manifest = read_manifest(store_dir)
    except StoreError as e:
        problems.append(str(e))
        return report
    if manifest is None:
        problems.append(f"{store_dir}: no {MANIFEST_NAME}; not an embedding store")
        return report
    enc = manifest.get("encoder", {})
    report.update(image_dim=enc.get("image_dim"), text_dim=enc.get("text_dim"), hidden_dim=enc.get("hidden_dim"),
                  encoder=enc, shards=len(manifest.get("shards", {})))
    report["rows"] = sum(s["rows"] for s in manifest.get("shards", {}).values())
    present = [store_dir / n for n in manifest["shards"] if (store_dir / n).exists()]
    report["bytes_on_disk"] = sum(p.stat().st_size for p in present)

    listed = set(manifest.get("shards", {}))
    for p in sorted(store_dir.iterdir()):
        if p.suffix == ".parquet" and p.name not in listed:
            problems.append(f"{p.name}: not in the manifest (left by an interrupted write; rewritten on resume)")
    # Validate shard by shard so one bad shard does not hide the others.
    started = time.monotonic()
    for name in sorted(listed):
        try:
            validate_shard(store_dir, name, manifest["shards"][name], EncoderInfo.from_dict(enc), verify)
        except (StoreError, ValueError, TypeError) as e:
            problems.append(str(e))
    report["verify"] = {"rehashed": verify, "shards": len(present) if verify else 0,
                        "bytes": report["bytes_on_disk"] if verify else 0, "seconds": time.monotonic() - started}
    if not problems and listed:
        store = EmbeddingStore(store_dir)
        seen: dict[str, str] = {}
        for shard, keys in store.keys():
            for k in keys:
                if k in seen:
                    problems.append(f"key {k!r} appears in {seen[k]} and {shard}")
                    break
                seen[k] = shard
    if not problems and listed:
        report["norms"] = _embedding_norms(store_dir / sorted(listed)[0])
    d = report["image_dim"] or 0
    h = report["hidden_dim"] or 0
    if report["rows"] and d:
        # fp16 payload: two pooled embeddings + the real tokens' hidden states
        token_total = _token_total(store_dir, manifest) if not problems else None
        if token_total is not None:
            payload = 2 * (2 * d * report["rows"]) + 2 * h * token_total
            report["tokens"] = token_total
            report["bytes_per_sample"] = report["bytes_on_disk"] / report["rows"]
            report["bytes_ratio"] = report["bytes_on_disk"] / payload
    return report


def _embedding_norms(shard: Path, rows: int = NORM_ROWS) -> dict:
    """The mean L2 norm |z| of the raw image and text embeddings over the first `rows` rows of one shard (a
    bounded read): eclipse's lambda balances against L_proj, which grows with |z|^2 (docs/objectives.md, "The objectives
    and the balance of Eq. 5")."""
    import numpy as np
    import pyarrow.parquet as pq

    batch = next(pq.ParquetFile(shard).iter_batches(batch_size=rows, columns=[IMAGE_EMBED, TEXT_EMBED]))
    out: dict = {"rows": batch.num_rows, "shard": shard.name}
    for name, col in (("image", IMAGE_EMBED), ("text", TEXT_EMBED)):
        values = batch.column(col).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        out[name] = float(np.linalg.norm(values.reshape(batch.num_rows, -1), axis=1).mean())
    return out


def _token_total(store_dir: Path, manifest: dict) -> int:
    import pyarrow.parquet as pq

    return sum(
        int(pq.read_table(store_dir / n, columns=["text_len"]).column("text_len").to_numpy().astype("int64").sum())
        for n in manifest["shards"]
    )


def format_report(r: dict) -> str:
    enc = r.get("encoder") or {}
    lines = [
        f"store      {r['path']}",
        f"encoder    {enc.get('preset')} (image: {enc.get('image_model')}, text: {enc.get('text_model')})",
        f"dims       image {r['image_dim']}, text {r['text_dim']}, hidden {r['hidden_dim']}",
        f"rows       {r['rows']} in {r['shards']} shards",
        f"on disk    {r['bytes_on_disk'] / 1e6:.1f} MB",
    ]
    if "bytes_ratio" in r:
        lines.append(f"bytes      {r['bytes_per_sample']:.0f} per sample, {r['bytes_ratio']:.3f} x the fp16 payload")
    if "verify" in r:
        v = r["verify"]
        lines.append(f"checksums  {v['shards']} shards re-hashed against the manifest: {v['bytes'] / 1e6:.1f} MB "
                     f"read in {v['seconds']:.1f} s (the whole store; --no-verify skips it)" if v["rehashed"] else
                     "checksums  not checked (--no-verify): bytes changed inside a shard go unseen; without "
                     "--no-verify every shard is re-hashed, which reads the whole store once")
    if "norms" in r:
        n = r["norms"]
        lines.append(f"norms      image |z| {n['image']:.3g}, text |z| {n['text']:.3g} (mean over the first "
                     f"{n['rows']} rows of {n['shard']}; lambda's balance depends on it)")
    if r["problems"]:
        lines.append(f"problems   {len(r['problems'])}:")
        lines += [f"  - {p}" for p in r["problems"]]
    else:
        lines.append("problems   none")
    return "\n".join(lines)
