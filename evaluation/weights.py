"""Loading pretrained weights (decoders, image scorers) with a message that names what is missing.

Weights are read from a local folder or the Hugging Face cache; tests never download anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class WeightsMissingError(FileNotFoundError):
    """Model weights that a step needs are not on this machine (and are never downloaded in tests)."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def dtype_kw(dtype: torch.dtype) -> dict:
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
