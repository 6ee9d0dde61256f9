"""Prompt suites: the T2I-CompBench validation prompts and embedding-level probes on them.

The prompt lists ship in `evaluation/prompt_data/` (MIT, see License.txt and SOURCE.md there).
They are encoded with the store's own text encoder, mapped to image embeddings by each prior
(several noise seeds) and baseline, and scored without any decoder:

- swap-pair test (color, shape, texture: the two attribute words exchanged; spatial: the two
  objects exchanged): is a prediction closer to its own prompt's text embedding than to the
  swapped prompt's? A prior that binds attributes to objects should say yes. The text
  embedding used as the prediction (TextEmb) passes trivially (cos = 1 to itself): read it
  together with the gap-sensitive figures below.
- cos to the prompt's text embedding; retrieval of the own prompt among the category's prompts;
  cosine to the nearest real image embedding of the store's held-out split (is the prediction
  on the image manifold at all?); norm relative to real image embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from evaluation import metrics as M

DATA_PACKAGE = __package__  # the lists ship inside this package
DATA_DIR = "prompt_data"
CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
SPLITS = ("val", "val_seen", "val_unseen")  # seen/unseen exist for color, shape, texture only
SWAP_CATEGORIES = ("color", "shape", "texture", "spatial")

# Attribute vocabularies, read off the two-object prompts of the shipped lists (the word after
# the article in "a(n) ATTR NOUN and a(n) ATTR NOUN"). Color needs a closed list because some
# color prompts are free sentences ("Two kitchen ..."); shape/texture prompts all follow the pattern.
COLOR_WORDS = frozenset(
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden tan beige".split()
)
SHAPE_WORDS = frozenset(
    "teardrop rectangular spherical pyramidal small pentagonal triangular round cylindrical cubic oblong conical "
    "big square short oval diamond tall circular long crescent".split()
)
TEXTURE_WORDS = frozenset("metallic wooden fluffy glass leather fabric rubber plastic".split())
ATTRIBUTE_WORDS: dict[str, frozenset[str]] = {"color": COLOR_WORDS, "shape": SHAPE_WORDS, "texture": TEXTURE_WORDS}
# Position words of the spatial probe family: the single words of T2I-CompBench's relations that say where
# in the image an object is ("on the left of", "on the right of", "on the top of", "on the bottom of"), plus
# "above"/"below", the way captions mostly say top/bottom. "next to", "near" and "on side of" are left out:
# they relate two objects without placing either, so an image embedding has no position to carry for them
# (and "next", "near", "side" mostly mean something else in captions).
SPATIAL_WORDS = frozenset("left right top bottom above below".split())
# The attribute probe's families (T2I-CompBench categories that can be probed on an image embedding).
PROBE_FAMILIES: dict[str, frozenset[str]] = {**ATTRIBUTE_WORDS, "spatial": SPATIAL_WORDS}
SPATIAL_RELATIONS = ("on the top of", "on the bottom of", "on the left of", "on the right of", "on side of",
                     "next to", "near")


def prompt_file(category: str, split: str = "val") -> str:
    if category not in CATEGORIES:
        raise ValueError(f"unknown prompt category {category!r}; choose from {list(CATEGORIES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    return f"{category}_{split}.txt"


def load_prompts(category: str, split: str = "val") -> list[str]:
    """The prompts of one T2I-CompBench list, in file order (stripped, empty lines dropped)."""
    name = prompt_file(category, split)
    path = resources.files(DATA_PACKAGE).joinpath(DATA_DIR, name)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt list {name} in {DATA_PACKAGE}/{DATA_DIR} (split {split!r} exists only "
                                f"for color, shape and texture)")
    # splitlines(): the files have CRLF endings and some lack a final newline
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- swaps ---------------------------------------------------------------------------------------


def _article(word: str, like: str) -> str:
    """The indefinite article for `word`, keeping a definite one and the original's capitalisation."""
    if like.lower() == "the":
        art = "the"
    else:
        art = "an" if word[:1].lower() in "aeiou" else "a"
    return art.capitalize() if like[:1].isupper() else art


