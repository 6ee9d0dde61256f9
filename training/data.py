"""Training batches streamed from the embedding store.

Never loads the store into memory and never up-casts it on the host: batches are the
store's fp16 numpy arrays wrapped by `torch.from_numpy` (no copy), pinned when training on
a GPU, and cast to fp32 on the device. A background thread reads ahead into a bounded queue.
Epochs repeat forever (ranks may hold different row counts; with a fixed step count no rank
ever waits for another to finish an epoch), and each batch carries its (epoch, index) so a
resumed run restarts at exactly the next batch.
"""

import hashlib
import logging
import queue
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from storage_schema import (
    IMAGE_EMBED,
    KEY,
    TEXT_EMBED,
    TEXT_HIDDEN,
    TEXT_LEN,
    TEXT_MASK,
    EmbeddingStore,
    EncoderInfo,
    StoreError,
    image_key,
)
from storage_schema.schema import MANIFEST_NAME
from training.objectives import PriorBatch

log = logging.getLogger(__name__)

TRAIN_COLUMNS = (KEY, IMAGE_EMBED, TEXT_EMBED, TEXT_HIDDEN)


def is_heldout(keys: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """Bool mask: True for keys in the held-out evaluation split.

    A seeded hash of the key (blake2b, stable across processes and machines, unlike `hash`),
    so the split needs no bookkeeping, stays the same when shards are added, and a key is
    held out in every run with the same seed. Rows of one image (KEY, KEY#1, ... ; see
    `storage_schema.image_key`) hash alike, so no image is on both sides of the split.
    """
    if fraction <= 0.0:
        return np.zeros(len(keys), dtype=bool)
    salt = seed.to_bytes(8, "little", signed=True)
    threshold = int(fraction * 2**64)
    def digest(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(image_key(key).encode(), digest_size=8, salt=salt).digest(), "little")

    return np.fromiter(
        (digest(str(k)) < threshold for k in keys),
        dtype=bool, count=len(keys),
    )


def warn_duplicate_keys(store: EmbeddingStore) -> None:
    """Log a warning when shards of the store share keys, as far as the footers already read tell.

    Only each row group's first and last key are compared (`EmbeddingStore.boundary_duplicates`, no read):
    enough to catch a shard stored twice or copied under a second name, the usual way keys repeat.
    A full check reads every key, which `eclipse-prior store inspect` does.
    """
    dups = store.boundary_duplicates()
    if not dups:
        return
    shown = "; ".join(f"{key!r} in {' and '.join(shards)}" for key, shards in list(dups.items())[:3])
    log.warning(
        "%s: %d key(s) are held by more than one shard (e.g. %s; found among each row group's first and last "
        "key, so there may be more). Their rows train once per copy and an evaluation counts them once per "
        "copy. `eclipse-prior store inspect %s` reads every key and lists the duplicates. Fix: delete the "
        "shard that repeats another (the file and its entry in %s), or encode the images into a new store.",
        store.dir, len(dups), shown, store.dir, store.dir / MANIFEST_NAME,
    )


def check_store_dims(encoder: EncoderInfo, embedding_dim: int, what: str = "the prior") -> None:
    """Refuse a store whose embeddings do not fit a prior of width D (raises StoreError)."""
    problems = []
    if encoder.image_dim != embedding_dim:
        problems.append(f"image embeddings are D={encoder.image_dim}")
    if encoder.text_dim != embedding_dim:
        problems.append(f"text embeddings are D={encoder.text_dim}")
    if encoder.hidden_dim != embedding_dim:
        problems.append(
            f"text hidden states are H={encoder.hidden_dim} wide (the released ECLIPSE layout needs H == D)"
        )
    if problems:
        raise StoreError(
            f"store made by encoder preset {encoder.preset!r} ({encoder.image_model}) does not fit {what} "
            f"(D={embedding_dim}): {'; '.join(problems)}. {fitting_prior(encoder)}"
        )


def fitting_prior(encoder: EncoderInfo) -> str:
    """What to train on a store of this encoder: the prior preset of its D, or a small prior sized to it."""
    from training.prior import PRIOR_PRESETS, RELEASED_PRESETS, preset_for_store

    if encoder.hidden_dim != encoder.image_dim or encoder.text_dim != encoder.image_dim:
        return "No ECLIPSE prior fits it (the released layout needs text, image and hidden widths equal)."
    name, sized = preset_for_store(encoder.image_dim, encoder.context_length)
    if not sized:
        return f"Train with --preset {name} (D={encoder.image_dim}), or on a store encoded for this prior."
    released = ", ".join(f"{n}, D={PRIOR_PRESETS[n]['embedding_dim']}" for n in RELEASED_PRESETS)
    return (f"For this store train a small prior sized to it: --preset {name} "
            + " ".join(f"--set {k}={v}" for k, v in sized.items()) + f" (the released presets are {released}).")


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy numpy -> torch. Arrow-backed arrays are read-only; we never write into them."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


@dataclass
class StoreBatch:
    """One batch on the host, fp16 as stored; `to()` moves it and casts (and pads) on the device.

    Two forms of the hidden states. Padded: text_hidden [B, L, H] zero-padded with text_mask [B, L]
    (L = pad_to, or the batch's longest caption). Packed (`text_len` set, what the trainer reads): text_hidden
    [sum(text_len), H] holds the real tokens one row after another, text_mask is None, and `to()` builds
    the padded [B, pad_to, H] tensor and its mask on the device: fewer bytes written, pinned and copied
    per batch when captions are much shorter than pad_to (benchmarks/store_io.py measures it). Both give the
    same PriorBatch, bit for bit.
    """

    image_embed: torch.Tensor  # [B, D] fp16
    text_embed: torch.Tensor  # [B, D] fp16
    text_hidden: torch.Tensor  # [B, L, H] fp16 zero-padded, or packed [sum(text_len), H] fp16
    text_mask: torch.Tensor | None  # [B, L] bool; None when packed
    keys: list[str]
    epoch: int
    index: int  # position of this batch within its epoch
    pad_to: int | None = None  # `to()` pads text_hidden/text_mask to this length on the device
    text_len: torch.Tensor | None = None  # [B] int16, set when text_hidden is packed

    @classmethod
    def from_numpy(cls, raw: dict[str, np.ndarray], epoch: int, index: int, pad_to: int | None = None) -> "StoreBatch":
        """Wrap a batch of `EmbeddingStore.iter_batches` (padded, or packed when it has no text_mask)."""
        packed = TEXT_MASK not in raw
        longest = int(raw[TEXT_LEN].max()) if packed else raw[TEXT_HIDDEN].shape[1]
        if pad_to is not None and longest > pad_to:
            raise StoreError(f"a caption has {longest} tokens, more than pad_to={pad_to}")
        return cls(
            image_embed=_tensor(raw[IMAGE_EMBED]), text_embed=_tensor(raw[TEXT_EMBED]),
            text_hidden=_tensor(raw[TEXT_HIDDEN]), text_mask=None if packed else _tensor(raw[TEXT_MASK]),
            keys=list(raw[KEY]), epoch=epoch, index=index, pad_to=pad_to,
            text_len=_tensor(raw[TEXT_LEN]) if packed else None,
        )

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "StoreBatch":
        for name in ("image_embed", "text_embed", "text_hidden", "text_mask", "text_len"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).pin_memory())
        return self

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PriorBatch:
        # Move fp16 first, cast after: half the bytes over PCIe, and the cast runs on the GPU.
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking).float()

        if self.text_len is not None:
            hidden, mask = self._pad_on(device, non_blocking)
        else:
            hidden, mask = move(self.text_hidden), self.text_mask.to(device, non_blocking=non_blocking)
            if self.pad_to is not None and hidden.shape[1] < self.pad_to:
                extra = self.pad_to - hidden.shape[1]
                hidden = torch.nn.functional.pad(hidden, (0, 0, 0, extra))
                mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
        return PriorBatch(
            image_embed=move(self.image_embed), text_embed=move(self.text_embed), text_hidden=hidden,
            text_mask=mask, keys=self.keys,
        )

    def _pad_on(self, device, non_blocking: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed tokens -> zero-padded [B, L, H] fp32 and mask [B, L] on `device`, without a host sync
        (sizes come from the host tensors; token t of row b lands at (b, t - start of b))."""
        n, tokens, h = len(self.text_len), self.text_hidden.shape[0], self.text_hidden.shape[1]
        width = self.pad_to or (int(self.text_len.max()) if n else 0)
        lengths = self.text_len.to(device, non_blocking=non_blocking).long()
        packed = self.text_hidden.to(device, non_blocking=non_blocking).float()
        row = torch.repeat_interleave(torch.arange(n, device=lengths.device), lengths, output_size=tokens)
        start = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(tokens, device=lengths.device) - start[row]
        hidden = packed.new_zeros((n, width, h))
        hidden[row, pos] = packed
        mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
        return hidden, mask


_END = object()


class StoreLoader:
    """Batches of one rank's part of the store: seeded shuffle, held-out filter, read-ahead thread.

    split: "train" (rows not held out), "heldout" (only held-out rows) or "all".
    infinite: repeat epochs (epoch e shuffles with seed+e); otherwise stop after one pass.
    start: (epoch, index) of the first batch to yield, from a checkpoint; earlier batches of
    that epoch are read and skipped, so the sequence continues exactly.
    pad_on_device: the host packs each batch's real tokens without padding (`StoreBatch`'s packed form)
    and `StoreBatch.to()` pads to `pad_to` on the device (the same PriorBatch, fewer bytes written, pinned
    and copied per batch; the trainer's setting on a GPU). Otherwise the host pads.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        batch_size: int,
        *,
        split: str = "train",
        heldout_fraction: float = 0.0,
        heldout_seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        drop_last: bool = True,
        start: tuple[int, int] = (0, 0),
        buffer_size: int = 8192,
        pad_to: int = 77,
        prefetch: int = 4,
        pin_memory: bool = False,
        shards: list[str] | None = None,
        pad_on_device: bool = False,
    ):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        if split == "heldout" and heldout_fraction <= 0:
            raise ValueError("split='heldout' needs heldout_fraction > 0")
        self.store, self.batch_size, self.split = store, batch_size, split
        self.heldout_fraction, self.heldout_seed = heldout_fraction, heldout_seed
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.infinite, self.drop_last = shuffle, infinite, drop_last
        self.start = start
        self.buffer_size, self.pad_to = buffer_size, pad_to
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.shards = shards
        self.pad_on_device = pad_on_device
        if split != "heldout" and rank == 0:  # once per run: the training loader of rank 0
            warn_duplicate_keys(store)

    def _row_filter(self):
        if self.split == "all" or self.heldout_fraction <= 0:
            return None
        frac, seed, want = self.heldout_fraction, self.heldout_seed, self.split == "heldout"
        return lambda keys: is_heldout(keys, frac, seed) == want

    def batches(self) -> Iterator[StoreBatch]:
        """The batch sequence, read in the calling thread."""
        epoch, skip = self.start
        row_filter = self._row_filter()
        while True:
            produced = 0
            for index, raw in enumerate(self.store.iter_batches(
                self.batch_size, TRAIN_COLUMNS, rank=self.rank, world_size=self.world_size, shuffle=self.shuffle,
                seed=self.seed, epoch=epoch, buffer_size=self.buffer_size,
                pad_to=self.pad_to, drop_last=self.drop_last, row_filter=row_filter, shards=self.shards,
                packed=self.pad_on_device,
            )):
                produced += 1
                if index >= skip:
                    yield StoreBatch.from_numpy(raw, epoch, index, self.pad_to if self.pad_on_device else None)
            if produced == 0 and skip == 0 and self.infinite:  # would spin forever
                raise StoreError(self._no_full_batch(epoch, row_filter))
            if not self.infinite:
                return
            epoch, skip = epoch + 1, 0

    def _no_full_batch(self, epoch: int, row_filter) -> str:
        """Why an epoch gave no batch, with a batch size that fits: this rank's rows of the split, counted from
        the key column (read once, only here)."""
        rows = sum(len(raw[KEY]) for raw in self.store.iter_batches(
            4096, [KEY], rank=self.rank, world_size=self.world_size, shuffle=self.shuffle, seed=self.seed,
            epoch=epoch, row_filter=row_filter, shards=self.shards,
        ))
        held = (f" (heldout_fraction {self.heldout_fraction:g} keeps the other rows for evaluation)"
                if self.split == "train" and self.heldout_fraction > 0 else "")
        head = (f"{self.store.dir}: rank {self.rank} of {self.world_size} got no full batch of {self.batch_size} "
                f"{self.split} rows in epoch {epoch}: its shards hold {rows} {self.split} row{'s' * (rows != 1)}{held}")
        if rows >= 2:
            fits = 1 << (rows.bit_length() - 1)
            return (f"{head}. Train with --batch-size {fits} (config key batch_size: the largest power of two <= "
                    f"{rows}), or with fewer processes or a bigger store.")
        return (f"{head}, and the eclipse objective needs at least 2 rows per batch (its InfoNCE term contrasts a "
                f"row with the others). Use a bigger store, fewer processes or a smaller heldout_fraction.")

    def __iter__(self) -> Iterator[StoreBatch]:
        if self.prefetch <= 0:
            yield from self.batches()
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for batch in self.batches():
                    if not put(batch.pin_memory() if self.pin_memory else batch):
                        return
                put(_END)
            except BaseException as e:  # handed to the consumer, raised there
                put(e)

        thread = threading.Thread(target=work, name=f"store-reader-rank{self.rank}", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=10)
