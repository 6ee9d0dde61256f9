"""Checkpoint layout, and export of a checkpoint as a diffusers-style prior folder with a model card.

A run folder:
    RUN/train_config.json
    RUN/checkpoints/step_00001000/   prior/ (config.json + diffusion_pytorch_model.safetensors),
                                     ema/ (same, when EMA is on), trainer_state.pt, state.json,
                                     COMPLETE (written last: a folder without it is ignored)
    RUN/checkpoints/latest           name of the newest complete checkpoint
    RUN/logs/train.jsonl, RUN/logs/tb/
    RUN/prior/                       the exported prior (config.json, safetensors, README.md, eclipse_training.json)
"""

import json
import os
from pathlib import Path

from storage_schema.atomic import atomic_path

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "state.json"
TRAINER_STATE = "trainer_state.pt"
PRIOR_DIR, EMA_DIR = "prior", "ema"
TRAINING_INFO = "eclipse_training.json"  # in an exported prior: the encoder and data it was trained on
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LOGS = "logs"
TRAIN_LOG = f"{LOGS}/train.jsonl"  # one JSON record per logged step, read back by evaluation


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).exists()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if (named / COMPLETE).exists():
            return named
    found = complete_checkpoints(run_dir)  # pointer missing or stale (killed between rename and pointer)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder (its latest complete checkpoint)."""
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: run folder has no complete checkpoint yet")
        return latest
    if (path / STATE).exists() or (path / PRIOR_DIR).exists():
        raise FileNotFoundError(f"{path}: checkpoint is incomplete (no {COMPLETE} marker); it was interrupted")
    raise FileNotFoundError(f"{path}: neither a checkpoint folder nor a run folder")


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, use_ema: bool | None = None) -> Path:
    """Write the checkpoint's prior to `out_dir` as config.json + diffusion_pytorch_model.safetensors + README.md.

    ckpt_dir: a checkpoint folder or a run folder (its latest complete checkpoint).
    use_ema: None exports the EMA weights when the run kept them, else the raw weights.
    The weights are loaded and saved again (not copied), so an unloadable checkpoint fails here.
    Returns the output folder; an existing one is replaced only once the new one is complete.
    """
    from safetensors.torch import load_file

    from training.prior import prior_class

    ckpt = resolve_checkpoint(ckpt_dir)
    state = json.loads((ckpt / STATE).read_text())
    has_ema = (ckpt / EMA_DIR / WEIGHTS_NAME).exists()
    if use_ema and not has_ema:
        raise FileNotFoundError(f"{ckpt}: no EMA weights in this checkpoint (the run had ema_decay=0)")
    ema = has_ema if use_ema is None else use_ema
    src = ckpt / (EMA_DIR if ema else PRIOR_DIR)
    config = json.loads((src / "config.json").read_text())
    # from_config on the bare keys: from_pretrained would add `_name_or_path` to the exported config.json
    model = prior_class(config).from_config({k: v for k, v in config.items() if k != "_name_or_path"})
    model.load_state_dict(load_file(src / WEIGHTS_NAME), strict=True)

    out = Path(out_dir)
    with atomic_path(out, directory=True) as tmp:
        _write_prior_folder(tmp, model, state, ckpt, ema)
    return out


def _write_prior_folder(tmp: Path, model, state: dict, ckpt: Path, ema: bool) -> None:
    from training.prior import count_parameters

    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "README.md").write_text(model_card(state, ckpt, ema, count_parameters(model)))
    cfg = state.get("config", {})
    # The prior only makes sense with the encoder whose embeddings it learned: keep that beside the weights.
    (tmp / TRAINING_INFO).write_text(json.dumps({
        "encoder": state.get("encoder"), "objective": cfg.get("objective"), "steps": state.get("step"),
        "store": cfg.get("store"), "store_shards": state.get("store_shards"), "ema": ema,
    }, indent=1))


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def model_card(state: dict, ckpt: Path, ema: bool, params: int) -> str:
    cfg = state.get("config", {})
    enc = state.get("encoder", {})
    metrics = state.get("metrics", {})
    objective = cfg.get("objective", "?")
    from training.objectives import LEGACY_REDUCTION

    summed = cfg.get("proj_reduction", LEGACY_REDUCTION) == "sum"
    mse = "squared error summed over D" if summed else "MSE (mean over D)"
    what = {
        "eclipse": f"ECLIPSE (eq. 5): {mse} + {cfg.get('eclipse_lambda')} x InfoNCE text->image, "
                   f"tau {cfg.get('eclipse_tau')}; time-free prior, one forward pass",
        "projection": f"projection (eq. 3): {mse} to the image embedding; time-free prior, one forward pass",
        "diffusion": f"diffusion baseline (eq. 1): diffusers PriorTransformer, DDPM 1000 linear steps, "
                     f"predicts the clean embedding, text dropout {cfg.get('text_drop_prob')}; sample with "
                     f"{cfg.get('inference_steps')} steps, guidance {cfg.get('guidance_scale')}",
    }.get(objective, objective)
    lines = [
        f"# ECLIPSE-style text-to-image prior ({cfg.get('preset')}, {objective})",
        "",
        "Maps CLIP text embeddings (pooled `text_embeds` + `last_hidden_state` + attention mask) to raw CLIP",
        "`image_embeds` for an unCLIP decoder. Config keys and state-dict names follow the released ECLIPSE",
        "priors (`_class_name: PriorTransformer`).",
        "",
        "| | |",
        "|---|---|",
        f"| objective | {what} |",
        f"| parameters | {params:,} |",
        f"| embedding dim D | {state.get('embedding_dim')} |",
        f"| steps | {state.get('step')} of {cfg.get('steps')} |",
        f"| batch | {cfg.get('batch_size')} per process x {state.get('world_size')} processes |",
        f"| samples seen | {state.get('samples_seen', 0):,} |",
        f"| optimiser | AdamW lr {cfg.get('lr')}, weight decay {cfg.get('weight_decay')}, "
        f"CosineAnnealingWarmRestarts (T_0 {cfg.get('sched_t0') or cfg.get('steps')}) |",
        f"| weights | {'EMA (decay ' + str(cfg.get('ema_decay')) + ')' if ema else 'raw (no EMA)'} |",
        f"| data | store `{cfg.get('store')}`: encoder `{enc.get('preset')}` (image `{enc.get('image_model')}`, "
        f"text `{enc.get('text_model')}`), {state.get('store_rows')} rows, "
        f"{cfg.get('heldout_fraction')} held out by key hash (seed {cfg.get('heldout_seed')}) |",
        f"| checkpoint | `{ckpt}` |",
        "",
        "## Final metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("none recorded")
    lines += [
        "",
        "`train/*`: mean training loss over the last logging window; `eval/*`: on the held-out split",
        "(`cos_to_image`: cosine between predicted and real image embeddings).",
        "",
        "## Use",
        "",
        "```python",
        "from training.prior import load_prior",
        "prior = load_prior('path/to/this/folder')",
        "```",
        "",
    ]
    return "\n".join(lines)
