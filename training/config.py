"""Training configuration: one dataclass, defaults in one place (the paper's recipe).

Sources, later ones win: the defaults below < a YAML/JSON file < command-line overrides.
A resumed run starts from the config saved in its run folder.
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from training.objectives import (
    DEFAULT_LAMBDA,
    DEFAULT_REDUCTION,
    DEFAULT_TAU,
    LEGACY_REDUCTION,
    OBJECTIVES,
    REDUCTIONS,
    objective_type,
)
from training.prior import PRIOR_PRESETS

CONFIG_NAME = "train_config.json"  # the resolved config, saved in the run folder


def config_default(cls: type, name: str) -> Any:
    """The default of config dataclass `cls`'s field `name` (TrainConfig, DownloadConfig, ...): the one place it
    is written. The cost plan, the flows' typed parameters and the CLI's flags take theirs from here
    (tests/test_cli.py checks the last two)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class TrainConfig:
    # what to train, on what, where
    store: str = ""  # embedding store directory
    out: str = ""  # run folder: checkpoints/, logs/, prior/
    objective: str = "eclipse"  # eclipse | projection | diffusion
    preset: str | None = None  # kandinsky22 (D=1280) | karlo (D=768) | tiny | demo; None: from the store's D
    embedding_dim: int | None = None  # None: the preset's D; set it for a tiny prior over a tiny encoder's store
    text_length: int | None = None  # None: 77 text positions; fewer suit an encoder with a short context
    init_from: str | None = None  # an exported prior folder to start from (continued training, retrain flow)
    shards: list[str] | None = None  # train on these store shards only (None: all); eval uses all shards
    # architecture knobs (saved in the prior's config.json; the defaults are the preset as released)
    num_layers: int | None = None  # None: the preset's depth
    dropout: float = 0.0  # dropout of the transformer blocks (attention and feed-forward); 0.0 as released
    text_hidden: bool = True  # False: the prior gets no text hidden-state tokens, only the pooled text embedding

    # the paper's recipe: AdamW, lr 5e-5, CosineAnnealingWarmRestarts, 256 per GPU, ~60k iterations
    steps: int = 60_000
    batch_size: int = 256  # per process (per GPU), as in the paper
    lr: float = 5e-5
    weight_decay: float = 0.01  # torch's AdamW default; the paper names AdamW without a value
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # The paper does not give T_0. None: one cosine cycle over the whole run (no restart inside
    # it), which ends at eta_min so the exported weights come from the low-lr end of a cycle.
    sched_t0: int | None = None
    sched_t_mult: int = 1
    sched_eta_min: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.0  # 0 disables; e.g. 0.9999 keeps an EMA copy that export then uses

    # objectives
    eclipse_lambda: float = DEFAULT_LAMBDA
    eclipse_tau: float = DEFAULT_TAU
    # "mean": L_proj averaged over D too (F.mse_loss), so that lambda = 0.2 balances the terms as the paper
    # says it does; "sum": Eq. 3's letter, which leaves the contrastive term ~1/D the weight (objectives.py)
    proj_reduction: str = DEFAULT_REDUCTION
    text_drop_prob: float = 0.1  # diffusion: classifier-free guidance dropout (DALL-E 2 / Karlo use 10 %)
    guidance_scale: float = 4.0  # diffusion sampling (evaluation)
    inference_steps: int = 25

    # data
    heldout_fraction: float = 0.01  # rows held out by key hash, never trained on
    heldout_seed: int = 0
    shuffle_buffer: int = 8192  # rows mixed by the shuffle buffer
    prefetch: int = 4  # batches read ahead by the background thread

    # run mechanics
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the model
    num_threads: int | None = None  # CPU threads per process; None: cores / local processes
    log_every: int = 10
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 2000  # 0: only at the end
    eval_batches: int = 8
    eval_batch_size: int | None = None  # None: batch_size
    progress: bool = True  # tqdm bar on rank 0
    record_keys: bool = False  # write the keys each rank trains on to logs/ (checks sharding; large)
    resume: bool = False  # continue from the run folder's latest complete checkpoint (fresh start if none)

    def validate(self) -> "TrainConfig":
        if not self.store:
            raise ValueError("config: `store` (the embedding store directory) is required")
        if not self.out:
            raise ValueError("config: `out` (the run folder) is required")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"config: objective {self.objective!r} is not one of {list(OBJECTIVES)}")
        if self.preset is not None and self.preset not in PRIOR_PRESETS:
            raise ValueError(f"config: preset {self.preset!r} is not one of {sorted(PRIOR_PRESETS)}")
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"config: {name} must be positive, got {getattr(self, name)!r}")
        if int(self.batch_size) < (least := objective_type(self.objective).min_batch):
            raise ValueError(f"config: {self.objective} needs batch_size >= {least} per process (its loss compares "
                             f"the rows of a batch), got {self.batch_size}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"config: heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.num_layers is not None and int(self.num_layers) <= 0:
            raise ValueError(f"config: num_layers must be positive, got {self.num_layers!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config: dropout must be in [0, 1), got {self.dropout}")
        if not self.text_hidden and objective_type(self.objective).needs_text_hidden:
            raise ValueError(f"config: text_hidden=false is for the time-free priors; the {self.objective} "
                             "objective's prior always reads the text hidden states")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"config: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.proj_reduction not in REDUCTIONS:
            raise ValueError(f"config: proj_reduction must be one of {list(REDUCTIONS)}, got {self.proj_reduction!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"config: precision must be auto, bf16 or fp32, got {self.precision!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known keys: {sorted(known)}")
        values = dict(d)
        if "betas" in values and values["betas"] is not None:
            values["betas"] = tuple(float(b) for b in values["betas"])
        return cls(**values)


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML or JSON mapping of TrainConfig keys."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of keys to values")
    return data


def parse_override(item: str) -> tuple[str, object]:
    """`key=value` with the value read as YAML (so numbers, booleans, null and lists get their type)."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected KEY=VALUE")
    key, value = item.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict | None = None,
    base: dict | None = None,
) -> TrainConfig:
    """defaults < base (e.g. a run's saved config) < file < overrides, validated."""
    merged: dict = {}
    merged.update(base or {})
    if path:
        merged.update(read_config_file(path))
    merged.update(overrides or {})
    return TrainConfig.from_dict(merged).validate()


def cli_config(config_file: str | None, flags: dict, sets: list[str] | None, resume: bool) -> TrainConfig:
    """The config of `eclipse-prior train`: flags left unset (None) do not override.

    With --resume, the run folder's saved config is the base, so a bare
    `eclipse-prior train --out RUN --resume` continues the run as it was configured.
    """
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides |= dict(parse_override(s) for s in sets or [])
    base: dict = {}
    if resume:
        out = overrides.get("out") or (read_config_file(config_file).get("out") if config_file else None)
        saved = Path(out) / CONFIG_NAME if out else None
        if saved is not None and saved.exists():
            base = json.loads(saved.read_text())
            base.setdefault("proj_reduction", LEGACY_REDUCTION)  # resume a run saved before the key, as it was
        overrides["resume"] = True
    return load_config(config_file, overrides, base)
