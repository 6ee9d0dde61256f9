"""Image metrics that need model weights: CLIPScore, PickScore (and its win rate), FID.

Weights come from a local folder or the Hugging Face cache; a missing one raises WeightsMissingError
naming it, a missing FID library ImageMetricUnavailable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluation.weights import WeightsMissingError, default_device, load_pretrained


class ImageMetricUnavailable(RuntimeError):
    """An image metric cannot run here (no library installed for it)."""


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
                f"be loaded; install torchmetrics with torch-fidelity and have the weights cached.\n  cause: {e}"
            ) from e
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
        "environment. Install one of them (`pip install torchmetrics torch-fidelity` or `pip install clean-fid`) "
        "where its Inception weights can be fetched once."
    )
