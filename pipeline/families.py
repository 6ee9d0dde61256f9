"""The unCLIP decoder families a prior is trained for, as data: one record each, one registry.

A family is what a user names (`--encoder kandinsky22`, `--decoder karlo`, a deployment, a grid row):
the decoder's own CLIP encoder (where each part lives on the hub), the embedding width D its prior
predicts, the towers' shapes the cost model counts, the decoder's hub repo, which diffusers pipeline
decodes it and with what sampling defaults, and the datasets the paper and the deployments pair it with.
Every layer reads `FAMILIES`: `pipeline.hf_parts` (encoder presets), `training.prior` (the released prior
presets), `training.cost` / `training.plan`, `evaluation.decoders`, `flows.params`, the CLI's choices.

A new family is one `DecoderFamily` passed to `register_family` before those modules are imported (they
derive their tables, typed parameters and CLI choices at import), e.g. at the top of a launcher script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

IMAGE_ENCODER, IMAGE_PROCESSOR = "image_encoder", "image_processor"
TEXT_ENCODER, TOKENIZER = "text_encoder", "tokenizer"


@dataclass(frozen=True)
class Part:
    """Where one component lives: a hub repo id or a local folder, plus an optional subfolder."""

    repo: str
    subfolder: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        return f"{self.repo}/{self.subfolder}" if self.subfolder else self.repo

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.subfolder:
            kw["subfolder"] = self.subfolder
        if self.revision:
            kw["revision"] = self.revision
        return kw


@dataclass(frozen=True)
class HFLayout:
    image_encoder: Part
    image_processor: Part
    text_encoder: Part
    tokenizer: Part


# The released ECLIPSE priors' shape (16 heads x 32 dims, 10 layers); D is the family's.
RELEASED_PRIOR = dict(num_attention_heads=16, attention_head_dim=32, num_layers=10)

#: Which decoding code in `evaluation.decoders` a family's decoder runs through.
DecoderPipeline = Literal["kandinsky", "unclip"]


@dataclass(frozen=True)
class DecoderFamily:
    name: str  # the encoder preset, prior preset and decoder name at once
    title: str  # the decoder in words
    tower: str  # the image tower in words (plan tables)
    encoder: HFLayout  # where the decoder's own CLIP parts live (revisions: main; the commit is recorded)
    embedding_dim: int  # D of the image embeddings the decoder takes
    vision_tower: dict  # CLIPVisionConfig kwargs of the image tower (the cost model's FLOPs)
    text_tower: dict  # CLIPTextConfig kwargs of the text tower
    decoder_repo: str  # the decoder's hub repo
    pipeline: DecoderPipeline
    sampling: dict  # decoder sampling defaults (steps, guidance_scale, ...)
    paper_datasets: tuple[str, ...] = ()  # the paper's grid pairs it with these (training.plan)
    deploy_datasets: tuple[str, ...] = ()  # precompute deployments (flows.params); the first feeds train/retrain
    prior: dict = field(default_factory=lambda: dict(RELEASED_PRIOR))  # the prior preset, D aside


_KANDINSKY_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
_LAION_BIGG = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
_KARLO = "kakaobrain/karlo-v1-alpha"
_OPENAI_L14 = "openai/clip-vit-large-patch14"

# Each encoder part comes from where the decoder's official pipelines take it.
#  - kandinsky22: the image tower + processor of the Kandinsky 2.2 prior repo; the text tower +
#    tokenizer of LAION's bigG repo, which ECLIPSE's own inference code loads for its Kandinsky prior.
#  - karlo: the text tower + tokenizer from Karlo's own `text_encoder/` and `tokenizer/` (what
#    diffusers' UnCLIPPipeline reads; diffusers converted them from openai/clip-vit-large-patch14,
#    the tokenizer with pad token "!"); the image tower + processor of openai/clip-vit-large-patch14,
#    which Karlo's image-variation pipeline (karlo-v1-alpha-image-variations) was built with.
# Tower shapes: the repos' config.json (224 px, patch 14, context 77).
# Sampling: the paper's "50 DDIM steps and 7.5 classifier-free guidance" for Kandinsky 2.2. Karlo's decoder
# predicts a learned variance for its own UnCLIPScheduler, which has no DDIM variant; it keeps diffusers'/
# ECLIPSE's Karlo defaults of 25 decoder and 7 super-resolution steps.
# Datasets: the paper's grid (ECLIPSE, CVPR 2024, Sec. 4.1): Karlo on MSCOCO, CC3M and CC12M, Kandinsky v2.2
# on MSCOCO and LAION-HighRes.
FAMILIES: dict[str, DecoderFamily] = {}


def register_family(family: DecoderFamily) -> DecoderFamily:
    """Add a family to the registry (before the modules that derive from it are imported)."""
    if family.name in FAMILIES:
        raise ValueError(f"decoder family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


register_family(DecoderFamily(
    name="kandinsky22",
    title="Kandinsky 2.2 decoder",
    tower="ViT-bigG/14",
    encoder=HFLayout(
        image_encoder=Part(_KANDINSKY_PRIOR, IMAGE_ENCODER),
        image_processor=Part(_KANDINSKY_PRIOR, IMAGE_PROCESSOR),
        text_encoder=Part(_LAION_BIGG),
        tokenizer=Part(_LAION_BIGG),
    ),
    embedding_dim=1280,
    vision_tower=dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=1280, hidden_act="gelu"),
    text_tower=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, max_position_embeddings=77),
    decoder_repo="kandinsky-community/kandinsky-2-2-decoder",
    pipeline="kandinsky",
    sampling={"steps": 50, "guidance_scale": 7.5, "height": 512, "width": 512},
    paper_datasets=("mscoco", "laion-highres-5m"),
    deploy_datasets=("laion-highres-5m", "mscoco", "cc3m", "cc12m"),
))
register_family(DecoderFamily(
    name="karlo",
    title="Karlo v1 alpha decoder",
    tower="ViT-L/14",
    encoder=HFLayout(
        image_encoder=Part(_OPENAI_L14),
        image_processor=Part(_OPENAI_L14),
        text_encoder=Part(_KARLO, TEXT_ENCODER),
        tokenizer=Part(_KARLO, TOKENIZER),
    ),
    embedding_dim=768,
    vision_tower=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu"),
    text_tower=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768, max_position_embeddings=77),
    decoder_repo=_KARLO,
    pipeline="unclip",
    sampling={"steps": 25, "guidance_scale": 7.5, "super_res_steps": 7},
    paper_datasets=("mscoco", "cc3m", "cc12m"),
    deploy_datasets=("cc12m",),  # Karlo's decoder needs ViT-L/14 embeddings
))

#: The paper's main setting: the family a name-less grid, plan or deployment uses.
DEFAULT_FAMILY = "kandinsky22"


def family(name: str) -> DecoderFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown decoder family {name!r}; choose one of {list(FAMILIES)}")
    return FAMILIES[name]
