"""The training loop, nanoGPT-style, single process or torchrun (DDP).

    train(config) -> RUN/prior

`_train` reads top to bottom: `_set_up` (checks, run folder, model, optimizer, resume), then
`_loop`, whose steps are `_forward`, `_update`, `_log_train`, `_log_eval` and `_checkpoint`.
What it does, in order: refuse a store that does not fit the prior (before touching the run
folder); build the model (same seed on every rank); resume from the newest complete
checkpoint if asked; stream batches from the store; AdamW + CosineAnnealingWarmRestarts
(stepped per iteration), bf16 autocast on GPU, gradient clipping, optional EMA and
torch.compile; JSONL + TensorBoard logs and a tqdm bar on rank 0; atomic checkpoints every
`ckpt_every` steps; evaluation on the held-out split; finally export RUN/prior.

What a logging step records (logs/train.jsonl, type "train", and TensorBoard's train/KEY): the
loss and the objective's parts averaged over the steps since the last record (eclipse:
`loss_proj`, `loss_cls_weighted` = lambda * L_CLS, `loss_cls`; projection: `loss_proj`;
diffusion: `mse_x0`), lr, grad_norm, samples_per_s, and for eclipse `grad_ratio_cls_proj`:
||grad lambda*L_CLS|| / ||grad L_proj|| on this step's batch, w.r.t. the prior's output layer
(`grad_ratio`; not under torch.compile). When that ratio stayed below 0.01 or above 10 at every
logging step of the first 10 % of the run, a "warning" record says so once (also on stderr and as
TensorBoard text): one term is then swamping the other (`training.monitor.BalanceWatch`; docs/objectives.md,
"The objectives and the balance of Eq. 5").

Exact resume: a checkpoint holds the weights, optimizer and scheduler state, every rank's
noise-generator state and data position (epoch, batch index). A resumed run on the same
machine and world size reproduces the uninterrupted loss curve.
"""

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from storage_schema import IMAGE_EMBED, EmbeddingStore, EncoderInfo, StoreError
from storage_schema.atomic import TEMP_PREFIX, atomic_path, atomic_write_text
from training.config import CONFIG_NAME, TrainConfig
from training.data import StoreLoader, check_store_dims, is_heldout
from training.export import (
    CHECKPOINTS,
    COMPLETE,
    EMA_DIR,
    LATEST,
    LOGS,
    PRIOR_DIR,
    STATE,
    TRAINER_STATE,
    WEIGHTS_NAME,
    complete_checkpoints,
    export_checkpoint,
    latest_checkpoint,
)
from training.monitor import (
    GRAD_RATIO,
    BalanceWatch,
    Logger,
    LossWindow,
    balance_warning,
    grad_ratio,
    output_layer_params,
)
from training.objectives import LEGACY_REDUCTION, Objective, make_objective, unwrap
from training.prior import count_parameters, load_prior, preset_config, preset_for_store

EVAL_SEED = 1234  # evaluation draws its noise from its own generator: it never shifts training randomness


# -- distributed setup ----------------------------------------------------------------------


