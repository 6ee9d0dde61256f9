"""Typed flow parameters. Pydantic models, so the Prefect server validates a run's
parameters (`prefect deployment run ... --param/--params`) before the run starts. Also the
presets each named deployment runs with (read by `deployments.py`, and by `failures.py` to
name the precompute that writes a missing store)."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.cluster import ClusterConfig
from pipeline.download import DownloadConfig
from pipeline.encode import EncodeConfig
from pipeline.families import DEFAULT_FAMILY, FAMILIES
from training.config import TrainConfig, config_default
from training.objectives import Reduction


def _deployment(dataset: str, family: str) -> str:
    """A precompute deployment's name: the dataset's, with the family's when it is not the default one."""
    return dataset if family == DEFAULT_FAMILY else f"{dataset}-{family}"


# deployment name -> (dataset preset, encoder preset): the encoder is the decoder's own (pipeline.families).
DATASET_DEPLOYMENTS = {_deployment(d, name): (d, name) for name, f in FAMILIES.items() for d in f.deploy_datasets}
# decoder preset -> the precompute deployment whose store its train/evaluate/retrain use by default
DECODER_STORES = {name: _deployment(f.deploy_datasets[0], name) for name, f in FAMILIES.items() if f.deploy_datasets}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not silently ignored


class DownloadParams(_Params):
    image_size: int = Field(config_default(DownloadConfig, "image_size"), gt=0,
                            description="stored image side in pixels")
    resize_mode: Literal["center_crop", "border", "keep_ratio", "keep_ratio_largest", "no"] = config_default(
        DownloadConfig, "resize_mode")
    processes_count: int | None = Field(None, gt=0, description="download processes (None: one per core)")
    thread_count: int = Field(config_default(DownloadConfig, "thread_count"), gt=0)
    number_sample_per_shard: int = Field(config_default(DownloadConfig, "number_sample_per_shard"), gt=0)
    timeout: int = Field(config_default(DownloadConfig, "timeout"), gt=0, description="seconds per network read")
    max_download_seconds: float | None = Field(config_default(DownloadConfig, "max_download_seconds"), gt=0,
                                               description="one url's whole download (None: 3 x timeout)")
    max_image_bytes: int = Field(config_default(DownloadConfig, "max_image_bytes"), gt=0,
                                 description="a larger image body is dropped as it arrives")
    encode_format: Literal["jpg", "png", "webp"] = config_default(DownloadConfig, "encode_format")
    encode_quality: int = Field(config_default(DownloadConfig, "encode_quality"), ge=0, le=100,
                                description="jpg/webp quality, or png compression 0-9")
    retry_failed: bool = Field(False, description="re-feed failed urls once after the download")
    overwrite: bool = Field(False, description="start the download over instead of resuming it")
    metadata_dir: str | None = Field(None, description="a preset's files downloaded by hand (names matching the "
                                     "preset's glob, e.g. *.parquet or cc3m-train-*.tar): used instead of fetching")
    max_error_rate: float = Field(config_default(DownloadConfig, "max_error_rate"), ge=0, le=1,
                                  description="fail the stage when more than this fraction of the urls is missing")
    allow_local_files: bool = Field(config_default(DownloadConfig, "allow_local_files"),
                                    description="also download url rows that are not http(s) (file://, local "
                                    "paths): only for a url list you wrote")


class EncodeParams(_Params):
    batch_size: int = Field(config_default(EncodeConfig, "batch_size"), gt=0)
    device: str | None = Field(config_default(EncodeConfig, "device"),
                               description="cuda, cpu, ... (None: cuda if present)")
    dtype: Literal["float16", "bfloat16", "float32"] | None = config_default(EncodeConfig, "dtype")


class ClusterParams(_Params):
    address: str | None = Field(config_default(ClusterConfig, "address"),
                                description="tcp://host:8786 of a running Dask scheduler; None: local")
    n_workers: int | None = Field(config_default(ClusterConfig, "n_workers"), gt=0,
                                  description="local CPU workers (GPUs: one worker each)")
    wait_timeout: float = Field(config_default(ClusterConfig, "wait_timeout"), gt=0,
                                description="seconds to wait for Dask workers before failing")


def _train(name: str) -> Any:
    return config_default(TrainConfig, name)


class TrainParams(_Params):
    """Trainer settings a flow run may change; everything else keeps training.config's defaults."""

    batch_size: int = Field(_train("batch_size"), gt=0, description="per process (per GPU)")
    lr: float = Field(_train("lr"), gt=0)
    seed: int = _train("seed")
    embedding_dim: int | None = Field(_train("embedding_dim"), gt=0,
                                      description="override the preset's D (tiny priors)")
    text_length: int | None = Field(_train("text_length"), gt=0,
                                    description="override the 77 text positions (short contexts)")
    heldout_fraction: float = Field(_train("heldout_fraction"), ge=0, lt=1)
    eclipse_lambda: float = Field(_train("eclipse_lambda"), ge=0,
                                  description="weight of eclipse's contrastive term (the paper's 0.2)")
    proj_reduction: Reduction = Field(_train("proj_reduction"), description="L_proj over D: mean (F.mse_loss, "
                                      "the default) or sum (Eq. 3's letter): training.objectives")
    ema_decay: float = Field(_train("ema_decay"), ge=0, lt=1)
    compile: bool = _train("compile")
    device: Literal["auto", "cpu", "cuda"] = _train("device")
    ckpt_every: int = Field(_train("ckpt_every"), gt=0)
    eval_every: int = Field(_train("eval_every"), ge=0)
    num_threads: int | None = Field(_train("num_threads"), gt=0)
    progress: bool = False  # unlike the CLI's default: flow logs are not a terminal


class GateParams(_Params):
    """When the retrain flow may promote a new prior (higher is better for every metric named)."""

    metrics: list[str] = Field(default_factory=lambda: ["cos_pred_image", "r_at_1"],
                               description="held-out metrics that must not regress")
    tolerance: float = Field(0.005, ge=0, description="allowed drop (absolute) per metric")
