"""Opening a trained prior for inference, and what its run folder says about it.

    handle = open_prior("runs/eclipse")  # an exported prior folder, a run folder or a checkpoint
    handle.predict_numpy(text_embed, text_hidden, text_mask, seed=0) -> [N, D] image embeddings

Also: the text encoder a prior was trained on (`prior_encoder`), a prior's image embeddings for
prompts (`prompt_embeddings`) and the run's training curves (`read_training_log`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.weights import default_device
from training.config import CONFIG_NAME
from training.export import (
    CHECKPOINTS,
    COMPLETE,
    EMA_DIR,
    PRIOR_DIR,
    STATE,
    TRAIN_LOG,
    TRAINING_INFO,
    WEIGHTS_NAME,
    latest_checkpoint,
)
from training.objectives import Objective, PriorBatch, make_objective


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
        # torch.tensor copies: the inputs may be read-only views of the store (torch warns on those)
        te = torch.tensor(np.asarray(text_embed), dtype=torch.float32, device=dev)
        batch = PriorBatch(
            # image_embed is only read for its shape (the noise draw); the target is unknown at inference
            image_embed=torch.zeros(te.shape[0], self.embedding_dim, device=dev),
            text_embed=te,
            text_hidden=torch.tensor(np.asarray(text_hidden), dtype=torch.float32, device=dev),
            text_mask=torch.tensor(np.asarray(text_mask), dtype=torch.bool, device=dev),
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


def read_training_log(path: str | os.PathLike) -> dict[str, dict[str, list[float]]]:
    """RUN/logs/train.jsonl -> {"train": {"step": [...], "loss": [...], ...}, "eval": {...}}; None where a
    record lacks a key (JSON has no NaN)."""
    records: dict[str, list[dict]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # empty, or a line cut by a killed run
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            records.setdefault(str(rec.get("type", "train")), []).append(rec)
    series: dict[str, dict[str, list[float]]] = {}
    for kind, recs in records.items():
        keys = dict.fromkeys(k for r in recs for k, v in r.items()
                             if k != "type" and isinstance(v, (int, float)) and not isinstance(v, bool))
        series[kind] = {k: [float(r[k]) if k in r else None for r in recs] for k in keys}
    return series