class Dist:
    """Rank, world size and device; initialises the process group when started by torchrun."""

    def __init__(self, device: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise RuntimeError("config device='cuda' but CUDA is not available")
        self.device = torch.device(f"cuda:{self.local_rank}" if want_cuda else "cpu")
        if want_cuda:
            torch.cuda.set_device(self.device)
        self.initialised_here = False
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if want_cuda else "gloo"
            dist.init_process_group(backend=backend, device_id=self.device if want_cuda else None)
            self.initialised_here = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def close(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


# -- EMA ------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the weights, kept in fp32 on the training device."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._src = [p for p in model.parameters()]
        self._dst = [p for p in self.model.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._dst, self._src, 1.0 - self.decay)


# -- checkpoints ----------------------------------------------------------------------------


def _rng_state(gen: torch.Generator) -> dict:
    state = {"noise": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, ema: EMA | None, optimizer, scheduler,
    rank_states: list[dict], state: dict, keep: int,
) -> Path:
    """Write checkpoint `step` atomically: temp folder, COMPLETE marker last, fsync, rename, then the pointer."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    # The same step may be saved again (the final step of a resumed, finished run): atomic_path swaps it.
    with atomic_path(final, directory=True) as tmp:
        model.save_pretrained(tmp / PRIOR_DIR, safe_serialization=True)
        if ema is not None:
            ema.model.save_pretrained(tmp / EMA_DIR, safe_serialization=True)
        # Plain tensors, ints, floats, lists and dicts only: loadable with torch.load(weights_only=True).
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": [r["rng"] for r in rank_states]}, tmp / TRAINER_STATE)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        (tmp / COMPLETE).write_text(f"{step}\n")  # written last; atomic_path fsyncs the tree before the rename
    atomic_write_text(root / LATEST, name)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)


# -- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def heldout_figures(objective: Objective, model: torch.nn.Module, store: EmbeddingStore, cfg: TrainConfig,
             device: torch.device, autocast) -> dict[str, float]:
    """Held-out loss, MSE and cosine of predicted vs real image embeddings (first `eval_batches` batches)."""
    if cfg.heldout_fraction <= 0 or cfg.eval_batches <= 0:
        return {}
    loader = StoreLoader(
        store, cfg.eval_batch_size or cfg.batch_size, split="heldout", heldout_fraction=cfg.heldout_fraction,
        heldout_seed=cfg.heldout_seed, shuffle=False, infinite=False, drop_last=False, prefetch=0,
        pad_to=unwrap(model).config.num_embeddings, shards=cfg.shards,
    )
    gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
    was_training = model.training
    model.eval()
    totals = {"loss": 0.0, "mse": 0.0, "cos_to_image": 0.0}
    rows = 0
    try:
        for i, raw in enumerate(loader):
            if i >= cfg.eval_batches:
                break
            batch = raw.to(device)
            if len(raw) < objective.min_batch:
                continue  # e.g. a contrastive loss needs at least two rows
            with autocast():
                loss, _ = objective.loss(model, batch, gen)
                pred = objective.predict(model, batch, gen).float()
            n = len(raw)
            totals["loss"] += float(loss) * n
            totals["mse"] += float(torch.nn.functional.mse_loss(pred, batch.image_embed)) * n
            totals["cos_to_image"] += float(torch.nn.functional.cosine_similarity(pred, batch.image_embed).sum())
            rows += n
    finally:
        model.train(was_training)
    if rows == 0:
        return {}
    return {k: v / rows for k, v in totals.items()} | {"rows": rows}


def fit_standardisation(model: torch.nn.Module, store: EmbeddingStore, cfg: TrainConfig, max_rows: int = 16384) -> None:
    """Diffusion baseline: set clip_mean/clip_std from the first training rows (same on every rank).

    Training rows only: the run's shards (`cfg.shards`) less the key-hash held-out rows, so no
    held-out composition or row leaks into the prior's normalisation.
    """
    total, total_sq, n = None, None, 0
    keep = (lambda keys: ~is_heldout(keys, cfg.heldout_fraction, cfg.heldout_seed)) if cfg.heldout_fraction else None
    for raw in store.iter_batches(4096, [IMAGE_EMBED], row_filter=keep, shards=cfg.shards):
        x = torch.from_numpy(raw[IMAGE_EMBED]).double()
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        n += len(x)
        if n >= max_rows:
            break
    if not n:
        raise StoreError(f"{store.dir}: no training rows to compute the diffusion standardisation from")
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(1e-12).sqrt()
    with torch.no_grad():
        model.clip_mean.copy_(mean[None].float())
        model.clip_std.copy_(std[None].float())


# -- the loop -------------------------------------------------------------------------------


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices and embeddings (ndim >= 2), none on biases, norm gains and scalars.

    Frozen parameters are left out. The same split as open_clip's name-based rule (no decay for
    bn/ln/bias/logit_scale), since those parameters are exactly the ones with ndim < 2.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def _with_preset(cfg: TrainConfig, encoder: EncoderInfo) -> TrainConfig:
    """A config naming no preset gets the one of the store's D (saved so, so a resume trains the same prior)."""
    if cfg.preset is not None:
        return cfg
    name, sized = preset_for_store(encoder.image_dim, encoder.context_length)
    sized = {k: v for k, v in sized.items() if getattr(cfg, k) is None}
    print(f"no --preset given: training the {name!r} prior"
          + (f" sized to the store ({', '.join(f'{k}={v}' for k, v in sized.items())})" if sized else "")
          + f" for this store of D={encoder.image_dim}", file=sys.stderr)
    return replace(cfg, preset=name, **sized)


def train(config: TrainConfig | dict) -> Path:
    """Train a prior as configured; return the exported prior folder RUN/prior."""
    cfg = (TrainConfig.from_dict(config) if isinstance(config, dict) else config).validate()
    run_dir = Path(cfg.out)

    # Refuse a store that does not fit, before creating anything.
    store = EmbeddingStore(cfg.store)
    cfg = _with_preset(cfg, store.encoder)
    dim = preset_config(cfg.preset, cfg.embedding_dim)["embedding_dim"]
    check_store_dims(store.encoder, dim, f"the {cfg.preset!r} prior")
    text_length = preset_config(cfg.preset, cfg.embedding_dim, cfg.text_length)["num_embeddings"]
    if text_length < store.encoder.context_length:
        raise ValueError(f"the prior takes {text_length} text positions but the store's encoder has context length "
                         f"{store.encoder.context_length}; set text_length >= {store.encoder.context_length}")
    world = Dist(cfg.device)
    try:
        return _train(cfg, store, dim, run_dir, world)
    finally:
        world.close()


@dataclass
class _Run:
    """What one training run is made of, built once by `_set_up` and read by every step below."""

    cfg: TrainConfig
    store: EmbeddingStore
    world: Dist
    run_dir: Path
    dim: int
    autocast: Callable[[], contextlib.AbstractContextManager]
    objective: Objective
    model: torch.nn.Module  # the prior itself: saved, evaluated, exported
    train_model: torch.nn.Module  # the same weights, compiled and/or wrapped in DDP: what the step calls
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator  # this rank's noise
    n_params: int
    balance_params: list[torch.nn.Parameter] | None = None  # where `grad_ratio` is taken; None: not measured

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world.world_size


@dataclass
class _Progress:
    """Where the run stands: saved in every checkpoint, restored on resume."""

    step: int = 0
    position: tuple[int, int] = (0, 0)  # (epoch, batch index) of the next batch this rank reads
    samples_seen: int = 0
    metrics: dict = field(default_factory=dict)  # the latest train/... and eval/... values


def _train(cfg: TrainConfig, store: EmbeddingStore, dim: int, run_dir: Path, world: Dist) -> Path:
    run, progress, resumed = _set_up(cfg, store, dim, run_dir, world)
    log = Logger(run_dir, world.main, progress.step if resumed else None)
    if world.main:
        print(f"training {cfg.objective} prior ({cfg.preset}, D={dim}, {run.n_params:,} parameters) on {store.dir} "
              f"({store.num_rows} rows), {world.world_size} x {run.device.type}, "
              f"{'resuming at step ' + str(progress.step) if resumed else 'from scratch'}", file=sys.stderr)
    _loop(run, progress, log)
    out = run_dir / "prior"
    if world.main:
        export_checkpoint(run_dir, out)
        print(f"exported prior to {out}", file=sys.stderr)
    world.barrier()
    return out


def _loop(run: _Run, progress: _Progress, log: Logger) -> None:
    """Steps until `cfg.steps`: train, then log / evaluate / checkpoint when due."""
    cfg, device = run.cfg, run.device
    keys_file = _open_keys_file(run)
    batches = iter(_train_loader(run, progress.position))
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=progress.step, disable=not (run.world.main and cfg.progress), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    window = LossWindow(device)
    watch = BalanceWatch(cfg.steps, progress.step)
    try:
        nxt = next(batches) if progress.step < cfg.steps else None
        batch = nxt.to(device, non_blocking=True) if nxt is not None else None
        while progress.step < cfg.steps:
            raw = nxt
            logging = (progress.step + 1) % cfg.log_every == 0 or progress.step + 1 == cfg.steps
            loss, parts = _forward(run, batch, progress.step)
            ratio = _measure_balance(run, parts) if logging else None  # before backward frees the graph
            # Read the next batch while backward runs (the copy is asynchronous from pinned memory).
            nxt = next(batches) if progress.step + 1 < cfg.steps else None
            batch = nxt.to(device, non_blocking=True) if nxt is not None else None
            lr, grad_norm = _update(run, loss)
            if keys_file is not None:
                keys_file.write("".join(f"{raw.epoch}\t{k}\n" for k in raw.keys))
            progress.step += 1
            progress.samples_seen += run.global_batch
            progress.position = (raw.epoch, raw.index + 1)  # the next batch to read, on this rank
            window.add(loss, parts)
            bar.update(1)

            last = progress.step == cfg.steps
            if logging:
                _log_train(run, progress, window, log, bar, lr=lr, grad_norm=grad_norm, epoch=raw.epoch, ratio=ratio,
                           watch=watch)
            if last or (cfg.eval_every and progress.step % cfg.eval_every == 0):
                _log_eval(run, progress, log)
            if last or progress.step % cfg.ckpt_every == 0:
                _checkpoint(run, progress)
    finally:
        bar.close()
        batches.close()
        log.close()
        if keys_file is not None:
            keys_file.close()


# -- setup ----------------------------------------------------------------------------------


def _set_up(cfg: TrainConfig, store: EmbeddingStore, dim: int, run_dir: Path,
            world: Dist) -> tuple[_Run, _Progress, bool]:
    """Check the shards, prepare the run folder, build model, optimizer and noise; resume if asked.

    Returns the run, its progress and whether it resumed from a checkpoint.
    """
    device = world.device
    _check_shards(cfg, store, world)
    autocast = _configure_device(cfg, world)
    resume_from = _open_run_dir(cfg, run_dir, world)
    objective = make_objective(cfg.objective, lam=cfg.eclipse_lambda, tau=cfg.eclipse_tau, reduction=cfg.proj_reduction,
                               text_drop_prob=cfg.text_drop_prob, num_inference_steps=cfg.inference_steps,
                               guidance_scale=cfg.guidance_scale)
    model = _build_model(cfg, objective, store, fresh=resume_from is None).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=cfg.sched_t0 or cfg.steps, T_mult=cfg.sched_t_mult, eta_min=cfg.sched_eta_min)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + world.rank)  # per-rank noise
    progress = _Progress()
    if resume_from is not None:
        progress = _resume(resume_from, cfg, world, model, optimizer, scheduler, gen)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and resume_from is not None:
        ema.model.load_state_dict(load_file(resume_from / EMA_DIR / WEIGHTS_NAME, device=str(device)))
    balance_params = output_layer_params(model) if objective.balance else None
    if balance_params and cfg.compile:
        # The compiled graph's backward is one node: a gradient w.r.t. the output layer alone would run all of it.
        balance_params = None
        if world.main:
            print(f"{GRAD_RATIO} is not measured under torch.compile (compile=false measures it)", file=sys.stderr)
    run = _Run(cfg=cfg, store=store, world=world, run_dir=run_dir, dim=dim, autocast=autocast, objective=objective,
               model=model, train_model=_wrap_for_training(model, cfg, world), ema=ema, optimizer=optimizer,
               scheduler=scheduler, gen=gen, n_params=count_parameters(model), balance_params=balance_params or None)
    return run, progress, resume_from is not None


