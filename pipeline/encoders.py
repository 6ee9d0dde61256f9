"""CLIP encoder backends and presets: the decoder's own encoders, loaded once per worker.

What the prior consumes (ARCHITECTURE.md, the store contract): raw projected `image_embeds`
of the vision tower, raw projected `text_embeds` (EOS token) of the text tower, and the text
tower's `last_hidden_state` after its final LayerNorm, real tokens only (BOS..EOS). Nothing
here L2-normalises or standardises: the store keeps what the decoder's prior sees.

Names accepted by `load_encoder` / `get_encoder`:
  - `kandinsky22`  ViT-bigG/14 vision tower of the Kandinsky 2.2 prior + LAION bigG text tower (D=1280)
  - `karlo`        OpenAI CLIP ViT-L/14 vision tower + Karlo's own text tower and tokenizer (D=768)
  - `tiny-clip`    seeded random CLIP of the same transformers classes, built from a config (tests, demos)
  - `open_clip:<model>[/<pretrained tag>]`, e.g. `open_clip:ViT-B-32/laion2b_s34b_b79k`; `<model>` may
    also be `hf-hub:org/repo` or `local-dir:/path` (open_clip's own schemas); no tag = random init
  - a local folder: our layout written by `save_encoder` (or the Kandinsky prior repo's layout:
    `image_encoder/ image_processor/ text_encoder/ tokenizer/`), a flat transformers CLIPModel
    folder (e.g. a snapshot of `openai/clip-vit-large-patch14`), or an open_clip folder
    (`open_clip_config.json` + weights).

Where the transformers parts of a preset or folder live and how one is loaded: `pipeline.hf_parts`;
the tiny-clip tokenizer's BPE vocabulary: `pipeline.bpe`.
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.bpe import build_bpe_tokenizer
from pipeline.errors import EncoderLoadError
from pipeline.families import IMAGE_ENCODER, IMAGE_PROCESSOR, TEXT_ENCODER, TOKENIZER, HFLayout, Part
from pipeline.hf_parts import (
    HUB_PRESETS,
    hub_commit,
    load_part,
    tower_kwargs,
)
from storage_schema.atomic import atomic_path
from storage_schema.schema import EncoderInfo

ENCODER_JSON = "encoder.json"  # names the backend + the EncoderInfo of a saved encoder folder
FOLDER_FORMAT = 1
OPEN_CLIP_PREFIX = "open_clip:"


# ----------------------------------------------------------------------------------------------
# Outputs


@dataclass
class TextOutput:
    """What `encode_texts` returns for a batch of B captions.

    text_embeds: [B, D] raw projected EOS embedding (encoder device and dtype).
    hidden: B arrays [n_tokens_i, H] on the CPU: last_hidden_state after the final LayerNorm,
        real tokens only (BOS..EOS). float16 for fp16 models, float32 otherwise (numpy has no bf16).
    truncated: whether the caption had more tokens than the context length.
    """

    text_embeds: torch.Tensor
    hidden: list[np.ndarray]
    truncated: list[bool]

    @property
    def lengths(self) -> list[int]:
        return [int(h.shape[0]) for h in self.hidden]


# ----------------------------------------------------------------------------------------------
# Device and dtype

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device_dtype(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """cuda if present, else cpu; fp16 on GPU, fp32 on CPU (CPU half-precision matmuls are slow)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None:
        # Pin the index so cache keys and `.to()` agree across `cuda` / `cuda:0` spellings.
        dev = torch.device("cuda", torch.cuda.current_device())
    if dtype is None:
        # fp16 rather than bf16: the store is fp16, and fp16 keeps 3 more mantissa bits than bf16.
        dt = torch.float16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        key = str(dtype).lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}")
        dt = _DTYPE_NAMES[key]
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"encoders run in float32, float16 or bfloat16, not {dt}")
    return dev, dt


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


# ----------------------------------------------------------------------------------------------
# The encoder interface


