"""Streaming training batches from a real (small) embedding store."""

import itertools
import logging

import numpy as np
import pytest
import torch
from storefixtures import tiny_info, write_synthetic_store

from storage_schema import EmbeddingStore, StoreError
from training.data import StoreLoader, check_store_dims, is_heldout


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> EmbeddingStore:
    path = tmp_path_factory.mktemp("store")
    write_synthetic_store(path, rows=600, dim=16, shards=4, seed=1)
    return EmbeddingStore(path)


def test_is_heldout_is_seeded_stable_and_about_the_fraction():
    keys = [f"k{i}" for i in range(20000)]
    a = is_heldout(keys, 0.1, seed=0)
    assert a.dtype == bool and a.shape == (20000,)
    assert 0.09 < a.mean() < 0.11
    assert np.array_equal(a, is_heldout(keys, 0.1, seed=0))  # deterministic
    assert np.array_equal(a[5000:7000], is_heldout(keys[5000:7000], 0.1, seed=0))  # per key, not per position
    b = is_heldout(keys, 0.1, seed=1)
    assert not np.array_equal(a, b)  # another seed, another split
    assert not is_heldout(keys, 0.0).any()
    assert (is_heldout(keys, 0.2, seed=0) | ~a).all()  # a bigger fraction holds out a superset


def test_batches_are_padded_fp16_with_masks_matching_text_len(store):
    batch = next(iter(StoreLoader(store, 32, prefetch=0)))
    assert batch.text_hidden.shape == (32, 77, 16)
    assert batch.text_hidden.dtype == batch.image_embed.dtype == torch.float16  # never up-cast on the host
    assert batch.text_mask.dtype == torch.bool
    lengths = batch.text_mask.sum(1)
    assert lengths.min() >= 4 and lengths.max() <= 20
    assert (batch.text_mask[:, :4]).all()  # real tokens come first
    assert (batch.text_hidden[~batch.text_mask] == 0).all()  # padding is zeros
    dev = batch.to("cpu")
    assert dev.image_embed.dtype == torch.float32 and dev.text_mask.dtype == torch.bool


def test_batches_wrap_the_readers_arrays_without_copying(store):
    raw = next(store.iter_batches(8, ["key", "image_embed", "text_embed", "text_hidden"], pad_to=77))
    from training.data import StoreBatch

    batch = StoreBatch.from_numpy(raw, 0, 0)
    assert batch.image_embed.data_ptr() == raw["image_embed"].ctypes.data
    assert batch.text_hidden.data_ptr() == raw["text_hidden"].ctypes.data


def test_rows_of_one_image_fall_on_one_side_of_the_split():
    images = [f"{i:09d}" for i in range(2000)]
    rows = [f"{k}#{c}" if c else k for k in images for c in range(5)]  # MS-COCO: five captions per image
    mask = is_heldout(rows, 0.3, seed=0).reshape(len(images), 5)
    assert mask.any() and (mask.all(axis=1) | ~mask.any(axis=1)).all()
    assert np.array_equal(mask[:, 0], is_heldout(images, 0.3, seed=0))


def test_heldout_rows_are_never_in_training_batches(store):
    train = StoreLoader(store, 16, heldout_fraction=0.2, heldout_seed=3, infinite=False, drop_last=False)
    held = StoreLoader(store, 16, split="heldout", heldout_fraction=0.2, heldout_seed=3, shuffle=False,
                       infinite=False, drop_last=False)
    train_keys = {k for b in train for k in b.keys}
    held_keys = {k for b in held for k in b.keys}
    all_keys = {k for _, ks in store.keys() for k in ks}
    assert train_keys.isdisjoint(held_keys)
    assert train_keys | held_keys == all_keys
    assert held_keys == {k for k in all_keys if is_heldout([k], 0.2, 3)[0]}
    assert 0.1 < len(held_keys) / len(all_keys) < 0.3


def test_ranks_read_disjoint_rows_that_cover_the_store(store):
    per_rank = [
        {k for b in StoreLoader(store, 10, rank=r, world_size=2, infinite=False, drop_last=False) for k in b.keys}
        for r in range(2)
    ]
    assert per_rank[0].isdisjoint(per_rank[1])
    assert len(per_rank[0] | per_rank[1]) == 600


def test_epochs_repeat_forever_with_a_new_order_each(store):
    loader = StoreLoader(store, 100, seed=7)
    batches = list(itertools.islice(iter(loader), 14))  # 6 full batches per epoch
    assert [(b.epoch, b.index) for b in batches[:8]] == [(0, i) for i in range(6)] + [(1, 0), (1, 1)]
    epoch0 = [k for b in batches[:6] for k in b.keys]
    epoch1 = [k for b in batches[6:12] for k in b.keys]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # same rows, reshuffled
    again = [k for b in itertools.islice(iter(StoreLoader(store, 100, seed=7)), 6) for k in b.keys]
    assert again == epoch0  # seeded