def _check_shards(cfg: TrainConfig, store: EmbeddingStore, world: Dist) -> None:
    unknown = sorted(set(cfg.shards or []) - set(store.shards))
    if unknown:
        raise StoreError(f"{store.dir}: config names shards the store does not have: {unknown}")
    if len(cfg.shards or store.shards) < world.world_size:
        raise StoreError(f"{store.dir}: {len(store.shards)} shards cannot feed {world.world_size} processes "
                         f"(ranks read disjoint shards); write more, smaller shards")


def _configure_device(cfg: TrainConfig, world: Dist) -> Callable[[], contextlib.AbstractContextManager]:
    """Set threads / matmul precision; return the autocast context the steps run under."""
    device = world.device
    if device.type == "cpu":
        torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // world.local_world))
    else:
        torch.set_float32_matmul_precision("high")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    return autocast


def _open_run_dir(cfg: TrainConfig, run_dir: Path, world: Dist) -> Path | None:
    """Refuse to overwrite a run, clear killed checkpoint writes, record the config; the checkpoint to resume."""
    resume_from = latest_checkpoint(run_dir) if cfg.resume else None
    if not cfg.resume and complete_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir}: run folder already has checkpoints; pass --resume to continue it "
                              f"or choose another --out")
    if resume_from is not None:
        _check_resumable(resume_from, cfg, world)  # before the config is recorded: a refusal changes nothing
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / CHECKPOINTS).glob(f"{TEMP_PREFIX}*"):  # left by a killed checkpoint write
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write_text(run_dir / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=1))
    world.barrier()
    return resume_from


