"""unCLIP decoders: image embeddings [B, D] -> images.

    Decoder.load("kandinsky22", "weights/kandinsky-2-2-decoder").decode(embeds, prompts, negative) -> [PIL.Image]

- `kandinsky22`: diffusers' KandinskyV22Pipeline (UNet + MoVQ) fed `image_embeds` from our prior
  and `negative_image_embeds` = the CLIP image embedding of an all-zero image, as ECLIPSE's
  Kandinsky pipeline does (or our prior's embedding of a negative prompt). The paper's decoder
  setting is 50 DDIM steps, guidance 7.5.
- `karlo`: the Karlo v1 alpha decoder (UnCLIPPipeline's text_proj + decoder UNet + two
  super-resolution UNets). UnCLIPPipeline has no image-embedding input (it always runs its own
  1B-parameter prior), so `_karlo_decode` runs its decoder and super-resolution stages with our
  embedding, exactly as ECLIPSE's Karlo pipeline does: the decoder still sees the prompt through
  Karlo's own text encoder. The Karlo prior is never loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from PIL import Image

from evaluation.priors import PriorHandle, prompt_embeddings
from evaluation.weights import default_device, dtype_kw, load_pretrained
from pipeline.families import FAMILIES

# The decoders are the families' (pipeline.families: hub repo, title, sampling defaults, which pipeline).
DecoderKind = Literal[tuple(FAMILIES)]
DECODERS: tuple[str, ...] = get_args(DecoderKind)
DECODER_HUB_IDS: dict[str, str] = {name: f.decoder_repo for name, f in FAMILIES.items()}
DECODER_TITLES = {name: f.title for name, f in FAMILIES.items()}
DECODER_DEFAULTS: dict[str, dict] = {name: f.sampling for name, f in FAMILIES.items()}


class Decoder:
    """An unCLIP decoder that turns image embeddings [B, D] into images."""

    def __init__(self, kind: DecoderKind, pipe, source: str):
        self.kind, self.pipe, self.source = kind, pipe, source

    @classmethod
    def load(cls, kind: DecoderKind, path: str | os.PathLike | None = None, device=None,
             dtype: torch.dtype | None = None, local_files_only: bool = False) -> Decoder:
        """The decoder's weights from `path` (default: its hub id, from the Hugging Face cache; only from the cache
        when the hub is offline, an offline switch or no answer: no waiting on a hub that cannot answer)."""
        if kind not in DECODERS:
            raise ValueError(f"unknown decoder {kind!r}; choose one of {list(DECODERS)}")
        if path is None and not local_files_only:
            from pipeline.hub import offline_reason

            local_files_only = offline_reason() is not None
        ref = os.fspath(path) if path is not None else DECODER_HUB_IDS[kind]
        dev = torch.device(device) if device is not None else default_device()
        dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        if FAMILIES[kind].pipeline == "kandinsky":
            from diffusers import DDIMScheduler, KandinskyV22Pipeline

            # low_cpu_mem_usage=False: the fast path needs `accelerate`, which this project does not install
            pipe = load_pretrained(KandinskyV22Pipeline, ref, DECODER_TITLES[kind], DECODER_HUB_IDS[kind],
                                   local_files_only, low_cpu_mem_usage=False, **dtype_kw(dt))
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the paper's DDIM decoder sampling
        else:
            pipe = _load_karlo(kind, ref, dt, local_files_only)
        pipe.set_progress_bar_config(disable=True)
        return cls(kind, pipe.to(dev), ref)

    @property
    def embedding_dim(self) -> int:
        if FAMILIES[self.kind].pipeline == "kandinsky":
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
        if FAMILIES[self.kind].pipeline == "kandinsky":
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
    if FAMILIES[kind].pipeline == "kandinsky":
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


def _load_karlo(kind: str, ref: str, dtype: torch.dtype, local_files_only: bool):
    """Karlo's UnCLIPPipeline from its parts, without its prior.

    Built by hand: its model_index.json names text_proj's library "unclip" (Karlo's repo) or
    "diffusers" (save_pretrained), and diffusers 0.42 resolves neither since the pipeline moved to
    pipelines/deprecated. Karlo's own 1B-parameter prior is replaced by ours, so it is never loaded.
    """
    from diffusers import UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    what, default = DECODER_TITLES[kind], DECODER_HUB_IDS[kind]

    def part(cls, sub: str, **kw):
        return load_pretrained(cls, ref, f"{what} ({sub})", default, local_files_only, subfolder=sub, **kw)

    # low_cpu_mem_usage=False: the fast path needs `accelerate`, which this project does not install
    models = {name: part(cls, name, low_cpu_mem_usage=False, **dtype_kw(dtype)) for name, cls in (
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


@torch.no_grad()
def zero_image_embedding(encoder) -> torch.Tensor:
    """CLIP image embedding [1, D] of an all-zero pixel tensor: ECLIPSE's Kandinsky negative."""
    h, w = encoder.image_size
    return encoder.encode_images(torch.zeros(1, 3, h, w)).float().cpu()


def negative_embeddings(decoder: Decoder, handle: PriorHandle, encoder, n: int, negative_prompt: str | None,
                        seed: int) -> torch.Tensor | None:
    """Kandinsky's guidance negative [n, D]: our prior's embedding of `negative_prompt`, else the zero image's
    CLIP embedding. Karlo has none (None)."""
    if FAMILIES[decoder.kind].pipeline != "kandinsky":
        if negative_prompt:
            raise ValueError("the Karlo decoder has no negative image embedding (its guidance uses a learned null "
                             "embedding); drop the negative prompt")
        return None
    if negative_prompt:
        return prompt_embeddings(handle, encoder, [negative_prompt] * n, seed)
    return zero_image_embedding(encoder).expand(n, -1)
