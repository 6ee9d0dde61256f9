"""Where each part of a transformers CLIP encoder lives, and loading one part with errors that say what to do.

An encoder of the transformers backend is four parts (image tower, image processor, text tower,
tokenizer), each a hub repo or a local folder, optionally a subfolder of it (:class:`Part`). The
hub presets name theirs here (:data:`HUB_PRESETS`); :func:`load_part` turns every failure into an
:class:`~pipeline.errors.EncoderLoadError` naming the part, :func:`tower_kwargs` fixes the
projection width of LAION's joint configs, and :func:`hub_commit` reads the commit a hub part was
loaded from, for the store's encoder metadata. :mod:`pipeline.encoders` builds encoders from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import EncoderLoadError

# Subfolder names: the Kandinsky 2.2 prior repo's (diffusers) layout, reused for saved encoders.
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


# The hub presets: each part comes from where the decoder's official pipelines take it. Revisions
# are left at `main`; the resolved commit is recorded in EncoderInfo.
#  - kandinsky22: the image tower + processor of the Kandinsky 2.2 prior repo; the text tower +
#    tokenizer of LAION's bigG repo, which ECLIPSE's own inference code loads for its Kandinsky prior.
#  - karlo: the text tower + tokenizer from Karlo's own `text_encoder/` and `tokenizer/` (what
#    diffusers' UnCLIPPipeline reads; diffusers converted them from openai/clip-vit-large-patch14,
#    the tokenizer with pad token "!"); the image tower + processor of openai/clip-vit-large-patch14,
#    which Karlo's image-variation pipeline (karlo-v1-alpha-image-variations) was built with.
_KANDINSKY_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
_LAION_BIGG = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
_KARLO = "kakaobrain/karlo-v1-alpha"
_OPENAI_L14 = "openai/clip-vit-large-patch14"
HUB_PRESETS: dict[str, HFLayout] = {
    "kandinsky22": HFLayout(
        image_encoder=Part(_KANDINSKY_PRIOR, IMAGE_ENCODER),
        image_processor=Part(_KANDINSKY_PRIOR, IMAGE_PROCESSOR),
        text_encoder=Part(_LAION_BIGG),
        tokenizer=Part(_LAION_BIGG),
    ),
    "karlo": HFLayout(
        image_encoder=Part(_OPENAI_L14),
        image_processor=Part(_OPENAI_L14),
        text_encoder=Part(_KARLO, TEXT_ENCODER),
        tokenizer=Part(_KARLO, TOKENIZER),
    ),
}


def load_part(cls: Any, part: Part, what: str, **kw: Any) -> Any:
    """cls.from_pretrained for one part; every failure becomes an EncoderLoadError that names the
    model and says what to do."""
    try:
        return cls.from_pretrained(part.repo, **part.kwargs(), **kw)
    except OSError as e:  # hub/cache misses, gated repos and missing files surface as OSError
        if Path(part.repo).is_dir():
            hint = "the folder does not hold a loadable checkpoint for it"
        else:
            hint = (
                "it is neither in the local Hugging Face cache nor reachable on the hub (offline?). Run "
                f"`hf download {part.repo}` where there is internet and copy that Hugging Face cache here "
                "(or point HF_HOME at it), or pass an encoder folder"
            )
        raise EncoderLoadError(f"could not load the {what} from {part.label!r}: {hint}.\n  cause: {e}") from e
    except ValueError as e:
        raise EncoderLoadError(
            f"could not load the {what} from {part.label!r}: its config is not a CLIP {what} config that this "
            f"transformers version reads.\n  cause: {e}"
        ) from e
    except RuntimeError as e:
        if "mismatch" not in str(e).lower():
            raise
        raise EncoderLoadError(
            f"could not load the {what} from {part.label!r}: its weights do not fit the model that its "
            f"config.json describes (size mismatch). Check `projection_dim` and `hidden_size` there "
            f"({_dims_summary(part)}); LAION's CLIP repos set `projection_dim` only at the top level of a "
            f"joint config (transformers#25622). Fix the config or pass a folder whose config fits its weights."
            f"\n  cause: {e}"
        ) from e


def _load_config_dict(part: Part, what: str) -> dict:
    """The raw config.json of a part (from the folder or the HF cache), with _load_part's errors."""
    from transformers import PretrainedConfig

    class _Raw:  # from_pretrained-shaped, so _load_part's error handling applies to the config read too
        @staticmethod
        def from_pretrained(repo: str, **kw: Any) -> dict:
            return PretrainedConfig.get_config_dict(repo, **kw)[0]

    return load_part(_Raw, part, f"{what} config")


def tower_kwargs(part: Part, what: str) -> dict[str, Any]:
    """The top-level `projection_dim` of a joint CLIPModel config, passed to a single tower.

    A tower loaded from a joint checkpoint reads only its nested text_config/vision_config. LAION's
    repos (e.g. CLIP-ViT-bigG-14-laion2B-39B-b160k) set projection_dim (1280) only at the top level and
    leave the nested default of 512, so the projection would not fit (transformers#25622); the official
    ECLIPSE inference code passes projection_dim=1280 for the same reason. The top level is what
    CLIPModel itself builds its projections from, so it is right for every joint config.
    """
    cfg = _load_config_dict(part, what)
    if cfg.get("model_type") == "clip" and "projection_dim" in cfg:
        return {"projection_dim": int(cfg["projection_dim"])}
    return {}


def _dims_summary(part: Part) -> str:
    try:
        cfg = _load_config_dict(part, "config")
    except EncoderLoadError:
        return "config.json unreadable"
    found = [f"{key}={cfg[key]}" for key in ("projection_dim", "hidden_size") if key in cfg]
    for sub in ("text_config", "vision_config"):
        nested = cfg.get(sub) or {}
        found += [f"{sub}.{key}={nested[key]}" for key in ("projection_dim", "hidden_size") if key in nested]
    return ", ".join(found) or "neither key is set"


def hub_commit(part: Part) -> str | None:
    """The commit a hub part was loaded from (read off the local cache); None for local folders.

    transformers 5 no longer records `_commit_hash` on configs, and a branch name like `main`
    would not pin the weights: the store needs the immutable commit.
    """
    if Path(part.repo).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    filename = f"{part.subfolder}/config.json" if part.subfolder else "config.json"
    cached = try_to_load_from_cache(part.repo, filename, revision=part.revision)
    if not isinstance(cached, str):
        return part.revision
    parts = Path(cached).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else part.revision