_TWO_OBJECTS = re.compile(
    r"^(?:(?P<art1>a|an|the) )?(?P<attr1>[\w-]+) (?P<noun1>[^.]+?) and "
    r"(?:(?P<art2>a|an|the) )?(?P<attr2>[\w-]+) (?P<noun2>[^.]+?)(?P<end>\.?)$",
    re.IGNORECASE,
)


def attribute_swap(prompt: str, vocabulary: frozenset[str] | None = None) -> str | None:
    """"a red car and a blue bench" -> "a blue car and a red bench"; None if the prompt is not of
    that form (exactly one " and ", both attributes in `vocabulary` when given, and different)."""
    if prompt.count(" and ") != 1:
        return None
    m = _TWO_OBJECTS.match(prompt.strip())
    if m is None:
        return None
    a1, a2 = m["attr1"], m["attr2"]
    if a1.lower() == a2.lower():
        return None
    if vocabulary is not None and (a1.lower() not in vocabulary or a2.lower() not in vocabulary):
        return None
    parts = []
    for art, attr, noun in ((m["art1"], a2, m["noun1"]), (m["art2"], a1, m["noun2"])):
        parts.append(f"{_article(attr, art)} {attr} {noun}" if art else f"{attr} {noun}")
    first = parts[0]
    if m["art1"] is None and a1[:1].isupper():  # keep sentence capitalisation
        first = first[:1].upper() + first[1:]
    return f"{first} and {parts[1]}{m['end']}"


_SPATIAL = re.compile(
    r"^(?P<art1>a|an|the) (?P<obj1>.+?) (?P<rel>" + "|".join(re.escape(r) for r in SPATIAL_RELATIONS) + r") "
    r"(?P<art2>a|an|the) (?P<obj2>.+?)(?P<end>\.?)$",
    re.IGNORECASE,
)


def object_swap(prompt: str) -> str | None:
    """"a giraffe next to a lamp" -> "a lamp next to a giraffe"; None if not "OBJ RELATION OBJ"."""
    m = _SPATIAL.match(prompt.strip())
    if m is None or m["obj1"].lower() == m["obj2"].lower():
        return None
    return (f"{_article(m['obj2'], m['art1'])} {m['obj2']} {m['rel']} "
            f"{_article(m['obj1'], m['art2'])} {m['obj1']}{m['end']}")


def swap_prompt(prompt: str, category: str) -> str | None:
    """The swapped counterpart used by the swap-pair test, or None when the category/prompt has none."""
    if category in ATTRIBUTE_WORDS:
        return attribute_swap(prompt, ATTRIBUTE_WORDS[category])
    if category == "spatial":
        return object_swap(prompt)
    return None


def probe_vocabulary() -> list[str]:
    """Attribute words for the caption probe (colors, textures, shapes), sorted."""
    return sorted(COLOR_WORDS | TEXTURE_WORDS | SHAPE_WORDS)


def probe_families() -> dict[str, list[str]]:
    """The caption probe's default families: color, shape, texture, spatial, each its words sorted."""
    return {name: sorted(words) for name, words in PROBE_FAMILIES.items()}


# -- encoding ------------------------------------------------------------------------------------


@dataclass
class EncodedPrompts:
    prompts: list[str]
    text_embed: np.ndarray  # [N, D] float32
    text_hidden: np.ndarray  # [N, pad_to, H] float32, zero-padded
    text_mask: np.ndarray  # [N, pad_to] bool
    truncated: list[bool]