def test_starting_at_a_saved_position_continues_the_same_sequence(store):
    full = [b.keys for b in itertools.islice(iter(StoreLoader(store, 64, seed=2)), 20)]
    resumed = [b.keys for b in itertools.islice(iter(StoreLoader(store, 64, seed=2, start=(1, 3))), 8)]
    per_epoch = 600 // 64  # 9 full batches, drop_last
    assert resumed == full[per_epoch + 3 : per_epoch + 11]
    # a position at the very end of an epoch (after its last batch) rolls over to the next epoch
    rolled = next(iter(StoreLoader(store, 64, seed=2, start=(0, per_epoch))))
    assert (rolled.epoch, rolled.index) == (1, 0) and rolled.keys == full[per_epoch]


def test_background_reader_matches_synchronous_reading_and_stops_cleanly(store):
    threaded = [b.keys for b in itertools.islice(iter(StoreLoader(store, 50, prefetch=2)), 15)]
    plain = [b.keys for b in itertools.islice(iter(StoreLoader(store, 50, prefetch=0)), 15)]
    assert threaded == plain
    it = iter(StoreLoader(store, 50, prefetch=2))
    next(it)
    it.close()  # stops the reader thread (a daemon thread that would otherwise keep reading)


def test_reader_errors_reach_the_training_loop(store):
    with pytest.raises(StoreError, match="no full batch"):
        next(iter(StoreLoader(store, 10_000, prefetch=2)))


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_store_too_small_for_the_batch_names_a_batch_size_that_fits(tmp_path, world_size):
    write_synthetic_store(tmp_path / "s", rows=300, dim=16, shards=2, seed=4)
    small = EmbeddingStore(tmp_path / "s")
    keys = [k for _, ks in small.keys() for k in ks]
    kw = dict(heldout_fraction=0.2, heldout_seed=1, world_size=world_size, seed=3, prefetch=0)
    mine = {k for b in StoreLoader(small, 1, infinite=False, drop_last=False, **kw) for k in b.keys}
    train_rows = len(mine)
    assert train_rows < 256 and (world_size > 1 or train_rows == (~is_heldout(keys, 0.2, 1)).sum())
    fits = 1 << (train_rows.bit_length() - 1)
    with pytest.raises(StoreError) as e:
        next(iter(StoreLoader(small, 256, **kw)))
    msg = str(e.value)
    assert f"got no full batch of 256 train rows in epoch 0: its shards hold {train_rows} train rows" in msg
    assert f"--batch-size {fits} (config key batch_size" in msg and "heldout_fraction 0.2" in msg
    assert len(next(iter(StoreLoader(small, fits, **kw)))) == fits  # and that batch size does train


def test_a_store_of_one_row_says_no_batch_fits_eclipse(tmp_path):
    write_synthetic_store(tmp_path / "s", rows=1, dim=16, shards=1)
    with pytest.raises(StoreError, match="hold 1 train row, and the eclipse objective needs at least 2 rows"):
        next(iter(StoreLoader(EmbeddingStore(tmp_path / "s"), 256, prefetch=0)))


def _store_with_a_repeated_shard(path) -> EmbeddingStore:
    from storefixtures import random_rows

    from storage_schema import StoreWriter, build_table

    info = tiny_info()
    writer = StoreWriter(path, info)
    writer.write_shard("00000", build_table(info, **random_rows(700, info, seed=0, prefix="a-")))
    writer.write_shard("00001", build_table(info, **random_rows(40, info, seed=1, prefix="b-")))
    writer.write_shard("00002", build_table(info, **random_rows(700, info, seed=2, prefix="a-")))  # 00000 again
    return EmbeddingStore(path)


def test_keys_repeated_across_shards_are_warned_about_once_at_train_start(tmp_path, caplog, store):
    dup = _store_with_a_repeated_shard(tmp_path / "s")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        StoreLoader(dup, 16)
        StoreLoader(dup, 16, split="heldout", heldout_fraction=0.1)  # evaluation loaders: no second warning
        StoreLoader(dup, 16, rank=1, world_size=2)  # nor the other ranks
    (record,) = caplog.records
    msg = record.getMessage()
    assert "4 key(s) are held by more than one shard" in msg  # a-000000, -000511, -000512, -000699
    assert "'a-000000' in 00000.parquet and 00002.parquet" in msg
    assert f"store inspect {tmp_path / 's'}" in msg and "_manifest.json" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.data"):
        StoreLoader(store, 16)  # unique keys: nothing to say
    assert not caplog.records


def test_store_of_another_width_is_refused():
    check_store_dims(tiny_info(1280, 1280), 1280)
    with pytest.raises(StoreError, match=r"D=768.*does not fit|does not fit.*D=1280"):
        check_store_dims(tiny_info(768, 768), 1280, "the 'kandinsky22' prior")
    with pytest.raises(StoreError, match="H == D"):
        check_store_dims(tiny_info(32, hidden=48), 32)


