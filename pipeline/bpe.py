"""A CLIP-ordered byte-level BPE tokenizer in which each word of a given list is one token.

Built, not downloaded: the tiny-clip preset (:mod:`pipeline.encoders`) and the demo's teacher
CLIP (:mod:`demo.teacher`) tokenize with one, so their captions are a few tokens each, and any
other text still encodes (byte fallback).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as the tokenizers library does it: merge the best-ranked
    adjacent pair (everywhere in the word), repeat until no known pair is left."""
    while len(symbols) > 1:
        rank, pair = min((ranks.get(p, float("inf")), p) for p in zip(symbols, symbols[1:], strict=False))
        if rank == float("inf"):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def bpe_vocab_and_merges(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-ordered byte-level BPE vocabulary in which each of `words` is one token: 256 bytes,
    256 bytes + `</w>` (any text stays encodable), merge results, then BOS and EOS (EOS has the
    highest id: open_clip's argmax pooling finds it).

    Merges are added per word until BPE, as the tokenizer will run it, ends in one token: a merge
    appended last has the lowest priority, so it never changes how an earlier word is split.
    """
    from open_clip.tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        initial = [*word[:-1], word[-1] + "</w>"]
        symbols = _bpe(initial, ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            symbols = _bpe(initial, ranks)
    merges = sorted(ranks, key=ranks.__getitem__)
    tokens = list(dict.fromkeys(alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]))
    return {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}, merges


def build_bpe_tokenizer(words: Sequence[str], context_length: int) -> Any:
    """A transformers CLIPTokenizer over `bpe_vocab_and_merges(words)` (padding is EOS)."""
    from transformers import CLIPTokenizer

    vocab, merges = bpe_vocab_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)