class ClipEncoder(ABC):
    """One CLIP image + text encoder pair on one device, in inference mode."""

    backend: str
    info: EncoderInfo
    device: torch.device
    dtype: torch.dtype

    @property
    def context_length(self) -> int:
        return self.info.context_length

    @property
    @abstractmethod
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the pixel tensors `preprocess` returns."""

    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> float32 CPU tensor [B, 3, H, W] with the encoder's own preprocessing."""

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> raw projected image_embeds [B, D] (device, dtype of the encoder)."""

    @abstractmethod
    def encode_texts(self, captions: Sequence[str]) -> TextOutput:
        """Captions -> text_embeds, real-token hidden states, truncation flags."""

    @abstractmethod
    def _save_weights(self, path: Path) -> str:
        """Write the model files into `path`; return the backend name for encoder.json."""


def _check_nonempty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"{what}: empty batch")


# ----------------------------------------------------------------------------------------------
# transformers backend


class HFClipEncoder(ClipEncoder):
    """CLIPVisionModelWithProjection + CLIPTextModelWithProjection + CLIPTokenizer + CLIPImageProcessor."""

    backend = "transformers"

    def __init__(self, vision: Any, text: Any, tokenizer: Any, image_processor: Any, info: EncoderInfo,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.vision = vision.to(device=device, dtype=dtype).eval()
        self.text = text.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        # A fast tokenizer mutates its truncation state per call; tasks sharing this cached encoder
        # on several worker threads would otherwise hit "RuntimeError: Already borrowed".
        self._tokenizer_lock = threading.Lock()
        self.image_processor = image_processor
        self.device, self.dtype = device, dtype
        self.info = info

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.vision.config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        _check_nonempty(len(images), "preprocess")
        out = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return out.float()

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _check_nonempty(len(pixel_values), "encode_images")
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return self.vision(pixel_values=pixel_values).image_embeds

    @torch.inference_mode()
    def encode_texts(self, captions: Sequence[str]) -> TextOutput:
        captions = list(captions)
        _check_nonempty(len(captions), "encode_texts")
        ctx = self.context_length
        # Tokenize once untruncated to learn who overflows; only those go through the tokenizer's
        # own truncation again (keeps BOS + first tokens + EOS exactly as the tokenizer does it).
        with self._tokenizer_lock:
            ids = self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]
            truncated = [len(x) > ctx for x in ids]
            long_idx = [i for i, t in enumerate(truncated) if t]
            if long_idx:
                cut = self.tokenizer([captions[i] for i in long_idx], truncation=True, max_length=ctx)["input_ids"]
                for i, x in zip(long_idx, cut, strict=True):
                    ids[i] = x
            # Pad to the longest caption, not to 77: the text tower is causal, so real tokens do not
            # see padding, and shorter sequences are cheaper. No attention_mask is passed for the same
            # reason: the pure causal mask keeps SDPA on its fast `is_causal` path.
            batch = self.tokenizer.pad({"input_ids": ids}, padding="longest", return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        out = self.text(input_ids=input_ids)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        hidden_cpu = _to_numpy(out.last_hidden_state)
        hidden = [hidden_cpu[i, :n].copy() for i, n in enumerate(lengths)]
        return TextOutput(text_embeds=out.text_embeds, hidden=hidden, truncated=truncated)

    def _save_weights(self, path: Path) -> str:
        self.vision.save_pretrained(path / IMAGE_ENCODER)
        self.text.save_pretrained(path / TEXT_ENCODER)
        self.tokenizer.save_pretrained(path / TOKENIZER)
        self.image_processor.save_pretrained(path / IMAGE_PROCESSOR)
        return self.backend


TINY_PRESET = "tiny-clip"
ENCODER_PRESETS: tuple[str, ...] = (*HUB_PRESETS, TINY_PRESET)


def _load_hf(layout: HFLayout, preset: str, device: torch.device, dtype: torch.dtype,
             saved_info: EncoderInfo | None = None) -> HFClipEncoder:
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    # Load straight into the target dtype: a bigG tower in fp32 would need 2x the host memory.
    vision = load_part(CLIPVisionModelWithProjection, layout.image_encoder, "image encoder", dtype=dtype,
                        **tower_kwargs(layout.image_encoder, "image encoder"))
    text = load_part(CLIPTextModelWithProjection, layout.text_encoder, "text encoder", dtype=dtype,
                      **tower_kwargs(layout.text_encoder, "text encoder"))
    tokenizer = load_part(CLIPTokenizer, layout.tokenizer, "tokenizer")
    processor = load_part(CLIPImageProcessor, layout.image_processor, "image processor")
    info = EncoderInfo(
        preset=preset,
        image_model=layout.image_encoder.label,
        text_model=layout.text_encoder.label,
        image_dim=int(vision.config.projection_dim),
        text_dim=int(text.config.projection_dim),
        hidden_dim=int(text.config.hidden_size),
        tokenizer=layout.tokenizer.label,
        context_length=_hf_context_length(text, tokenizer),
        image_revision=hub_commit(layout.image_encoder),
        text_revision=hub_commit(layout.text_encoder),
    )
    return HFClipEncoder(vision, text, tokenizer, processor, _reconcile(info, saved_info), device, dtype)


def _hf_context_length(text: Any, tokenizer: Any) -> int:
    ctx = int(text.config.max_position_embeddings)
    tok_max = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (1e30); the position table is the real bound.
    if isinstance(tok_max, int) and 0 < tok_max < ctx:
        ctx = tok_max
    return ctx


def _reconcile(info: EncoderInfo, saved: EncoderInfo | None) -> EncoderInfo:
    """A saved folder keeps the identity it was saved with (so a snapshot of a preset writes
    store shards compatible with the preset itself), but its dims must match the weights."""
    if saved is None:
        return info
    for name in ("image_dim", "text_dim", "hidden_dim", "context_length"):
        if getattr(saved, name) != getattr(info, name):
            raise EncoderLoadError(
                f"{ENCODER_JSON} says {name}={getattr(saved, name)} but the weights give {getattr(info, name)}"
            )
    return saved


# ----------------------------------------------------------------------------------------------
# tiny-clip: a seeded random CLIP built from a config (no download, no shipped weights)

TINY_SEED = 0
TINY_REVISION = f"tiny-v2-seed{TINY_SEED}"  # bump when the generator below changes (v2: one token a word)
TINY_IMAGE_SIZE = 32
TINY_CONTEXT = 77
# Common caption words: each is one token of the tiny vocab, so captions tokenize into few tokens;
# anything else falls back to single bytes, so every UTF-8 string is encodable.
_TINY_WORDS = (
    "a an the of and in on with at to from by for is are photo picture image painting drawing portrait "
    "illustration render view close up man woman person people child dog cat bird horse car tree house city "
    "street beach sea water sky mountain flower food table room red blue green yellow black white small large "
    "big old young two three standing sitting front background style art digital"
).split()


def build_tiny_tokenizer() -> Any:
    return build_bpe_tokenizer(_TINY_WORDS, TINY_CONTEXT)


def build_tiny_clip(seed: int = TINY_SEED) -> tuple[Any, Any, Any, Any]:
    """(vision, text, tokenizer, image_processor) with tiny widths; weights depend only on `seed`."""
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tokenizer = build_tiny_tokenizer()
    # H == D (32), as in the kandinsky22 and karlo presets: the released ECLIPSE prior layout
    # projects the text hidden states with a (512, D) layer, so a prior can only train on H == D.
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TINY_CONTEXT, projection_dim=32, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision_cfg = CLIPVisionConfig(
        image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=32, hidden_act="gelu",
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = CLIPVisionModelWithProjection(vision_cfg)
        text = CLIPTextModelWithProjection(text_cfg)
    processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    return vision.eval(), text.eval(), tokenizer, processor


def _load_tiny(device: torch.device, dtype: torch.dtype) -> HFClipEncoder:
    vision, text, tokenizer, processor = build_tiny_clip()
    info = EncoderInfo(
        preset=TINY_PRESET,
        image_model=f"{TINY_PRESET}/{IMAGE_ENCODER}",
        text_model=f"{TINY_PRESET}/{TEXT_ENCODER}",
        image_dim=int(vision.config.projection_dim),
        text_dim=int(text.config.projection_dim),
        hidden_dim=int(text.config.hidden_size),
        tokenizer=f"{TINY_PRESET}/{TOKENIZER}",
        context_length=TINY_CONTEXT,
        image_revision=TINY_REVISION,
        text_revision=TINY_REVISION,
    )
    return HFClipEncoder(vision, text, tokenizer, processor, info, device, dtype)


# ----------------------------------------------------------------------------------------------
# open_clip backend

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


class OpenClipEncoder(ClipEncoder):
    """An open_clip model with its own val transform and tokenizer."""

    backend = "open_clip"

    def __init__(self, model: Any, transform: Any, tokenizer: Any, model_cfg: dict | None, info: EncoderInfo,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.transform = transform
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.device, self.dtype = device, dtype
        self.info = info
        self._pool_type, self._eos_id = _open_clip_text_pooling(model)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        _check_nonempty(len(images), "preprocess")
        return torch.stack([self.transform(im) for im in images]).float()

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _check_nonempty(len(pixel_values), "encode_images")
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return self.model.encode_image(pixel_values, normalize=False)

    def _eos_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        # Exactly the position open_clip pools text_embeds from (text_global_pool).
        if self._pool_type == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self._eos_id).int().argmax(dim=-1)

    @torch.inference_mode()
    def encode_texts(self, captions: Sequence[str]) -> TextOutput:
        captions = list(captions)
        _check_nonempty(len(captions), "encode_texts")
        ctx = self.context_length
        # open_clip's text tower has a fixed 77-position table: tokens are always padded to ctx.
        tokens = self.tokenizer(captions, context_length=ctx)
        # One position more than fits tells overflow apart from an exact fit (tokenizer's own rules).
        longer = self.tokenizer(captions, context_length=ctx + 1)
        truncated = (self._eos_positions(longer) + 1 > ctx).tolist()
        lengths = (self._eos_positions(tokens) + 1).tolist()
        tokens = tokens.to(self.device, non_blocking=True)
        # forward_intermediates is open_clip's own API for per-token outputs: the last block's
        # output with ln_final applied is the pre-projection last_hidden_state.
        out = self.model.forward_intermediates(
            text=tokens, text_indices=1, normalize_intermediates=True, normalize=False
        )
        hidden_cpu = _to_numpy(out["text_intermediates"][-1])
        hidden = [hidden_cpu[i, :n].copy() for i, n in enumerate(lengths)]
        return TextOutput(text_embeds=out["text_features"], hidden=hidden, truncated=truncated)

    def _save_weights(self, path: Path) -> str:
        from safetensors.torch import save_file

        if self.model_cfg is None:
            raise NotImplementedError("this open_clip model has no known model config to save")
        preprocess_cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        (path / OPEN_CLIP_CONFIG).write_text(
            json.dumps({"model_cfg": self.model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
        )
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / OPEN_CLIP_WEIGHTS))
        hf_tok = getattr(self.tokenizer, "tokenizer", None)
        if hf_tok is not None and hasattr(hf_tok, "save_pretrained"):
            hf_tok.save_pretrained(path)  # open_clip's local-dir: reads an HF tokenizer from the same folder
        return self.backend


def _open_clip_text_pooling(model: Any) -> tuple[str, int | None]:
    """Refuse text towers whose real-token states would depend on padding or are not pooled at EOS."""
    if hasattr(model, "text_pool_type"):  # open_clip.CLIP inlines its text tower
        tower, pool, eos = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    else:  # CustomTextCLIP keeps it in .text
        tower = model.text
        pool, eos = getattr(tower, "pool_type", None), getattr(tower, "eos_id", None)
    causal = getattr(tower, "attn_mask", None)
    if causal is None or getattr(tower, "cls_emb", None) is not None:
        raise EncoderLoadError("open_clip text tower is not a causal CLIP text transformer; unsupported")
    if pool not in ("argmax", "eos") or (pool == "eos" and eos is None):
        raise EncoderLoadError(f"open_clip text pool type {pool!r} is not EOS pooling; unsupported")
    return pool, eos


def _split_open_clip_name(spec: str) -> tuple[str, str | None]:
    """`ViT-B-32/laion2b_s34b_b79k` -> (`ViT-B-32`, tag); schema'd names carry their own weights."""
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    model, _, tag = spec.partition("/")
    return model, tag or None