def _reference_rows(store: EmbeddingStore) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """key -> (image_embed, text_embed, text_hidden [text_len, H]) read plainly with pandas, one shard at a time."""
    import pandas as pd

    rows = {}
    for name in store.shards:
        df = pd.read_parquet(store.dir / name)
        for key, img, txt, cell, n in zip(df.key, df.image_embed, df.text_embed, df.text_hidden, df.text_len,
                                          strict=True):
            hidden = np.frombuffer(cell, dtype=np.float16).reshape(int(n), -1)
            rows[key] = (np.asarray(img, dtype=np.float16), np.asarray(txt, dtype=np.float16), hidden)
    return rows


def _reference_batch(rows, keys: list[str], width: int) -> tuple[np.ndarray, ...]:
    image = np.stack([rows[k][0] for k in keys])
    text = np.stack([rows[k][1] for k in keys])
    hidden = np.zeros((len(keys), width, image.shape[1]), dtype=np.float16)
    mask = np.zeros((len(keys), width), dtype=bool)
    for i, k in enumerate(keys):
        n = len(rows[k][2])
        hidden[i, :n], mask[i, :n] = rows[k][2], True
    return image, text, hidden, mask


@pytest.mark.parametrize("mode", ["host-77", "host-longest", "device-77", "device-longest"])
def test_batches_equal_a_straightforward_reference(store, mode):
    """The batch path (shuffle buffer, padding into pooled memory, zero-copy tensors, padding on the device)
    gives exactly the tensors of plain per-row padding of what pandas reads, in the same order in every mode."""
    rows = _reference_rows(store)
    kw = {"host-77": {}, "host-longest": {"pad_to": None}, "device-77": {"pad_on_device": True},
          "device-longest": {"pad_on_device": True, "pad_to": None}}[mode]
    loader = StoreLoader(store, 48, seed=5, buffer_size=100, infinite=False, drop_last=False, prefetch=0, **kw)
    host_77 = StoreLoader(store, 48, seed=5, buffer_size=100, infinite=False, drop_last=False, prefetch=0)
    seen = []
    for batch, same_order in zip(loader, host_77, strict=True):
        assert batch.keys == same_order.keys
        seen += batch.keys
        longest = max(len(rows[k][2]) for k in batch.keys)
        host_width = longest if mode != "host-77" else 77
        image, text, hidden, mask = _reference_batch(rows, batch.keys, host_width)
        assert batch.text_hidden.dtype == torch.float16
        assert np.array_equal(batch.image_embed.numpy(), image) and np.array_equal(batch.text_embed.numpy(), text)
        if mode.startswith("device"):  # packed on the host: the real tokens one row after another, no padding
            assert batch.text_mask is None
            assert np.array_equal(batch.text_len.numpy(), [len(rows[k][2]) for k in batch.keys])
            assert np.array_equal(batch.text_hidden.numpy(), np.concatenate([rows[k][2] for k in batch.keys]))
        else:
            assert batch.text_len is None and batch.text_hidden.shape == hidden.shape
            assert np.array_equal(batch.text_hidden.numpy(), hidden) and np.array_equal(batch.text_mask.numpy(), mask)
        dev = batch.to("cpu")
        want_width = longest if mode.endswith("longest") else 77
        image, text, hidden, mask = _reference_batch(rows, batch.keys, want_width)
        assert dev.text_hidden.dtype == torch.float32 and dev.text_hidden.shape == hidden.shape
        assert torch.equal(dev.text_hidden, torch.from_numpy(hidden).float())
        assert torch.equal(dev.text_mask, torch.from_numpy(mask))
        assert torch.equal(dev.image_embed, torch.from_numpy(image).float())
        assert torch.equal(dev.text_embed, torch.from_numpy(text).float())
    assert sorted(seen) == sorted(rows)  # one pass: every row once


@pytest.mark.parametrize("on_device", [False, True])
def test_a_caption_longer_than_pad_to_is_refused(store, on_device):
    with pytest.raises(StoreError, match="more than pad_to=10"):
        next(iter(StoreLoader(store, 32, pad_to=10, pad_on_device=on_device, prefetch=0)))


def test_packed_batches_give_the_host_padded_prior_batch_bit_for_bit(store):
    """What the objectives see does not depend on where the padding happens (with and without shuffling)."""
    for shuffle in (True, False):
        kw = dict(seed=3, buffer_size=200, shuffle=shuffle, infinite=False, drop_last=False, prefetch=0)
        for packed, padded in zip(StoreLoader(store, 64, pad_on_device=True, **kw), StoreLoader(store, 64, **kw),
                                  strict=True):
            assert packed.text_hidden.ndim == 2 and padded.text_hidden.ndim == 3
            a, b = packed.to("cpu"), padded.to("cpu")
            assert a.keys == b.keys
            for name in ("image_embed", "text_embed", "text_hidden", "text_mask"):
                x, y = getattr(a, name), getattr(b, name)
                assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
