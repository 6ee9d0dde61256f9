import json
import subprocess
import sys

import pytest
from storefixtures import write_store

from cli.main import main
from storage_schema.inspect import inspect_store


def test_inspect_json_on_a_store_the_test_wrote(tmp_path, capsys):
    info, _ = write_store(tmp_path / "s", shards=3, rows=20)
    assert main(["store", "inspect", str(tmp_path / "s"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 60 and report["shards"] == 3
    assert report["image_dim"] == info.image_dim and report["text_dim"] == info.text_dim
    assert report["encoder"]["preset"] == "test-enc"
    assert report["problems"] == []
    assert report["bytes_ratio"] > 1.0
    # the raw embeddings' mean norm, from the first rows of the first shard (what lambda's balance depends on)
    import numpy as np
    import pandas as pd

    first = pd.read_parquet(tmp_path / "s" / "00000.parquet")
    for name in ("image", "text"):
        rows = np.stack(first[f"{name}_embed"].to_numpy()).astype(np.float32)
        assert report["norms"][name] == pytest.approx(float(np.linalg.norm(rows, axis=1).mean()), rel=1e-5)
    assert report["norms"]["rows"] == 20 and report["norms"]["shard"] == "00000.parquet"
    assert main(["store", "inspect", str(tmp_path / "s")]) == 0
    assert f"image |z| {report['norms']['image']:.3g}" in capsys.readouterr().out


def test_inspect_lists_every_problem_and_exits_1(tmp_path, capsys):
    write_store(tmp_path / "s", shards=3, rows=20)
    (tmp_path / "s" / "00000.parquet").unlink()
    p = tmp_path / "s" / "00002.parquet"
    p.write_bytes(p.read_bytes()[:-10])
    (tmp_path / "s" / "00009.parquet").write_bytes(b"orphan")
    assert main(["store", "inspect", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert "problems   3:" in out
    assert "00000.parquet: listed in the manifest but missing" in out
    assert "shard 00002.parquet:" in out and "00009.parquet: not in the manifest" in out


def test_inspect_finds_duplicate_keys_across_shards(tmp_path):
    write_store(tmp_path / "a", shards=1, rows=5, seed=0)
    # Same prefix, so shard 1 repeats shard 0's keys.
    from storefixtures import random_rows, tiny_info

    from storage_schema import StoreWriter, build_table

    info = tiny_info()
    StoreWriter(tmp_path / "a", info).write_shard("00001", build_table(info, **random_rows(5, info, prefix="s0-")))
    problems = inspect_store(tmp_path / "a")["problems"]
    assert problems and "appears in 00000.parquet and 00001.parquet" in problems[0]


def test_not_a_store(tmp_path):
    report = inspect_store(tmp_path)
    assert report["problems"] and "not an embedding store" in report["problems"][0]


@pytest.mark.parametrize("text, says", [
    ("null", "the manifest is null, not a JSON object"),
    ("[]", "the manifest is list, not a JSON object"),
    ('{"schema_version": 2, "encoder": {}}', "the manifest has no 'shards' field"),
    ('{"schema_version": 2, "encoder": [], "shards": {}}', "the manifest's 'encoder' is list, expected dict"),
    ('{"schema_version": 2, "encoder": {}, "shards": {"00000.parquet": {}}}',
     "the manifest's entry for shard '00000.parquet' has no integer 'rows'"),
])
def test_a_malformed_manifest_is_named_with_its_field_and_the_fix(tmp_path, capsys, text, says):
    """null is not "no manifest", [] does not crash, a missing field is named (and the store is not touched)."""
    write_store(tmp_path / "s", shards=1, rows=5)
    (tmp_path / "s" / "_manifest.json").write_text(text)
    report = inspect_store(tmp_path / "s")
    (problem,) = report["problems"]
    assert says in problem and "new store folder" in problem
    assert main(["store", "inspect", str(tmp_path / "s")]) == 1
    assert says in capsys.readouterr().out
    assert (tmp_path / "s" / "_manifest.json").read_text() == text


def test_console_script_help_explains_itself():
    out = subprocess.run([sys.executable, "-m", "cli.main", "store", "inspect", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--json" in out and "Validate a store" in out


def test_inspect_says_what_verifying_read_and_what_skipping_it_misses(tmp_path, capsys):
    write_store(tmp_path / "s", shards=3, rows=20)
    report = inspect_store(tmp_path / "s")
    assert report["verify"]["rehashed"] and report["verify"]["shards"] == 3
    assert report["verify"]["bytes"] == report["bytes_on_disk"] > 0 and report["verify"]["seconds"] >= 0
    assert main(["store", "inspect", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"checksums  3 shards re-hashed against the manifest: {report['bytes_on_disk'] / 1e6:.1f} MB read" in out
    assert "the whole store; --no-verify skips it" in out
    path = tmp_path / "s" / "00001.parquet"
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # same size, other bytes: only the re-hash sees it
    path.write_bytes(bytes(data))
    assert main(["store", "inspect", str(tmp_path / "s"), "--no-verify"]) == 0
    assert "checksums  not checked (--no-verify): bytes changed inside a shard go unseen" in capsys.readouterr().out
    assert main(["store", "inspect", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert "shard 00001.parquet: checksum mismatch" in out and "re-encode 00001.parquet: delete it" in out
