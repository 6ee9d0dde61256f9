"""The training loop: one function, nanoGPT-style, single process or torchrun (DDP).

    train(config) -> RUN/prior

What it does, in order: refuse a store that does not fit the prior (before touching the run
folder); build the model (same seed on every rank); resume from the newest complete
checkpoint if asked; stream batches from the store; AdamW + CosineAnnealingWarmRestarts
(stepped per iteration), bf16 autocast on GPU, gradient clipping, optional EMA and
torch.compile; JSONL + TensorBoard logs and a tqdm bar on rank 0; atomic checkpoints every
`ckpt_every` steps; evaluation on the held-out split; finally export RUN/prior.

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
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from storage_schema import IMAGE_EMBED, EmbeddingStore, StoreError
from storage_schema.atomic import atomic_write_text, fsync_path
from training.config import CONFIG_NAME, TrainConfig
from training.data import StoreLoader, check_store_dims, is_heldout
from training.export import (
    CHECKPOINTS,
    COMPLETE,
    EMA_DIR,
    LATEST,
    PRIOR_DIR,
    STATE,
    TRAINER_STATE,
    WEIGHTS_NAME,
    complete_checkpoints,
    export_checkpoint,
    latest_checkpoint,
)
from training.objectives import Objective, make_objective, unwrap
from training.prior import count_parameters, load_prior, preset_config

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
    """Write checkpoint `step` atomically: temp folder, fsync, COMPLETE marker last, rename, pointer."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp / PRIOR_DIR, safe_serialization=True)
    if ema is not None:
        ema.model.save_pretrained(tmp / EMA_DIR, safe_serialization=True)
    # Plain tensors, ints, floats, lists and dicts only: loadable with torch.load(weights_only=True).
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": [r["rng"] for r in rank_states]}, tmp / TRAINER_STATE)
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    (tmp / COMPLETE).write_text(f"{step}\n")
    fsync_path(tmp / COMPLETE)
    fsync_path(tmp)
    final = root / name
    if final.exists():  # the same step saved again (e.g. the final step of a resumed, finished run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    atomic_write_text(root / LATEST, name)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)


# -- logging --------------------------------------------------------------------------------


