"""Where each part of a transformers CLIP encoder lives, and loading one part with errors that say what to do.

An encoder of the transformers backend is four parts (image tower, image processor, text tower,
tokenizer), each a hub repo or a local folder, optionally a subfolder of it (:class:`Part`). The
hub presets are the decoder families' encoders (:data:`HUB_PRESETS`, from :mod:`pipeline.families`);
:func:`load_part` turns every failure into an :class:`~pipeline.errors.EncoderLoadError` naming the
part, :func:`tower_kwargs` fixes the projection width of LAION's joint configs, and :func:`hub_commit`
reads the commit a hub part was loaded from, for the store's encoder metadata. :mod:`pipeline.encoders`
builds encoders from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import EncoderLoadError
from pipeline.families import FAMILIES, HFLayout, Part
from pipeline.hub import offline_flag

# Part, HFLayout and the subfolder names (the Kandinsky 2.2 prior repo's diffusers layout, reused for saved
# encoders) live with the families; the hub presets are the families' encoders.
HUB_PRESETS: dict[str, HFLayout] = {name: f.encoder for name, f in FAMILIES.items()}


def load_part(cls: Any, part: Part, what: str, **kw: Any) -> Any:
    """cls.from_pretrained for one part; every failure becomes an EncoderLoadError that names the
    model and says what to do. Our offline switch (ECLIPSE_OFFLINE, which transformers does not read) means
    the cache only."""
    if offline_flag() and not Path(part.repo).is_dir():
        kw.setdefault("local_files_only", True)
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