def _build_model(cfg: TrainConfig, objective: Objective, store: EmbeddingStore, fresh: bool) -> torch.nn.Module:
    """The prior, on CPU: seeded (identical on every rank), then `init_from` or standardised when `fresh`."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = objective.build_model(cfg.preset, cfg.embedding_dim, cfg.text_length, **arch_kwargs(cfg))
    if cfg.init_from and fresh:
        init = load_prior(cfg.init_from)
        if type(init) is not type(model):
            raise ValueError(f"init_from {cfg.init_from}: a {type(init).__name__}, but objective "
                             f"{cfg.objective!r} trains a {type(model).__name__}")
        model.load_state_dict(init.state_dict())  # shapes are checked here: a wrong D fails loudly
    elif objective.standardises and fresh:
        fit_standardisation(model, store, cfg)
    return model


def arch_kwargs(cfg: TrainConfig) -> dict:
    """The config's architecture knobs, as `Objective.build_model` / `training.prior.preset_config` take them."""
    return {"num_layers": cfg.num_layers, "dropout": cfg.dropout, "text_hidden": cfg.text_hidden}


# What a resumed run may not change, and what a checkpoint saved without the key trained with: the loss it
# optimises and the model it trains.
RESUME_FIXED = {"objective": None, "preset": None, "proj_reduction": LEGACY_REDUCTION}


