"""From a prompt to an image: our prior's image embedding through an unCLIP decoder.

    generate("a red car and a blue bench", "runs/eclipse/prior", decoder="kandinsky22") -> PIL.Image

The pieces: `evaluation.priors` (open a prior, its text encoder), `evaluation.decoders` (Kandinsky 2.2 and
Karlo), `evaluation.image_metrics` (CLIPScore, PickScore, FID). `generation_section` is the evaluation's
use of them: the same prompts and seeds through every prior, scored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from evaluation import metrics as M
from evaluation.decoders import DECODERS, Decoder, DecoderKind, decoder_steps, negative_embeddings
from evaluation.image_metrics import ClipImageScorer, ImageMetricUnavailable, fid_between, pickscore_preference
from evaluation.images import ImageSource
from evaluation.predict import Heldout
from evaluation.priors import PriorHandle, open_prior, prior_encoder, prompt_embeddings
from evaluation.prompts import load_prompts
from evaluation.scoring import spread_rows
from evaluation.weights import WeightsMissingError
from pipeline.families import FAMILIES
from storage_schema.atomic import atomic_path


def generate(
    prompt: str,
    prior_dir: str | os.PathLike,
    decoder: DecoderKind | None = None,
    decoder_path: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    encoder: str | os.PathLike | None = None,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    local_files_only: bool = False,
    super_res_steps: int | None = None,
) -> Image.Image:
    """One image for `prompt`: our prior's image embedding (noise seeded by `seed`) through the decoder.

    decoder: None picks the prior's (`decoder_for`); decoder_path: a local decoder folder (default: the hub id
    of `decoder`, from the HF cache; only from it when the hub is offline: `Decoder.load`);
    encoder: the prior's text encoder (default: the one recorded in its run folder);
    out: also save the image there (PNG, with prompt/prior/seed in its text chunks).
    steps/guidance_scale: decoder sampling (defaults: DECODER_DEFAULTS); height/width: Kandinsky only;
    super_res_steps: Karlo only.
    """
    handle = open_prior(prior_dir, device)  # small: read first, so a mismatch fails before the decoder loads
    decoder = decoder_for(handle, decoder, decoder_path)
    decoder_steps(decoder, steps, super_res_steps)  # fail fast on options, before any weights load
    dec = Decoder.load(decoder, decoder_path, device, local_files_only=local_files_only)  # fail fast on weights
    dec.check_prior(handle)
    enc = prior_encoder(handle, encoder, device)
    emb = prompt_embeddings(handle, enc, [prompt], seed)
    neg = negative_embeddings(dec, handle, enc, 1, negative_prompt, seed)
    image = dec.decode(emb, [prompt], neg, seed=seed, steps=steps, guidance_scale=guidance_scale, height=height,
                       width=width, super_res_steps=super_res_steps)[0]
    if out is not None:
        save_png(image, out, {"prompt": prompt, "prior": str(prior_dir), "decoder": f"{decoder}:{dec.source}",
                              "seed": str(seed), "negative_prompt": negative_prompt or ""})
    return image


def decoder_for(handle: PriorHandle, decoder: DecoderKind | None, decoder_path: str | os.PathLike | None
                ) -> DecoderKind:
    """The decoder to generate with: `decoder`, else the one whose encoder the prior was trained on (recorded in
    its run) or whose D it predicts. The hub's decoders take their released D: a prior of another D is refused
    here, before gigabytes of weights load (a folder's decoder is checked by its own config after loading)."""
    released = {kind: FAMILIES[kind].embedding_dim for kind in DECODERS}
    d = handle.embedding_dim
    trained_on = (handle.encoder_info or {}).get("preset")
    if decoder is None:
        fits = [k for k in DECODERS if k == trained_on] or [k for k in DECODERS if released[k] == d]
        if not fits:
            if decoder_path is not None:
                raise ValueError(f"prior {handle.name} (D={d}) names no decoder: pass --decoder "
                                 f"({' or '.join(DECODERS)}) for the decoder folder {decoder_path}")
            raise ValueError(_no_decoder_fits(handle, released))
        decoder = fits[0]
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {list(DECODERS)}")
    if decoder_path is None and released[decoder] != d:
        raise ValueError(_no_decoder_fits(handle, released, decoder))
    return decoder


def _no_decoder_fits(handle: PriorHandle, released: dict[str, int], asked: str | None = None) -> str:
    trained_on = (handle.encoder_info or {}).get("preset")
    return (f"prior {handle.name} predicts D={handle.embedding_dim} image embeddings"
            + (f" (trained on a store of encoder {trained_on!r})" if trained_on else "")
            + (f", but the {asked} decoder takes D={released[asked]}" if asked else
               f", which no unCLIP decoder takes ({', '.join(f'{k}: D={v}' for k, v in released.items())})")
            + ". Generate with a prior trained on a store of the decoder's own encoder (precompute --encoder "
            "kandinsky22 or karlo), or pass a decoder folder of this D with --decoder-path.")


def save_png(image: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    """Write `image` as a PNG with `text` in its text chunks (atomically)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe short form of a prompt: "A red car!" -> "a-red-car"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len] or "image"


def default_image_name(prompt: str, seed: int) -> str:
    """The CLI's output file when none is given: PROMPT-seedN.png in the working directory."""
    return f"{slug(prompt)}-seed{seed}.png"


# -- in an evaluation: every prior, the same prompts and seeds -----------------------------------------


def generation_section(dec: Decoder, enc, handles: Sequence[PriorHandle], held: Heldout, generate_from: str, n: int,
                       seeds: int, steps: int | None, size: int | None, scorers: dict[str, ClipImageScorer],
                       fid: bool, src: ImageSource, images: dict[str, Image.Image], n_boot: int, level: float,
                       boot_seed: int) -> dict:
    """n prompts x every prior x the same seeds through the decoder; image metrics when weights are here.

    The rendered images are added to `images` under the ids the section names."""
    if generate_from == "heldout":
        rows = spread_rows(len(held.keys), n)
        prompts = [held.captions[i] for i in rows]
    else:
        rows, prompts = [], load_prompts(generate_from)[:n]
    gen_seeds = list(range(max(1, seeds)))
    items, per_prior = _render(dec, enc, handles, prompts, gen_seeds, steps, size, images)
    flat_prompts = [p for p in prompts for _ in gen_seeds]
    metrics = {kind: _scores(scorer, per_prior, flat_prompts, [h.name for h in handles], n_boot, level, boot_seed)
               for kind, scorer in scorers.items()}
    if fid:
        real = [src.get(held.keys[i], held.urls[i]) for i in rows]
        metrics["fid"] = _fid(real * len(gen_seeds), per_prior)
    return {"decoder": dec.kind, "decoder_path": dec.source, "from": generate_from, "seeds": gen_seeds,
            "items": items, "metrics": metrics}


def _render(dec: Decoder, enc, handles: Sequence[PriorHandle], prompts: list[str], seeds: list[int],
            steps: int | None, size: int | None, images: dict[str, Image.Image]
            ) -> tuple[list[dict], dict[str, list[Image.Image]]]:
    """(one item per prompt and seed naming each prior's image, each prior's images in prompt-seed order)."""
    items = []
    per_prior: dict[str, list[Image.Image]] = {h.name: [] for h in handles}
    # Kandinsky's negative (the zero-image embedding) is the same for every prompt and prior: compute it once.
    negative = negative_embeddings(dec, handles[0], enc, 1, None, 0)
    for pi, prompt in enumerate(prompts):
        for seed in seeds:
            entry = {"prompt": prompt, "seed": seed, "images": {}}
            for h in handles:
                emb = prompt_embeddings(h, enc, [prompt], seed)
                im = dec.decode(emb, [prompt], negative, seed=seed, steps=steps, height=size, width=size)[0]
                im_id = f"gen-{pi}-s{seed}-{len(per_prior[h.name])}-{re.sub(r'[^A-Za-z0-9]+', '_', h.name)}"
                images[im_id] = im
                per_prior[h.name].append(im)
                entry["images"][h.name] = im_id
            items.append(entry)
    return items, per_prior


def _scores(scorer: ClipImageScorer, per_prior: dict[str, list[Image.Image]], prompts: list[str],
            priors: list[str], n_boot: int, level: float, boot_seed: int) -> dict:
    """One scorer's figures per prior; for PickScore also each prior's win rate against the first."""
    scores = {name: scorer.score(ims, prompts) for name, ims in per_prior.items()}
    block = {"model": scorer.source, "per_prior": {name: M.summarize(s, n_boot, level, boot_seed).to_dict()
                                                    for name, s in scores.items()}}
    if scorer.kind == "pickscore" and len(priors) > 1:
        ref = priors[0]
        block["win_rate_vs"] = ref
        block["win_rates"] = {}
        for name in priors[1:]:
            pref = pickscore_preference(scores[name], scores[ref])
            block["win_rates"][name] = {k: M.summarize(v, n_boot, level, boot_seed).to_dict()
                                        for k, v in pref.items()}
    return block


def _fid(real: list[Image.Image | None], per_prior: dict[str, list[Image.Image]]) -> dict:
    """FID of each prior's images against the real images of the same prompts, or why there is none."""
    if not real or any(r is None for r in real):
        return {"unavailable": "FID needs the real images of the prompts: generate from the held-out captions and "
                               "pass an image source holding them"}
    try:
        return {name: fid_between(real, ims) for name, ims in per_prior.items()}
    except (ImageMetricUnavailable, WeightsMissingError) as e:
        return {"unavailable": str(e)}
