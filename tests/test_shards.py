"""pipeline.shards: shard names, the completion marker, half-written shards, the download state."""

from pipeline.shards import (
    completed_shard_ids,
    completed_shards,
    load_state,
    partial_shard_ids,
    save_state,
    shard_name,
)


def test_a_shard_is_complete_once_its_stats_file_exists(tmp_path):
    assert completed_shard_ids(tmp_path / "nothing") == [] and shard_name(7) == "00007"
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "00001.tar", "00002_stats.json", "x.json"):
        (tmp_path / name).write_bytes(b"")
    assert completed_shard_ids(tmp_path) == [0, 2]
    assert completed_shards(tmp_path) == [tmp_path / "00000.tar"]  # 00002 has stats but no tar
    assert partial_shard_ids(tmp_path, {0, 2}) == [1]


def test_state_round_trip(tmp_path):
    assert load_state(tmp_path) is None
    save_state(tmp_path, {"url_list": "u.parquet", "rows": 3})
    assert load_state(tmp_path) == {"url_list": "u.parquet", "rows": 3}
    assert [p.name for p in (tmp_path / "_pipeline").iterdir()] == ["download_state.json"]