def _open_clip_model_cfg(model_name: str) -> dict | None:
    import open_clip

    if model_name.startswith("local-dir:"):
        return json.loads((Path(model_name.removeprefix("local-dir:")) / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    if model_name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        # Already in the cache: create_model just fetched it.
        cfg_path = hf_hub_download(model_name.removeprefix("hf-hub:"), OPEN_CLIP_CONFIG)
        return json.loads(Path(cfg_path).read_text())["model_cfg"]
    return open_clip.get_model_config(model_name)


def _load_open_clip(spec: str, device: torch.device, dtype: torch.dtype,
                    saved_info: EncoderInfo | None = None) -> OpenClipEncoder:
    import open_clip

    model_name, tag = _split_open_clip_name(spec)
    try:
        # fp32 on the CPU first, then one cast: open_clip's own low-precision modes keep some
        # layers in fp32, and the store's precision contract is "the whole tower in `dtype`".
        model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=tag, precision="fp32")
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError, ValueError) as e:
        raise EncoderLoadError(
            f"could not load open_clip model {spec!r} (unknown model/tag, or weights not cached and no internet; "
            f"open_clip.list_pretrained() lists the tags).\n  cause: {e}"
        ) from e
    model_cfg = _open_clip_model_cfg(model_name)
    tower = getattr(model, "text", model)
    proj = getattr(tower, "text_projection", None)
    text_dim = proj.out_features if isinstance(proj, torch.nn.Linear) else int(proj.shape[-1])
    label = OPEN_CLIP_PREFIX + spec
    info = EncoderInfo(
        preset=label,
        image_model=label,
        text_model=label,
        image_dim=int(model.visual.output_dim),
        text_dim=int(text_dim),
        hidden_dim=int(tower.ln_final.normalized_shape[0]),
        tokenizer=f"{OPEN_CLIP_PREFIX}{model_name}:{type(tokenizer).__name__}",
        context_length=int(tokenizer.context_length),
    )
    return OpenClipEncoder(model, transform, tokenizer, model_cfg, _reconcile(info, saved_info), device, dtype)