def _check_resumable(ckpt: Path, cfg: TrainConfig, world: Dist) -> None:
    """Refuse to resume `ckpt` with another process count, objective, preset or L_proj reduction."""
    state = json.loads((ckpt / STATE).read_text())
    if state["world_size"] != world.world_size:
        raise RuntimeError(f"{ckpt} was written by {state['world_size']} processes; resume it with the "
                           f"same number (got {world.world_size}) so the data order and noise continue exactly")
    saved = state["config"]
    changed = {k: (saved.get(k, old), getattr(cfg, k)) for k, old in RESUME_FIXED.items()
               if saved.get(k, old) != getattr(cfg, k)}
    if changed:
        was = ", ".join(f"{k}={a!r}" for k, (a, _) in changed.items())
        asked = ", ".join(f"{k}={b!r}" for k, (_, b) in changed.items())
        raise RuntimeError(f"{ckpt}: the checkpoint trained with {was}; this run asks for {asked}. Resume with the "
                           "run's own settings (a bare --resume reads them), or train into another --out. Nothing "
                           "was changed.")


def _resume(ckpt: Path, cfg: TrainConfig, world: Dist, model: torch.nn.Module, optimizer, scheduler,
            gen: torch.Generator) -> _Progress:
    """Load weights, optimizer, scheduler and this rank's noise state from `ckpt` (`_check_resumable` has
    checked it); return its progress."""
    state = json.loads((ckpt / STATE).read_text())
    model.load_state_dict(load_file(ckpt / PRIOR_DIR / WEIGHTS_NAME, device=str(world.device)))
    trainer_state = load_trainer_state(ckpt)
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    _set_rng_state(gen, trainer_state["rng"][world.rank])
    return _Progress(step=state["step"], position=tuple(state["positions"][world.rank]),
                     samples_seen=state["samples_seen"], metrics=state.get("metrics", {}))


def _wrap_for_training(model: torch.nn.Module, cfg: TrainConfig, world: Dist) -> torch.nn.Module:
    """torch.compile and/or DDP around `model` (same parameters); in train mode."""
    train_model = model
    if cfg.compile:
        train_model = torch.compile(train_model)
    if world.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device = world.device
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model.train()
    return train_model


def _open_keys_file(run: _Run):
    if not run.cfg.record_keys:
        return None
    (run.run_dir / LOGS).mkdir(parents=True, exist_ok=True)
    return open(run.run_dir / LOGS / f"keys-rank{run.world.rank}.tsv", "a")


def _train_loader(run: _Run, position: tuple[int, int]) -> StoreLoader:
    """This rank's endless shuffled stream of training batches, starting at `position`."""
    cfg, world = run.cfg, run.world
    return StoreLoader(
        run.store, cfg.batch_size, split="train", heldout_fraction=cfg.heldout_fraction,
        heldout_seed=cfg.heldout_seed, rank=world.rank, world_size=world.world_size, seed=cfg.seed, shuffle=True,
        infinite=True, start=position, buffer_size=cfg.shuffle_buffer, pad_to=run.model.config.num_embeddings,
        prefetch=cfg.prefetch, pin_memory=run.device.type == "cuda", shards=cfg.shards,
        # On a GPU the host sends only the real tokens and the device pads (fewer bytes pinned and copied);
        # on a CPU host and device are one, and padding once on the host is the cheaper of the two.
        pad_on_device=run.device.type == "cuda",
    )


