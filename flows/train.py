"""Prefect flow `train`: one prior over a store. Rerunning a finished run is a no-op; an
interrupted one resumes from its latest complete checkpoint."""

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.failures import require_store
from flows.params import TrainParams
from training.config import CONFIG_NAME, TrainConfig
from training.export import STATE, latest_checkpoint
from training.objectives import ObjectiveName
from training.prior import PresetName
from training.trainer import train as train_prior


def finished_prior(run: Path, steps: int) -> Path | None:
    """RUN/prior if the run reached `steps` and was exported, else None."""
    ckpt = latest_checkpoint(run)
    prior = run / "prior"
    if ckpt is None or not (prior / "config.json").exists():
        return None
    return prior if json.loads((ckpt / STATE).read_text())["step"] >= steps else None


@task(name="train-prior")
def train_task(cfg: TrainConfig) -> str:
    return str(train_prior(cfg))


@flow(name="train", log_prints=True)
def train(
    store: str,
    out: str,
    objective: ObjectiveName = "eclipse",
    preset: PresetName | None = None,
    steps: int = 60_000,
    params: TrainParams = TrainParams(),
    init_from: str | None = None,
    shards: list[str] | None = None,
) -> str:
    """Train an `objective` prior of `preset` size (None: the store's D decides, see `training.trainer.train`) on
    `store` into run folder `out`; returns the exported prior."""
    done = finished_prior(Path(out), steps)
    if done is not None:
        get_run_logger().info("run %s already finished %d steps; nothing to do", out, steps)
        return str(done)
    require_store(store)  # names the precompute to run first
    cfg = TrainConfig(store=store, out=out, objective=objective, preset=preset, steps=steps, resume=True,
                      init_from=init_from, shards=shards, **params.model_dump())
    prior = train_task(cfg)
    ckpt = latest_checkpoint(Path(out))
    metrics = json.loads((ckpt / STATE).read_text())["metrics"]
    preset = json.loads((Path(out) / CONFIG_NAME).read_text())["preset"]  # the one trained, when None was passed
    create_markdown_artifact(
        f"# {objective} prior ({preset})\n\nexported to `{prior}`\n\n| metric | value |\n|---|---|\n"
        + "\n".join(f"| {k} | {v:.5g} |" for k, v in sorted(metrics.items()) if isinstance(v, int | float)),
        key="train-summary", description="final training metrics",
    )
    return prior