# ----------------------------------------------------------------------------------------------
# Folders


def _not_an_encoder_folder(path: Path) -> EncoderLoadError:
    return EncoderLoadError(
        f"{path} is not an encoder folder: expected {ENCODER_JSON}, {IMAGE_ENCODER}/ + {TEXT_ENCODER}/ "
        f"subfolders, a CLIPModel config.json, or {OPEN_CLIP_CONFIG}"
    )


def _load_folder(path: Path, device: torch.device, dtype: torch.dtype) -> ClipEncoder:
    saved: EncoderInfo | None = None
    backend: str | None = None
    if (path / ENCODER_JSON).is_file():
        meta = json.loads((path / ENCODER_JSON).read_text())
        if meta.get("format") != FOLDER_FORMAT:
            raise EncoderLoadError(f"{path / ENCODER_JSON}: unsupported format {meta.get('format')!r}")
        backend = meta["backend"]
        saved = EncoderInfo.from_dict(meta["info"])
    if backend == OpenClipEncoder.backend or (backend is None and (path / OPEN_CLIP_CONFIG).is_file()):
        return _load_open_clip(f"local-dir:{path}", device, dtype, saved_info=saved)
    folder = str(path)
    if (path / IMAGE_ENCODER).is_dir() and (path / TEXT_ENCODER).is_dir():
        # Our layout == the Kandinsky 2.2 prior repo's layout (diffusers subfolders).
        layout = HFLayout(
            image_encoder=Part(folder, IMAGE_ENCODER),
            image_processor=Part(folder, IMAGE_PROCESSOR),
            text_encoder=Part(folder, TEXT_ENCODER),
            tokenizer=Part(folder, TOKENIZER),
        )
    elif (path / "config.json").is_file():
        # A flat transformers CLIPModel snapshot (e.g. openai/clip-vit-large-patch14): both towers
        # load from the joint checkpoint.
        layout = HFLayout(*(Part(folder),) * 4)
    else:
        raise _not_an_encoder_folder(path)
    return _load_hf(layout, preset=folder, device=device, dtype=dtype, saved_info=saved)


