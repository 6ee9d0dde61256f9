"""From a prompt to an image: our prior's image embedding through an unCLIP decoder.

    generate("a red car and a blue bench", "runs/eclipse/prior", decoder="kandinsky22") -> PIL.Image

- `kandinsky22`: diffusers' KandinskyV22Pipeline (UNet + MoVQ) fed `image_embeds` from our prior
  and `negative_image_embeds` = the CLIP image embedding of an all-zero image, as ECLIPSE's
  Kandinsky pipeline does (or our prior's embedding of a negative prompt). The paper's decoder
  setting is 50 DDIM steps, guidance 7.5.
- `karlo`: the Karlo v1 alpha decoder (UnCLIPPipeline's text_proj + decoder UNet + two
  super-resolution UNets). UnCLIPPipeline has no image-embedding input (it always runs its own
  1B-parameter prior), so `_karlo_decode` runs its decoder and super-resolution stages with our
  embedding, exactly as ECLIPSE's Karlo pipeline does: the decoder still sees the prompt through
  Karlo's own text encoder. The Karlo prior is never loaded.

Also here: opening a prior folder / run folder / checkpoint for inference (`open_prior`), its
text encoder (`prior_encoder`), image metrics that need model weights (CLIPScore, PickScore,
FID) and tiny random decoders/encoders built from configs for tests and demos.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.export import (
    CHECKPOINTS,
    COMPLETE,
    EMA_DIR,
    PRIOR_DIR,
    STATE,
    TRAINING_INFO,
    WEIGHTS_NAME,
    latest_checkpoint,
)
from training.objectives import Objective, PriorBatch, make_objective

CONFIG_NAME = "train_config.json"  # training.config.CONFIG_NAME; not imported to keep this module light
TRAIN_LOG = Path("logs") / "train.jsonl"  # training.trainer.Logger writes RUN/logs/train.jsonl

DECODERS: dict[str, str] = {
    "kandinsky22": "kandinsky-community/kandinsky-2-2-decoder",
    "karlo": "kakaobrain/karlo-v1-alpha",
}
DECODER_TITLES = {"kandinsky22": "Kandinsky 2.2 decoder", "karlo": "Karlo v1 alpha decoder"}
# The paper: "Image diffusion decoders are set to 50 DDIM steps and 7.5 classifier-free guidance".
# Karlo's decoder predicts a learned variance for its own UnCLIPScheduler, which has no DDIM
# variant; it keeps diffusers'/ECLIPSE's Karlo defaults of 25 decoder and 7 super-resolution steps.
DECODER_DEFAULTS: dict[str, dict] = {
    "kandinsky22": {"steps": 50, "guidance_scale": 7.5, "height": 512, "width": 512},
    "karlo": {"steps": 25, "guidance_scale": 7.5, "super_res_steps": 7},
}


class WeightsMissingError(FileNotFoundError):
    """Model weights that a step needs are not on this machine (and are never downloaded in tests)."""


class ImageMetricUnavailable(RuntimeError):
    """An image metric cannot run here (no library installed for it)."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- priors ------------------------------------------------------------------------------------