# -- one step, logging, evaluation, checkpoint ----------------------------------------------


def _forward(run: _Run, batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with run.autocast():
        loss, parts = run.objective.loss(run.train_model, batch, run.gen)
    if not torch.isfinite(loss):
        keys = f" (its rows include {list(batch.keys[:8])})" if batch.keys else ""
        raise FloatingPointError(
            f"step {step + 1}: loss is {loss.item()}{keys}; stopping (last checkpoint kept, --resume continues from "
            f"it). A non-finite value in the store (`eclipse-prior store inspect {run.cfg.store}` re-hashes every "
            f"shard) or a diverging run (lower lr) are the usual causes.")
    return loss, parts


def _measure_balance(run: _Run, parts: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """`grad_ratio` of the objective's `balance` terms on this rank's batch; None when not measured."""
    if run.balance_params is None:
        return None
    numerator, denominator = run.objective.balance
    return grad_ratio(parts[numerator], parts[denominator], run.balance_params)


def _update(run: _Run, loss: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Backward, clip, optimizer and scheduler step, EMA; returns (the lr this step used, the gradient norm)."""
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip or math.inf)
    run.optimizer.step()
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update()
    return lr, grad_norm


def _log_train(run: _Run, progress: _Progress, window: LossWindow, log: Logger, bar, *, lr: float,
               grad_norm: torch.Tensor, epoch: int, ratio: torch.Tensor | None, watch: BalanceWatch) -> None:
    # Mean over the window and over ranks; the only host sync outside checkpoints.
    world = run.world
    values = {"loss": world.mean(window.loss / window.steps).item()}
    values |= {k: world.mean(v / window.steps).item() for k, v in window.parts.items()}
    if ratio is not None:  # this step's, not a window mean; the mean over ranks of each rank's ratio
        values[GRAD_RATIO] = world.mean(ratio).item()
    elapsed = time.perf_counter() - window.start
    values |= {"lr": lr, "grad_norm": float(grad_norm),
               "samples_per_s": window.steps * run.global_batch / max(elapsed, 1e-9), "epoch": epoch}
    log.log("train", progress.step, values)
    progress.metrics |= {f"train/{k}": values[k] for k in ("loss", *window.parts, GRAD_RATIO) if k in values}
    side = watch.add(progress.step, values[GRAD_RATIO]) if ratio is not None else None
    if side is not None:
        log.warn(progress.step, balance_warning(run.cfg, run.dim, watch.ratios, progress.step, side))
    bar.set_postfix(loss=f"{values['loss']:.4g}", samples_s=f"{values['samples_per_s']:.0f}")
    window.reset()


def _log_eval(run: _Run, progress: _Progress, log: Logger) -> None:
    if run.world.main:
        model = run.ema.model if run.ema else run.model
        ev = heldout_figures(run.objective, model, run.store, run.cfg, run.device, run.autocast)
        if ev:
            log.log("eval", progress.step, ev)
            progress.metrics |= {f"eval/{k}": v for k, v in ev.items() if k != "rows"}
    run.world.barrier()


def _checkpoint(run: _Run, progress: _Progress) -> None:
    world, cfg, store = run.world, run.cfg, run.store
    rank_states = world.gather({"rng": _rng_state(run.gen), "position": list(progress.position)})
    if world.main:
        state = {
            "step": progress.step, "world_size": world.world_size, "samples_seen": progress.samples_seen,
            "positions": [r["position"] for r in rank_states], "embedding_dim": run.dim,
            "parameters": run.n_params, "metrics": progress.metrics, "config": cfg.to_dict(),
            "encoder": store.encoder.to_dict(), "store_rows": store.num_rows, "time": time.time(),
            "store_shards": list(cfg.shards or store.shards),
        }
        save_checkpoint(run.run_dir, progress.step, run.model, run.ema, run.optimizer, run.scheduler, rank_states,
                        state, cfg.keep_checkpoints)
    world.barrier()