def save_encoder(encoder: ClipEncoder, path: str | os.PathLike) -> Path:
    """Write `encoder` as a folder that `load_encoder(path)` reads back with the same EncoderInfo.

    Written to a temporary sibling and renamed at the end, so a killed save never leaves a
    folder that looks complete.
    """
    dest = Path(path).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not an empty folder")
    with atomic_path(dest, directory=True) as tmp:
        backend = encoder._save_weights(tmp)
        meta = {"format": FOLDER_FORMAT, "backend": backend, "info": encoder.info.to_dict()}
        (tmp / ENCODER_JSON).write_text(json.dumps(meta, indent=2))  # written last: marks completion
    return dest


# ----------------------------------------------------------------------------------------------
# Entry points


def load_encoder(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ClipEncoder:
    """Load a preset, an `open_clip:` model or a local folder (see the module docstring)."""
    dev, dt = resolve_device_dtype(device, dtype)
    name = os.fspath(name_or_path)
    if name == TINY_PRESET:
        return _load_tiny(dev, dt)
    if name in HUB_PRESETS:
        return _load_hf(HUB_PRESETS[name], preset=name, device=dev, dtype=dt)
    if name.startswith(OPEN_CLIP_PREFIX):
        return _load_open_clip(name.removeprefix(OPEN_CLIP_PREFIX), dev, dt)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path.absolute(), dev, dt)
    raise _unknown(name)