@dataclass
class PriorHandle:
    """A prior loaded for inference, with what its run folder says about it."""

    name: str
    source: Path  # the path the caller gave
    prior_dir: Path  # the folder the weights came from
    run_dir: Path | None
    model: torch.nn.Module
    objective: Objective
    objective_name: str  # eclipse | projection | diffusion | time-free (run config unknown)
    train_config: dict | None
    encoder_info: dict | None  # the store encoder recorded in the training checkpoint
    log_path: Path | None
    device: torch.device

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.embedding_dim)

    @property
    def text_length(self) -> int:
        return int(self.model.config.num_embeddings)

    @torch.no_grad()
    def predict(self, text_embed, text_hidden, text_mask, generator: torch.Generator) -> torch.Tensor:
        """Image embeddings [B, D] (fp32) for text inputs, one draw of the prior's noise."""
        dev = self.device
        te = torch.as_tensor(np.asarray(text_embed), dtype=torch.float32).to(dev)
        batch = PriorBatch(
            # image_embed is only read for its shape (the noise draw); the target is unknown at inference
            image_embed=torch.zeros(te.shape[0], self.embedding_dim, device=dev),
            text_embed=te,
            text_hidden=torch.as_tensor(np.asarray(text_hidden), dtype=torch.float32).to(dev),
            text_mask=torch.as_tensor(np.asarray(text_mask), dtype=torch.bool).to(dev),
        )
        return self.objective.predict(self.model, batch, generator).float()

    def predict_numpy(self, text_embed, text_hidden, text_mask, seed: int, batch_size: int = 256) -> np.ndarray:
        """predict() over many rows in batches with one seeded generator: [N, D] float32."""
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        out = []
        for s in range(0, len(text_embed), batch_size):
            sl = slice(s, s + batch_size)
            out.append(self.predict(text_embed[sl], text_hidden[sl], text_mask[sl], gen).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embedding_dim), np.float32)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _locate(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(weights folder, run folder, checkpoint folder) for a prior folder, run folder or checkpoint."""
    if (path / "config.json").is_file():
        if (path.parent / STATE).is_file():  # RUN/checkpoints/step_N/prior
            return path, path.parent.parent.parent, path.parent
        run = path.parent if (path.parent / CONFIG_NAME).is_file() or (path.parent / CHECKPOINTS).is_dir() else None
        return path, run, None
    if (path / COMPLETE).is_file():  # a checkpoint folder: EMA weights when kept, as export does
        sub = EMA_DIR if (path / EMA_DIR / WEIGHTS_NAME).is_file() else PRIOR_DIR
        return path / sub, path.parent.parent, path
    if (path / PRIOR_DIR / "config.json").is_file():  # a run folder with its exported prior
        return path / PRIOR_DIR, path, None
    if (path / CHECKPOINTS).is_dir():  # a run folder not exported yet: its latest complete checkpoint
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: run folder has no complete checkpoint and no exported prior yet")
        sub = EMA_DIR if (ckpt / EMA_DIR / WEIGHTS_NAME).is_file() else PRIOR_DIR
        return ckpt / sub, path, ckpt
    raise FileNotFoundError(
        f"{path}: not a prior folder (config.json + {WEIGHTS_NAME}), a run folder (train_config.json, prior/, "
        f"checkpoints/) or a checkpoint folder"
    )


def open_prior(path: str | os.PathLike, device: str | torch.device | None = None) -> PriorHandle:
    """Load a prior for inference from an exported prior folder, a run folder or a checkpoint."""
    from training.prior import PriorTransformer, load_prior, prior_class

    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"prior {source}: no such folder")
    prior_dir, run_dir, ckpt = _locate(source)
    dev = torch.device(device) if device is not None else default_device()
    model = load_prior(prior_dir).to(dev).eval()
    train_config = _read_json(run_dir / CONFIG_NAME) if run_dir else None
    state = None
    if ckpt is not None:
        state = _read_json(ckpt / STATE)
    elif run_dir is not None and latest_checkpoint(run_dir) is not None:
        state = _read_json(latest_checkpoint(run_dir) / STATE)
    config = _read_json(prior_dir / "config.json") or {}
    if prior_class(config) is not PriorTransformer:  # diffusers' time-conditioned prior: the diffusion baseline
        name = "diffusion"
        kw = {}
        if train_config:
            kw = {"num_inference_steps": train_config.get("inference_steps", 25),
                  "guidance_scale": train_config.get("guidance_scale", 4.0)}
        objective = make_objective("diffusion", **kw)
    else:
        # eclipse and projection priors predict with the same single forward pass
        name = (train_config or {}).get("objective") or "time-free"
        objective = make_objective("projection")
    label = run_dir.name if run_dir is not None else (prior_dir.name if prior_dir.name != PRIOR_DIR
                                                      else prior_dir.parent.name)
    log = run_dir / TRAIN_LOG if run_dir is not None and (run_dir / TRAIN_LOG).is_file() else None
    return PriorHandle(name=label, source=source, prior_dir=prior_dir, run_dir=run_dir, model=model,
                       objective=objective, objective_name=name, train_config=train_config,
                       encoder_info=(state or _read_json(prior_dir / TRAINING_INFO) or {}).get("encoder"),
                       log_path=log, device=dev)


def prior_encoder(handle: PriorHandle, encoder: str | os.PathLike | None = None, device=None):
    """The text (and image) encoder a prior was trained on: `encoder` if given, else the encoder
    recorded in its training checkpoint, else the one of the store named in its run config."""
    from pipeline.encoders import get_encoder

    name = os.fspath(encoder) if encoder is not None else None
    if name is None and handle.encoder_info:
        name = handle.encoder_info.get("preset")
    if name is None and handle.train_config and handle.train_config.get("store"):
        from storage_schema import EmbeddingStore

        try:
            name = EmbeddingStore(handle.train_config["store"]).encoder.preset
        except Exception:  # the store may live elsewhere; fall through to the message below
            name = None
    if name is None:
        raise ValueError(
            f"prior {handle.source}: which text encoder it was trained on is not recorded (no run folder with a "
            f"checkpoint beside it); pass the encoder (kandinsky22, karlo, an encoder folder, ...) explicitly"
        )
    enc = get_encoder(name, device=device)
    d = handle.embedding_dim
    if enc.info.text_dim != d or enc.info.hidden_dim != d:
        raise ValueError(f"encoder {name!r} gives text_embeds D={enc.info.text_dim} and hidden states "
                         f"H={enc.info.hidden_dim}, but prior {handle.name} needs D = H = {d}")
    return enc


def prompt_embeddings(handle: PriorHandle, encoder, prompts: Sequence[str], seed: int = 0) -> torch.Tensor:
    """Our prior's image embeddings [B, D] for prompts (one seeded noise draw)."""
    from evaluation.prompts import encode_prompts

    enc = encode_prompts(encoder, list(prompts), pad_to=handle.text_length)
    return torch.from_numpy(handle.predict_numpy(enc.text_embed, enc.text_hidden, enc.text_mask, seed))


@torch.no_grad()
def zero_image_embedding(encoder) -> torch.Tensor:
    """CLIP image embedding [1, D] of an all-zero pixel tensor: ECLIPSE's Kandinsky negative."""
    h, w = encoder.image_size
    return encoder.encode_images(torch.zeros(1, 3, h, w)).float().cpu()


# -- decoders -----------------------------------------------------------------------------------


def _weights_message(what: str, ref: str, default: str | None, cause: Exception | None = None,
                     option: str = "--decoder-path / decoder_path=") -> str:
    hint = (f"Download them where there is internet (`hf download {default}`) and pass the folder with "
            f"{option}, or run where the Hugging Face cache already holds them."
            if default else f"Pass a folder that holds them with {option}.")
    msg = f"missing weights: {what} {ref!r} is not on this machine (not a local folder, not in the Hugging Face " \
          f"cache). {hint}"
    return msg + (f"\n  cause: {cause}" if cause is not None else "")


def _looks_local(ref: str) -> bool:
    """A folder reference rather than a hub id ("org/name")."""
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def _dtype_kw(dtype: torch.dtype) -> dict:
    """diffusers >= 0.36 names the load dtype `dtype` and warns on `torch_dtype`; older releases only know
    `torch_dtype` (pyproject allows diffusers >= 0.27)."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load_pretrained(cls, ref: str | os.PathLike, what: str, default: str | None = None,
                    local_files_only: bool = False, option: str = "--decoder-path / decoder_path=", **kw):
    """cls.from_pretrained(ref) with a clear WeightsMissingError naming the weights when they are absent.

    what: the weights in words; default: their hub id (named in the message); option: how to pass a folder.
    """
    ref = os.fspath(ref)
    p = Path(ref).expanduser()
    if _looks_local(ref) and not p.is_dir():
        raise WeightsMissingError(_weights_message(what, ref, default, option=option))
    try:
        return cls.from_pretrained(str(p) if p.is_dir() else ref, local_files_only=local_files_only, **kw)
    except OSError as e:  # missing folders/files and hub or cache misses all surface as OSError
        raise WeightsMissingError(_weights_message(what, ref, default, e, option)) from e


class Decoder:
    """An unCLIP decoder that turns image embeddings [B, D] into images."""

    def __init__(self, kind: str, pipe, source: str):
        self.kind, self.pipe, self.source = kind, pipe, source

    @classmethod
    def load(cls, kind: str, path: str | os.PathLike | None = None, device=None, dtype: torch.dtype | None = None,
             local_files_only: bool = False) -> Decoder:
        if kind not in DECODERS:
            raise ValueError(f"unknown decoder {kind!r}; choose one of {sorted(DECODERS)}")
        ref = os.fspath(path) if path is not None else DECODERS[kind]
        dev = torch.device(device) if device is not None else default_device()
        dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        if kind == "kandinsky22":
            from diffusers import DDIMScheduler, KandinskyV22Pipeline

            # low_cpu_mem_usage=False: the fast path needs `accelerate`, which this project does not install
            pipe = load_pretrained(KandinskyV22Pipeline, ref, DECODER_TITLES[kind], DECODERS[kind], local_files_only,
                                   low_cpu_mem_usage=False, **_dtype_kw(dt))
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the paper's DDIM decoder sampling
        else:
            pipe = _load_karlo(ref, dt, local_files_only)
        pipe.set_progress_bar_config(disable=True)
        return cls(kind, pipe.to(dev), ref)

    @property
    def embedding_dim(self) -> int:
        if self.kind == "kandinsky22":
            return int(self.pipe.unet.config.encoder_hid_dim)
        return int(self.pipe.text_proj.config.clip_embeddings_dim)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def check_prior(self, handle: PriorHandle) -> None:
        if handle.embedding_dim != self.embedding_dim:
            raise ValueError(f"prior {handle.name} predicts D={handle.embedding_dim} image embeddings, but the "
                             f"{DECODER_TITLES[self.kind]} at {self.source} takes D={self.embedding_dim}")

    @torch.no_grad()
    def decode(
        self,
        image_embeds: torch.Tensor,
        prompts: Sequence[str] | None = None,
        negative_image_embeds: torch.Tensor | None = None,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        super_res_steps: int | None = None,
    ) -> list[Image.Image]:
        """Images for image embeddings [B, D]; prompts are read by Karlo's decoder (Kandinsky has no text
        input); negative_image_embeds are Kandinsky's guidance negative; height/width: Kandinsky only
        (Karlo's sizes are fixed by its UNets); super_res_steps: Karlo only."""
        d = DECODER_DEFAULTS[self.kind]
        steps, sr_steps = decoder_steps(self.kind, steps, super_res_steps)
        guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        gen = torch.Generator("cpu").manual_seed(int(seed))  # CPU generator: same images on any device
        dt = self.pipe.dtype
        emb = image_embeds.to(self.device, dt)
        if self.kind == "kandinsky22":
            if negative_image_embeds is None:
                raise ValueError("the Kandinsky decoder needs negative_image_embeds (e.g. zero_image_embedding)")
            neg = negative_image_embeds.to(self.device, dt).expand(emb.shape[0], -1)
            return self.pipe(image_embeds=emb, negative_image_embeds=neg, height=height or d["height"],
                             width=width or d["width"], num_inference_steps=steps, guidance_scale=guidance_scale,
                             generator=gen).images
        if prompts is None or len(prompts) != emb.shape[0]:
            raise ValueError("the Karlo decoder needs one prompt per image embedding (its decoder reads the text)")
        return _karlo_decode(self.pipe, list(prompts), emb, gen, steps, sr_steps, guidance_scale)


def decoder_steps(kind: str, steps: int | None, super_res_steps: int | None) -> tuple[int, int | None]:
    """(decoder steps, super-resolution steps) with DECODER_DEFAULTS filled in; refuses options the
    decoder does not have, before any weights are loaded."""
    d = DECODER_DEFAULTS[kind]
    steps = d["steps"] if steps is None else int(steps)
    if kind == "kandinsky22":
        if super_res_steps is not None:
            raise ValueError("super-resolution steps are Karlo's (its 64->256 px stage); the Kandinsky 2.2 decoder "
                             "has one denoising stage, set by --steps")
        if steps < 1:
            raise ValueError(f"decoder steps must be at least 1, got {steps}")
        return steps, None
    sr_steps = d["super_res_steps"] if super_res_steps is None else int(super_res_steps)
    if min(steps, sr_steps) < 2:  # UnCLIPScheduler spaces its steps by (T - 1) / (steps - 1)
        raise ValueError(f"Karlo's UnCLIPScheduler needs at least 2 steps (got {steps} decoder, {sr_steps} "
                         f"super-resolution)")
    return steps, sr_steps


def _load_karlo(ref: str, dtype: torch.dtype, local_files_only: bool):
    """Karlo's UnCLIPPipeline from its parts, without its prior.

    Built by hand: its model_index.json names text_proj's library "unclip" (Karlo's repo) or
    "diffusers" (save_pretrained), and diffusers 0.42 resolves neither since the pipeline moved to
    pipelines/deprecated. Karlo's own 1B-parameter prior is replaced by ours, so it is never loaded.
    """
    from diffusers import UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    what, default = DECODER_TITLES["karlo"], DECODERS["karlo"]

    def part(cls, sub: str, **kw):
        return load_pretrained(cls, ref, f"{what} ({sub})", default, local_files_only, subfolder=sub, **kw)

    # low_cpu_mem_usage=False: the fast path needs `accelerate`, which this project does not install
    models = {name: part(cls, name, low_cpu_mem_usage=False, **_dtype_kw(dtype)) for name, cls in (
        ("decoder", UNet2DConditionModel), ("text_proj", UnCLIPTextProjModel),
        ("super_res_first", UNet2DModel), ("super_res_last", UNet2DModel))}
    models["text_encoder"] = part(CLIPTextModelWithProjection, "text_encoder", dtype=dtype)
    return UnCLIPPipeline(
        prior=None, prior_scheduler=None, tokenizer=part(CLIPTokenizer, "tokenizer"),
        decoder_scheduler=part(UnCLIPScheduler, "decoder_scheduler"),
        super_res_scheduler=part(UnCLIPScheduler, "super_res_scheduler"), **models,
    )


@torch.no_grad()
def _karlo_decode(pipe, prompts: list[str], image_embeds: torch.Tensor, generator: torch.Generator, steps: int,
                  super_res_steps: int, guidance_scale: float) -> list[Image.Image]:
    """UnCLIPPipeline.__call__ from "done prior" on (diffusers 0.42), with `image_embeds` as the prior output."""
    import inspect

    import torch.nn.functional as F
    from diffusers import UnCLIPScheduler

    device = pipe._execution_device
    batch = len(prompts)
    do_cfg = guidance_scale > 1.0
    prompt_embeds, text_hidden, text_mask = pipe._encode_prompt(prompts, device, 1, do_cfg)
    text_hidden, additive_time = pipe.text_proj(
        image_embeddings=image_embeds.to(prompt_embeds.dtype), prompt_embeds=prompt_embeds,
        text_encoder_hidden_states=text_hidden, do_classifier_free_guidance=do_cfg,
    )
    decoder_mask = F.pad(text_mask, (pipe.text_proj.clip_extra_context_tokens, 0), value=True)

    # Fresh schedulers: set_timesteps mutates them, and a Decoder is reused across calls.
    dec_sched = UnCLIPScheduler.from_config(pipe.decoder_scheduler.config)
    dec_sched.set_timesteps(steps, device=device)
    size = pipe.decoder.config.sample_size
    latents = pipe.prepare_latents((batch, pipe.decoder.config.in_channels, size, size), text_hidden.dtype, device,
                                   generator, None, dec_sched)
    timesteps = dec_sched.timesteps
    for i, t in enumerate(timesteps):
        model_in = torch.cat([latents] * 2) if do_cfg else latents
        noise = pipe.decoder(sample=model_in, timestep=t, encoder_hidden_states=text_hidden,
                             class_labels=additive_time, attention_mask=decoder_mask).sample
        if do_cfg:
            uncond, cond = noise.chunk(2)
            uncond, _ = uncond.split(model_in.shape[1], dim=1)
            cond, variance = cond.split(model_in.shape[1], dim=1)
            noise = torch.cat([uncond + guidance_scale * (cond - uncond), variance], dim=1)
        prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
        latents = dec_sched.step(noise, t, latents, prev_timestep=prev, generator=generator).prev_sample
    small = latents.clamp(-1, 1)

    sr_sched = UnCLIPScheduler.from_config(pipe.super_res_scheduler.config)
    sr_sched.set_timesteps(super_res_steps, device=device)
    channels = pipe.super_res_first.config.in_channels // 2
    size = pipe.super_res_first.config.sample_size
    sr = pipe.prepare_latents((batch, channels, size, size), small.dtype, device, generator, None, sr_sched)
    aa = {"antialias": True} if "antialias" in inspect.signature(F.interpolate).parameters else {}
    upscaled = F.interpolate(small, size=[size, size], mode="bicubic", align_corners=False, **aa)
    sr_steps = sr_sched.timesteps
    for i, t in enumerate(sr_steps):
        unet = pipe.super_res_last if i == len(sr_steps) - 1 else pipe.super_res_first
        noise = unet(sample=torch.cat([sr, upscaled], dim=1), timestep=t).sample
        prev = None if i + 1 == len(sr_steps) else sr_steps[i + 1]
        sr = sr_sched.step(noise, t, sr, prev_timestep=prev, generator=generator).prev_sample
    image = (sr * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(image)


# -- the entry point ------------------------------------------------------------------------------


def negative_embeddings(decoder: Decoder, handle: PriorHandle, encoder, n: int, negative_prompt: str | None,
                        seed: int) -> torch.Tensor | None:
    if decoder.kind != "kandinsky22":
        if negative_prompt:
            raise ValueError("the Karlo decoder has no negative image embedding (its guidance uses a learned null "
                             "embedding); drop the negative prompt")
        return None
    if negative_prompt:
        return prompt_embeddings(handle, encoder, [negative_prompt] * n, seed)
    return zero_image_embedding(encoder).expand(n, -1)


def generate(
    prompt: str,
    prior_dir: str | os.PathLike,
    decoder: str = "kandinsky22",
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

    decoder_path: a local decoder folder (default: the hub id of `decoder`, from the HF cache);
    encoder: the prior's text encoder (default: the one recorded in its run folder);
    out: also save the image there (PNG, with prompt/prior/seed in its text chunks).
    steps/guidance_scale: decoder sampling (defaults: DECODER_DEFAULTS); height/width: Kandinsky only;
    super_res_steps: Karlo only.
    """
    if decoder in DECODERS:
        decoder_steps(decoder, steps, super_res_steps)  # fail fast on options, before any weights load
    dec = Decoder.load(decoder, decoder_path, device, local_files_only=local_files_only)  # fail fast on weights
    handle = open_prior(prior_dir, device)
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


def save_png(image: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    image.save(path, format="PNG", pnginfo=info)
    return path


def slug(text: str, max_len: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len] or "image"


def generate_main(
    prompt: str,
    prior: str,
    decoder: str = "kandinsky22",
    out: str | None = None,
    decoder_path: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    encoder: str | None = None,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    super_res_steps: int | None = None,
) -> int:
    """`eclipse-prior generate "PROMPT" --prior DIR --decoder kandinsky22|karlo [--out F]`."""
    out = out or f"{slug(prompt)}-seed{seed}.png"
    generate(prompt, prior, decoder, decoder_path, out, seed, steps, guidance_scale, negative_prompt, encoder,
             height, width, device=device, super_res_steps=super_res_steps)
    print(out)
    return 0


# -- image metrics (need weights on this machine) --------------------------------------------------

CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class ClipImageScorer:
    """CLIP image-text scores. `kind="clipscore"`: 100 * max(cos, 0) (Hessel et al. 2021, torchmetrics'
    scale); `kind="pickscore"`: logit_scale.exp() * cos with the PickScore model (Kirstain et al. 2023)."""

    def __init__(self, model, processor, kind: str, source: str, device: torch.device):
        self.model, self.processor, self.kind, self.source, self.device = model, processor, kind, source, device

    @classmethod
    def load(cls, kind: str, model: str | os.PathLike | None = None, processor: str | os.PathLike | None = None,
             device=None, local_files_only: bool = True) -> ClipImageScorer:
        """Loads from a local folder or the HF cache only (local_files_only) unless told otherwise."""
        from transformers import CLIPModel, CLIPProcessor

        if kind not in ("clipscore", "pickscore"):
            raise ValueError(f"unknown image scorer {kind!r}")
        default = CLIPSCORE_MODEL if kind == "clipscore" else PICKSCORE_MODEL
        ref = os.fspath(model) if model is not None else default
        what = "CLIPScore CLIP model" if kind == "clipscore" else "PickScore model"
        option = "--clip-model / clip_model=" if kind == "clipscore" else "--pickscore-model / pickscore_model="
        m = load_pretrained(CLIPModel, ref, what, default, local_files_only, option)
        proc_default = default if kind == "clipscore" else PICKSCORE_PROCESSOR
        if processor is not None:
            proc = load_pretrained(CLIPProcessor, processor, f"{what} processor", proc_default, local_files_only,
                                   option)
        else:
            try:  # a folder that holds model and processor together (as save_pretrained writes it)
                proc = load_pretrained(CLIPProcessor, ref, f"{what} processor", proc_default, local_files_only, option)
            except WeightsMissingError:
                if kind == "clipscore":
                    raise
                # PickScore_v1 uses the processor of the CLIP it was fine-tuned from
                proc = load_pretrained(CLIPProcessor, PICKSCORE_PROCESSOR, f"{what} processor", PICKSCORE_PROCESSOR,
                                       local_files_only, option)
        dev = torch.device(device) if device is not None else default_device()
        return cls(m.to(dev).eval(), proc, kind, ref, dev)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """One score per (image_i, prompt_i) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for s in range(0, len(images), batch_size):
            inputs = self.processor(text=list(prompts[s : s + batch_size]), images=list(images[s : s + batch_size]),
                                    return_tensors="pt", padding=True, truncation=True, max_length=77)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            # The joint forward returns L2-normalised text_embeds/image_embeds in every transformers version.
            res = self.model(**inputs)
            cos = (res.image_embeds * res.text_embeds).sum(-1).float()
            if self.kind == "clipscore":
                out.append((100.0 * cos.clamp_min(0)).cpu().numpy())
            else:
                out.append((self.model.logit_scale.exp() * cos).cpu().numpy())
        return np.concatenate(out)


def pickscore_preference(scores_a: np.ndarray, scores_b: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair preference for A over B: hard (1 / 0.5 tie / 0) and soft (softmax of the two scores,
    PickScore's own probability)."""
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    hard = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    soft = 1.0 / (1.0 + np.exp(b - a))
    return {"hard": hard, "soft": soft}


def fid_between(real: Sequence[Image.Image], fake: Sequence[Image.Image], device=None) -> float:
    """FID (Inception-v3 pool features) through an installed library: torchmetrics or clean-fid."""
    import importlib.util

    if importlib.util.find_spec("torchmetrics") is not None:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            fid = FrechetInceptionDistance(feature=2048, normalize=True)
        except (OSError, RuntimeError, ModuleNotFoundError) as e:  # weights download or torch-fidelity missing
            raise WeightsMissingError(
                f"missing weights: FID's Inception-v3 weights (torch-fidelity `pt_inception-2015-12-05`) could not "
                f"be loaded; install torchmetrics[image] and have the weights cached.\n  cause: {e}") from e
        dev = torch.device(device) if device is not None else torch.device("cpu")
        fid = fid.to(dev)

        def batch(images):
            arr = np.stack([np.asarray(im.convert("RGB").resize((299, 299)), dtype=np.float32) / 255 for im in images])
            return torch.from_numpy(arr).permute(0, 3, 1, 2).to(dev)

        fid.update(batch(real), real=True)
        fid.update(batch(fake), real=False)
        return float(fid.compute())
    if importlib.util.find_spec("cleanfid") is not None:
        import tempfile

        from cleanfid import fid as cfid

        with tempfile.TemporaryDirectory() as tmp:
            for name, images in (("real", real), ("fake", fake)):
                (Path(tmp) / name).mkdir()
                for i, im in enumerate(images):
                    im.convert("RGB").save(Path(tmp) / name / f"{i:06d}.png")
            try:
                return float(cfid.compute_fid(str(Path(tmp) / "real"), str(Path(tmp) / "fake"), mode="clean"))
            except (OSError, RuntimeError) as e:
                raise WeightsMissingError(f"missing weights: clean-fid's Inception weights are not cached and "
                                          f"could not be downloaded.\n  cause: {e}") from e
    raise ImageMetricUnavailable(
        "FID is unavailable: neither torchmetrics (with torch-fidelity) nor clean-fid is installed in this "
        "environment. Install one of them (`pip install torchmetrics[image]` or `pip install clean-fid`) where its "
        "Inception weights can be fetched once."
    )


def build_tiny_decoder(kind: str, path: str | os.PathLike, embedding_dim: int = 32, seed: int = 0) -> Path:
    """A tiny random decoder of the real pipeline classes, saved with save_pretrained (configs as in
    diffusers' own pipeline tests). Kandinsky: UNet (image_proj of D) + MoVQ, 64 px out; Karlo: text
    encoder + text_proj + decoder (32 px) + super-resolution UNets (64 px) + a small prior (Karlo's
    layout has one; Decoder.load never loads it)."""
    from diffusers import DDPMScheduler, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel, VQModel

    out = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "kandinsky22":
            from diffusers import KandinskyV22Pipeline

            unet = UNet2DConditionModel(
                in_channels=4, out_channels=8, addition_embed_type="image",
                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
                encoder_hid_dim=embedding_dim, encoder_hid_dim_type="image_proj", cross_attention_dim=32,
                attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None,
            )
            movq = VQModel(
                block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                vq_embed_dim=4,
            )
            scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                                      beta_end=0.012, clip_sample=False, steps_offset=1, prediction_type="epsilon")
            KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(out)
        elif kind == "karlo":
            from diffusers import PriorTransformer, UnCLIPPipeline
            from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection

            from pipeline.encoders import build_tiny_tokenizer

            tok = build_tiny_tokenizer()
            text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=len(tok), hidden_size=embedding_dim, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=embedding_dim,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ))
            prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=embedding_dim,
                                     num_layers=1)
            text_proj = UnCLIPTextProjModel(clip_embeddings_dim=embedding_dim, time_embed_dim=128,
                                            cross_attention_dim=100)
            decoder = UNet2DConditionModel(
                sample_size=32, in_channels=3, out_channels=6,
                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
                cross_attention_dim=100, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
                class_embed_type="identity",
            )
            sr = dict(sample_size=64, layers_per_block=1, block_out_channels=(32, 64), in_channels=6, out_channels=3,
                      down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
                      up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"))
            super_res_first = UNet2DModel(**sr)
            super_res_last = UNet2DModel(**sr)
            UnCLIPPipeline(
                prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tok, text_proj=text_proj,
                super_res_first=super_res_first, super_res_last=super_res_last,
                prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                                num_train_timesteps=1000, clip_sample_range=5.0),
                decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                                                  num_train_timesteps=1000),
                super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                                    num_train_timesteps=1000),
            ).save_pretrained(out)
        else:
            raise ValueError(f"unknown decoder {kind!r}; choose one of {sorted(DECODERS)}")
    return out


def save_tiny_clip_scorer(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random CLIPModel + processor folder: stands in for CLIPScore/PickScore weights in tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipeline.encoders import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    out = Path(path)
    model.save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(out)
    return out


def generate_cli(args) -> int:
    """generate_main(...) from an argparse Namespace built with add_generate_arguments; other attributes of
    the namespace (e.g. the CLI's `command`/`func`) are ignored, so `set_defaults(func=generate_cli)` wires it."""
    import inspect

    names = inspect.signature(generate_main).parameters
    return generate_main(**{k: v for k, v in vars(args).items() if k in names})