class Logger:
    """JSONL + TensorBoard, rank 0 only. On resume, drops records past the checkpoint step."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.path = logs / "train.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")
        # purge_step hides events a killed run wrote past the checkpoint
        self.tb = SummaryWriter(str(logs / "tb"), purge_step=(resume_step + 1) if resume_step is not None else None)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"type": kind, "step": step, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "time"):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


# -- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(objective: Objective, model: torch.nn.Module, store: EmbeddingStore, cfg: TrainConfig,
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
            if len(raw) < 2 and cfg.objective == "eclipse":
                continue  # a contrastive loss needs at least two rows
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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # nanoGPT's rule: decay matrices and embeddings, not biases or norm gains.
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def train(config: TrainConfig | dict) -> Path:
    """Train a prior as configured; return the exported prior folder RUN/prior."""
    cfg = (TrainConfig.from_dict(config) if isinstance(config, dict) else config).validate()
    run_dir = Path(cfg.out)

    # Refuse a store that does not fit, before creating anything.
    store = EmbeddingStore(cfg.store)
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


def _train(cfg: TrainConfig, store: EmbeddingStore, dim: int, run_dir: Path, world: Dist) -> Path:
    device = world.device
    unknown = sorted(set(cfg.shards or []) - set(store.shards))
    if unknown:
        raise StoreError(f"{store.dir}: config names shards the store does not have: {unknown}")
    if len(cfg.shards or store.shards) < world.world_size:
        raise StoreError(f"{store.dir}: {len(store.shards)} shards cannot feed {world.world_size} processes "
                         f"(ranks read disjoint shards); write more, smaller shards")
    if device.type == "cpu":
        torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // world.local_world))
    else:
        torch.set_float32_matmul_precision("high")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    resume_from = latest_checkpoint(run_dir) if cfg.resume else None
    if not cfg.resume and complete_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir}: run folder already has checkpoints; pass --resume to continue it "
                              f"or choose another --out")
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / CHECKPOINTS).glob(".tmp-*"):  # left by a killed checkpoint write
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write_text(run_dir / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=1))
    world.barrier()

    objective = make_objective(cfg.objective, lam=cfg.eclipse_lambda, tau=cfg.eclipse_tau, reduction=cfg.proj_reduction,
                               text_drop_prob=cfg.text_drop_prob, num_inference_steps=cfg.inference_steps,
                               guidance_scale=cfg.guidance_scale)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = objective.build_model(cfg.preset, cfg.embedding_dim, cfg.text_length)
    if cfg.init_from and resume_from is None:
        init = load_prior(cfg.init_from)
        if type(init) is not type(model):
            raise ValueError(f"init_from {cfg.init_from}: a {type(init).__name__}, but objective "
                             f"{cfg.objective!r} trains a {type(model).__name__}")
        model.load_state_dict(init.state_dict())  # shapes are checked here: a wrong D fails loudly
    elif cfg.objective == "diffusion" and resume_from is None:
        fit_standardisation(model, store, cfg)
    model.to(device)
    n_params = count_parameters(model)

    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=cfg.sched_t0 or cfg.steps, T_mult=cfg.sched_t_mult, eta_min=cfg.sched_eta_min)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + world.rank)  # per-rank noise

    step, position, samples_seen, metrics = 0, (0, 0), 0, {}
    if resume_from is not None:
        state = json.loads((resume_from / STATE).read_text())
        if state["world_size"] != world.world_size:
            raise RuntimeError(f"{resume_from} was written by {state['world_size']} processes; resume it with the "
                               f"same number (got {world.world_size}) so the data order and noise continue exactly")
        if (state["config"]["objective"], state["config"]["preset"]) != (cfg.objective, cfg.preset):
            raise RuntimeError(f"{resume_from}: checkpoint is {state['config']['objective']}/"
                               f"{state['config']['preset']}, config asks for {cfg.objective}/{cfg.preset}")
        model.load_state_dict(load_file(resume_from / PRIOR_DIR / WEIGHTS_NAME, device=str(device)))
        trainer_state = load_trainer_state(resume_from)
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        _set_rng_state(gen, trainer_state["rng"][world.rank])
        step, samples_seen, metrics = state["step"], state["samples_seen"], state.get("metrics", {})
        position = tuple(state["positions"][world.rank])
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and resume_from is not None:
        ema.model.load_state_dict(load_file(resume_from / EMA_DIR / WEIGHTS_NAME, device=str(device)))

    train_model: torch.nn.Module = model
    if cfg.compile:
        train_model = torch.compile(train_model)
    if world.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model.train()

    log = Logger(run_dir, world.main, step if resume_from is not None else None)
    if world.main:
        print(f"training {cfg.objective} prior ({cfg.preset}, D={dim}, {n_params:,} parameters) on {store.dir} "
              f"({store.num_rows} rows), {world.world_size} x {device.type}, "
              f"{'resuming at step ' + str(step) if resume_from else 'from scratch'}", file=sys.stderr)
    keys_file = None
    if cfg.record_keys:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        keys_file = open(run_dir / "logs" / f"keys-rank{world.rank}.tsv", "a")

    loader = StoreLoader(
        store, cfg.batch_size, split="train", heldout_fraction=cfg.heldout_fraction, heldout_seed=cfg.heldout_seed,
        rank=world.rank, world_size=world.world_size, seed=cfg.seed, shuffle=True, infinite=True, start=position,
        buffer_size=cfg.shuffle_buffer, pad_to=model.config.num_embeddings, prefetch=cfg.prefetch,
        pin_memory=device.type == "cuda", shards=cfg.shards, pad_on_device=True,  # ~4x fewer host bytes per batch
    )
    batches = iter(loader)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not (world.main and cfg.progress), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    global_batch = cfg.batch_size * world.world_size
    loss_sum = torch.zeros((), device=device)
    parts_sum: dict[str, torch.Tensor] = {}
    window_steps, window_start = 0, time.perf_counter()
    try:
        nxt = next(batches) if step < cfg.steps else None
        batch = nxt.to(device, non_blocking=True) if nxt is not None else None
        while step < cfg.steps:
            raw = nxt
            with autocast():
                loss, parts = objective.loss(train_model, batch, gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step + 1}: loss is {loss.item()}; stopping (last checkpoint kept)")
            # Read the next batch while backward runs (the copy is asynchronous from pinned memory).
            nxt = next(batches) if step + 1 < cfg.steps else None
            next_batch = nxt.to(device, non_blocking=True) if nxt is not None else None
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            if keys_file is not None:
                keys_file.write("".join(f"{raw.epoch}\t{k}\n" for k in raw.keys))
            step += 1
            samples_seen += global_batch
            position = (raw.epoch, raw.index + 1)  # the next batch to read, on this rank
            batch = next_batch
            loss_sum += loss.detach()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v
            window_steps += 1
            bar.update(1)

            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                # Mean over the window and over ranks; the only host sync outside checkpoints.
                values = {"loss": world.mean(loss_sum / window_steps).item()}
                values |= {k: world.mean(v / window_steps).item() for k, v in parts_sum.items()}
                elapsed = time.perf_counter() - window_start
                values |= {"lr": lr, "grad_norm": float(grad_norm),
                           "samples_per_s": window_steps * global_batch / max(elapsed, 1e-9), "epoch": raw.epoch}
                log.log("train", step, values)
                metrics |= {f"train/{k}": values[k] for k in ("loss", *parts_sum)}
                bar.set_postfix(loss=f"{values['loss']:.4g}", samples_s=f"{values['samples_per_s']:.0f}")
                loss_sum.zero_()
                parts_sum = {}
                window_steps, window_start = 0, time.perf_counter()
            if last or (cfg.eval_every and step % cfg.eval_every == 0):
                if world.main:
                    ev = evaluate(objective, ema.model if ema else model, store, cfg, device, autocast)
                    if ev:
                        log.log("eval", step, ev)
                        metrics |= {f"eval/{k}": v for k, v in ev.items() if k != "rows"}
                world.barrier()
            if last or step % cfg.ckpt_every == 0:
                rank_states = world.gather({"rng": _rng_state(gen), "position": list(position)})
                if world.main:
                    state = {
                        "step": step, "world_size": world.world_size, "samples_seen": samples_seen,
                        "positions": [r["position"] for r in rank_states], "embedding_dim": dim,
                        "parameters": n_params, "metrics": metrics, "config": cfg.to_dict(),
                        "encoder": store.encoder.to_dict(), "store_rows": store.num_rows, "time": time.time(),
                        "store_shards": list(cfg.shards or store.shards),
                    }
                    save_checkpoint(run_dir, step, model, ema, optimizer, scheduler, rank_states, state,
                                    cfg.keep_checkpoints)
                world.barrier()
    finally:
        bar.close()
        batches.close()
        log.close()
        if keys_file is not None:
            keys_file.close()

    out = run_dir / "prior"
    if world.main:
        export_checkpoint(run_dir, out)
        print(f"exported prior to {out}", file=sys.stderr)
    world.barrier()
    return out