def _unknown(name: str) -> EncoderLoadError:
    return EncoderLoadError(
        f"unknown encoder {name!r}: not a preset and not a folder. Presets: {', '.join(ENCODER_PRESETS)}; "
        f"or `{OPEN_CLIP_PREFIX}<model>` or `{OPEN_CLIP_PREFIX}<model>/<pretrained tag>`, or a local encoder folder."
    )


def _folder_label(path: Path) -> str:
    """The preset a folder's encoder records, read from its files (the checks of `_load_folder`)."""
    if (path / ENCODER_JSON).is_file():
        try:
            return str(json.loads((path / ENCODER_JSON).read_text())["info"]["preset"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EncoderLoadError(f"{path / ENCODER_JSON}: not an encoder description ({e!r})") from e
    if (path / OPEN_CLIP_CONFIG).is_file():
        return f"{OPEN_CLIP_PREFIX}local-dir:{path}"
    if ((path / IMAGE_ENCODER).is_dir() and (path / TEXT_ENCODER).is_dir()) or (path / "config.json").is_file():
        return str(path)
    raise _not_an_encoder_folder(path)


def _check_open_clip_name(spec: str) -> None:
    import open_clip

    model, tag = _split_open_clip_name(spec)
    if model.startswith("local-dir:"):
        if not Path(model.removeprefix("local-dir:")).is_dir():
            raise EncoderLoadError(f"open_clip folder {model.removeprefix('local-dir:')!r} does not exist")
        return
    if model.startswith("hf-hub:"):
        return  # the hub answers when the weights are fetched; nothing to check offline
    if model not in open_clip.list_models():
        raise EncoderLoadError(f"unknown open_clip model {model!r}; open_clip.list_models() lists them")
    if tag is not None and tag not in open_clip.list_pretrained_tags_by_model(model):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise EncoderLoadError(f"open_clip model {model!r} has no pretrained tag {tag!r}; its tags: {tags}")


def check_encoder(name_or_path: str | os.PathLike) -> str:
    """Check an encoder name without loading its weights, before any download or encode work starts.

    Returns the `EncoderInfo.preset` its store shards will carry. Unknown names, open_clip models
    or tags, and folders that hold no encoder fail here; for a hub preset the towers' configs are
    read (from the cache, or fetched: a few KB), so missing files and no internet fail here too.
    """
    name = os.fspath(name_or_path)
    if name == TINY_PRESET:
        return name
    if name in HUB_PRESETS:
        layout = HUB_PRESETS[name]
        for part, what in ((layout.image_encoder, "image encoder"), (layout.text_encoder, "text encoder")):
            tower_kwargs(part, what)
        return name
    if name.startswith(OPEN_CLIP_PREFIX):
        _check_open_clip_name(name.removeprefix(OPEN_CLIP_PREFIX))
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder_label(path.absolute())
    raise _unknown(name)


# The only global state of this module: one cache per worker process, so a Dask worker loads
# its encoder once and every task on it reuses the weights.
_CACHE: dict[tuple[str, str, str], ClipEncoder] = {}
_CACHE_LOCK = threading.Lock()


def get_encoder(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ClipEncoder:
    """`load_encoder`, memoised per process on (name or absolute folder, device, dtype)."""
    dev, dt = resolve_device_dtype(device, dtype)
    name = os.fspath(name_or_path)
    if name not in ENCODER_PRESETS and not name.startswith(OPEN_CLIP_PREFIX):
        name = str(Path(name).expanduser().absolute())
    key = (name, str(dev), str(dt))
    with _CACHE_LOCK:  # held while loading: two threads of one worker must not load twice
        if key not in _CACHE:
            _CACHE[key] = load_encoder(name, dev, dt)
        return _CACHE[key]


def clear_encoder_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