def encode_prompts(encoder, prompts: Sequence[str], pad_to: int = 77, batch_size: int = 64) -> EncodedPrompts:
    """Encode prompts exactly as the store was encoded (pipeline.encoders.ClipEncoder.encode_texts),
    padded to the prior's text length with a mask, as the store reader pads them."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    embeds, hiddens, masks, truncated = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        out = encoder.encode_texts(prompts[start : start + batch_size])
        embeds.append(out.text_embeds.detach().float().cpu().numpy())
        h_dim = out.hidden[0].shape[1]
        hidden = np.zeros((len(out.hidden), pad_to, h_dim), dtype=np.float32)
        mask = np.zeros((len(out.hidden), pad_to), dtype=bool)
        for i, h in enumerate(out.hidden):
            n = min(len(h), pad_to)
            hidden[i, :n] = h[:n]
            mask[i, :n] = True
        hiddens.append(hidden)
        masks.append(mask)
        truncated += list(out.truncated)
    return EncodedPrompts(prompts, np.concatenate(embeds), np.concatenate(hiddens), np.concatenate(masks), truncated)


# -- the suite -----------------------------------------------------------------------------------

# name -> (predict(encoded, seed) -> [N, D] array, number of noise seeds; 1 = deterministic)
PromptModels = Mapping[str, tuple[Callable[[EncodedPrompts, int], np.ndarray], int]]
PROMPT_METRICS = ("swap_acc", "swap_margin", "cos_text", "text_r1", "cos_nearest_image", "norm_ratio")


def _swap_rows(pred: np.ndarray, own: np.ndarray, swapped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c_own = M.rowwise_cosine(pred, own)
    c_swap = M.rowwise_cosine(pred, swapped)
    acc = np.where(c_own > c_swap, 1.0, np.where(c_own == c_swap, 0.5, 0.0))
    return acc, c_own - c_swap


def run_prompt_suite(
    encoder,
    models: PromptModels,
    real_images: np.ndarray,
    categories: Sequence[str] = CATEGORIES,
    max_prompts: int | None = None,
    pad_to: int = 77,
    n_boot: int = 1000,
    level: float = 0.95,
    boot_seed: int = 0,
) -> dict:
    """Per-category scores of every model, with bootstrap intervals over prompts.

    real_images: real image embeddings [G, D] (the store's held-out rows) for the
    gap-sensitive figures; max_prompts: first N prompts of each list (None: all).
    """
    real_images = np.asarray(real_images, dtype=np.float64)
    mean_real_norm = float(np.linalg.norm(real_images, axis=1).mean())
    result: dict = {"categories": {}, "overall": {}}
    pooled: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in models}
    for cat in categories:
        prompts = load_prompts(cat)[:max_prompts] if max_prompts else load_prompts(cat)
        enc = encode_prompts(encoder, prompts, pad_to)
        swaps = [swap_prompt(p, cat) for p in prompts]
        swap_idx = np.array([i for i, s in enumerate(swaps) if s is not None], dtype=np.int64)
        swapped_embed = (encode_prompts(encoder, [swaps[i] for i in swap_idx], pad_to).text_embed
                         if len(swap_idx) else None)
        entry: dict = {"n_prompts": len(prompts), "n_swaps": int(len(swap_idx)),
                       "swap_examples": [[prompts[i], swaps[i]] for i in swap_idx[:3]],
                       "truncated": int(sum(enc.truncated)), "models": {}}
        for name, (predict, n_seeds) in models.items():
            rows: dict[str, list[np.ndarray]] = {k: [] for k in PROMPT_METRICS}
            for seed in range(n_seeds):
                pred = np.asarray(predict(enc, seed), dtype=np.float64)
                rows["cos_text"].append(M.rowwise_cosine(pred, enc.text_embed))
                rows["text_r1"].append(M.recall_at_k(M.retrieval_ranks(pred, enc.text_embed), 1))
                rows["cos_nearest_image"].append(M.max_cosine(pred, real_images))
                rows["norm_ratio"].append(np.linalg.norm(pred, axis=1) / mean_real_norm)
                if swapped_embed is not None:
                    acc, margin = _swap_rows(pred[swap_idx], enc.text_embed[swap_idx], swapped_embed)
                    rows["swap_acc"].append(acc)
                    rows["swap_margin"].append(margin)
            summaries = {}
            for k, v in rows.items():
                if not v:
                    continue
                arr = np.stack(v)  # [seeds, rows]
                summaries[k] = M.summarize(arr if n_seeds > 1 else arr[0], n_boot, level, boot_seed).to_dict()
                pooled[name].setdefault(k, []).append(arr)
            entry["models"][name] = summaries
        result["categories"][cat] = entry
    for name, by_metric in pooled.items():
        result["overall"][name] = {
            k: M.summarize(np.concatenate(v, axis=1) if v[0].shape[0] > 1 else np.concatenate(v, axis=1)[0],
                           n_boot, level, boot_seed).to_dict()
            for k, v in by_metric.items()
        }
    return result
