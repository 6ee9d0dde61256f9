"""Training objectives of the paper (eq. 1, 3, 4, 5) and the diffusion baseline's sampler.

- `projection`: L_proj = E ||z_x - g(eps, z_y)||^2_2                              (eq. 3)
- `eclipse`:    L_proj + lambda * L_CLS;y->x, InfoNCE of each predicted image embedding
                against all ground-truth text embeddings of the batch (cosine / tau)  (eq. 4, 5)
- `diffusion`:  the baseline: diffusers' stock, time-conditioned PriorTransformer of the same
                size, DDPM (1000 linear steps), predicting the clean embedding, text dropped
                for classifier-free guidance                                     (eq. 1)

Eq. 3's reduction over D. The default, `reduction="mean"` (config key `proj_reduction: mean`),
averages the squared error over the D dimensions as well as over the batch (`F.mse_loss`, the
form of every public trainer of this prior family: diffusers' prior training script, pOps). It
departs from the letter of Eq. 3, which sums over D, and follows what the paper says lambda does:
lambda = 0.2 was chosen as the value "balancing knowledge distillation and maintaining alignment",
and "keeping lambda to a very low value cannot do knowledge distillation well enough". Summed
over D, L_proj's gradient is D times larger, so lambda = 0.2 *is* such a low value: the contrastive
term's gradient is about a thousandth of L_proj's (D = 768, 1280) and eclipse trains as projection
(docs/objectives.md, "The objectives and the balance of Eq. 5"; `benchmarks/loss_balance.py`). Under the mean
the two gradients are of one order at lambda = 0.2. The literal form stays as `reduction="sum"` (`proj_reduction: sum`):
the sum at lambda trains as the mean at lambda / D would (up to the loss's overall scale, which
AdamW's update does not follow).

An objective's `loss` returns (total, parts): the parts are the terms the trainer logs, as
tensors still attached to the graph (the trainer detaches what it keeps, and takes the gradient
of each term named by `Objective.balance`): eclipse's `loss_proj` (L_proj) and
`loss_cls_weighted` (lambda * L_CLS; their sum is the total) and `loss_cls` (L_CLS alone, the
InfoNCE: ln B at chance); projection's `loss_proj`; diffusion's `mse_x0`.
"""

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers import PriorTransformer as DiffusionPriorTransformer
from torch import nn

from training.prior import PriorTransformer, preset_config

# The objectives' names, for typed flow parameters (a distinct name: the class `Objective` below is the base).
ObjectiveName = Literal["eclipse", "projection", "diffusion"]
OBJECTIVES: tuple[str, ...] = get_args(ObjectiveName)

# tau: the paper does not state it. 0.07 is CLIP's initial temperature (Radford et al. 2021),
# also the common fixed choice of MoCo/SimCLR-style InfoNCE. Not tuned: the demo's lambda sweeps
# (BENCHMARKS.md) ran at tau 0.07, and no tau sweep has been run.
DEFAULT_TAU = 0.07
DEFAULT_LAMBDA = 0.2
# The names of the loss terms in `parts` (and in logs/train.jsonl and TensorBoard's train/...).
PROJ = "loss_proj"  # L_proj, Eq. 3
CLS = "loss_cls"  # L_CLS;y->x, Eq. 4, unweighted
CLS_WEIGHTED = "loss_cls_weighted"  # lambda * L_CLS: with PROJ, the two terms of Eq. 5
# Eq. 3's reduction over D: "mean" (F.mse_loss) or "sum" (Eq. 3's letter, D times the mean)
Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
DEFAULT_REDUCTION = "mean"  # lambda as the paper means it (module docstring)
LEGACY_REDUCTION = "mean"  # what runs saved before the reduction was recorded trained with (they resume with it)


@dataclass
class PriorBatch:
    """What every objective consumes: fp32 (or autocast) tensors on the training device."""

    image_embed: torch.Tensor  # [B, D] raw CLIP image embeds (the target z_x)
    text_embed: torch.Tensor  # [B, D] raw CLIP text embeds (z_y)
    text_hidden: torch.Tensor  # [B, 77, D] padded last_hidden_state
    text_mask: torch.Tensor  # [B, 77] bool
    keys: list[str] = field(default_factory=list)


# -- the losses, as plain functions (what the tests check by hand) --------------------------


def projection_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = DEFAULT_REDUCTION) -> torch.Tensor:
    """Eq. 3: E ||z_x - zhat_x||^2_2. reduction="mean" (the default): the mean over the batch and the D
    dimensions (`F.mse_loss`); "sum": Eq. 3's letter, the squared L2 norm per sample, then the batch mean."""
    sq = (pred.float() - target.float()).pow(2)
    if reduction == "sum":
        return sq.sum(dim=-1).mean()
    if reduction == "mean":
        return sq.mean()
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")


def contrastive_loss(pred_image: torch.Tensor, text_embed: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Eq. 4: -1/N sum_i log softmax_j(<zhat_x^i, z_y^j> / tau)[i], <,> the cosine similarity.

    Negatives are the other texts of this (per-device) batch, as in the paper's per-GPU batch of 256.
    """
    logits = F.normalize(pred_image.float(), dim=-1) @ F.normalize(text_embed.float(), dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def eclipse_loss(
    pred: torch.Tensor, image_embed: torch.Tensor, text_embed: torch.Tensor,
    lam: float = DEFAULT_LAMBDA, tau: float = DEFAULT_TAU, reduction: str = DEFAULT_REDUCTION,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 5: L_proj + lambda * L_CLS;y->x. Returns the total and its parts, still attached to the
    graph: `loss_proj`, `loss_cls_weighted` (lambda * L_CLS; the total is their sum) and `loss_cls`."""
    proj = projection_loss(pred, image_embed, reduction)
    cls = contrastive_loss(pred, text_embed, tau)
    weighted = lam * cls
    return proj + weighted, {PROJ: proj, CLS_WEIGHTED: weighted, CLS: cls}


def null_text(batch: PriorBatch, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace the text of rows where `drop` is True by the null condition (zeros, no real tokens).

    The null condition is what the sampler uses as "unconditional": it needs no text encoder.
    """
    keep = (~drop).to(batch.text_embed.dtype)
    text_embed = batch.text_embed * keep[:, None]
    text_hidden = batch.text_hidden * keep[:, None, None]
    text_mask = batch.text_mask & ~drop[:, None]
    return text_embed, text_hidden, text_mask


def make_scheduler() -> DDPMScheduler:
    """The paper's baseline: 1000 DDPM steps, linear betas, the model predicts the clean sample.

    Clipping the predicted x0 at 5 standard deviations (in the standardised space) follows the
    Karlo prior's scheduler; the default range of 1 would cut real embeddings.
    """
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        prediction_type="sample", clip_sample=True, clip_sample_range=5.0, variance_type="fixed_small",
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP and torch.compile wrappers (for its attributes, not its forward)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def standardise(model: nn.Module, image_embed: torch.Tensor) -> torch.Tensor:
    base = unwrap(model)
    return (image_embed.float() - base.clip_mean) / base.clip_std


def diffusion_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    batch: PriorBatch,
    generator: torch.Generator | None = None,
    text_drop_prob: float = 0.1,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    drop: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 1: E_t ||x0 - g(x_t, t, z_y)||^2 with x0 the standardised image embedding.

    t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, text dropped with
    probability `text_drop_prob` (classifier-free guidance). `timesteps`, `noise`, `drop`
    may be given explicitly (tests); otherwise drawn from `generator`.
    """
    x0 = standardise(model, batch.image_embed)
    b, device = x0.shape[0], x0.device
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device)
    if drop is None:
        drop = torch.rand(b, generator=generator, device=device) < text_drop_prob
    x_t = scheduler.add_noise(x0, noise, timesteps)
    text_embed, text_hidden, text_mask = null_text(batch, drop)
    pred = model(
        x_t, timesteps, proj_embedding=text_embed, encoder_hidden_states=text_hidden, attention_mask=text_mask
    ).predicted_image_embedding
    loss = F.mse_loss(pred.float(), x0)
    return loss, {"mse_x0": loss}


@torch.no_grad()
def sample_diffusion_prior(
    model: nn.Module,
    text_embed: torch.Tensor,
    text_hidden: torch.Tensor,
    text_mask: torch.Tensor,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    generator: torch.Generator | None = None,
    scheduler: DDPMScheduler | None = None,
) -> torch.Tensor:
    """The paper's inference: 25 DDPM steps (noise added at every step but the last), CFG 4.0.

    Returns raw (un-standardised) image embeddings [B, D].
    """
    scheduler = DDPMScheduler.from_config((scheduler or make_scheduler()).config)  # own step state
    scheduler.set_timesteps(num_inference_steps, device=text_embed.device)
    b = text_embed.shape[0]
    dim = model.config.embedding_dim
    x = torch.randn((b, dim), generator=generator, device=text_embed.device) * scheduler.init_noise_sigma
    drop = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)]).to(text_embed.device)
    both = PriorBatch(
        image_embed=x, text_embed=torch.cat([text_embed, text_embed]).float(),
        text_hidden=torch.cat([text_hidden, text_hidden]).float(), text_mask=torch.cat([text_mask, text_mask]),
    )
    cond_embed, cond_hidden, cond_mask = null_text(both, drop)  # first half unconditional
    for t in scheduler.timesteps:
        pred = model(
            torch.cat([x, x]), t, proj_embedding=cond_embed, encoder_hidden_states=cond_hidden,
            attention_mask=cond_mask,
        ).predicted_image_embedding.float()
        uncond, cond = pred.chunk(2)
        pred = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(pred, t, x, generator=generator).prev_sample
    return model.post_process_latents(x)


# -- objectives as objects the trainer drives ------------------------------------------------


class Objective:
    """Builds its model, computes the training loss, and predicts image embeddings for evaluation.

    What differs between objectives is written here, as class attributes the config, the trainer, the
    cost model and the experiment grids read: nothing outside this module branches on an objective's name.
    """

    name: str = ""
    #: (numerator, denominator): the two parts whose gradient norms the trainer compares at its
    #: logging steps (`training.monitor.grad_ratio`); None for a loss of one term.
    balance: tuple[str, str] | None = None
    #: the fewest rows a batch may have for the loss to mean anything
    min_batch: int = 1
    #: the TrainConfig field an experiment grid sweeps for this objective (columns NAME-VALUE), or None
    sweep_key: str | None = None
    #: its model reads the text hidden states whatever the config's `text_hidden` says
    needs_text_hidden: bool = False
    #: sequence positions beyond the released prior's, for the cost model (`training.cost`)
    extra_tokens: int = 0
    #: a fresh run first fits the model's target standardisation from the store (`training.trainer`)
    standardises: bool = False

    @classmethod
    def create(cls, **kw) -> "Objective":
        """An instance from `make_objective`'s keywords (each class takes the ones it uses)."""
        return cls()

    @classmethod
    def sweep(cls, value: float | None) -> dict:
        """The config override of one grid column: {sweep_key: value}, or {} for an objective without one."""
        return {cls.sweep_key: value} if cls.sweep_key and value is not None else {}

    @classmethod
    def label(cls, value: float | None = None) -> str:
        """A grid column's name: `eclipse-0.2` for a swept value, else the objective's name."""
        return f"{cls.name}-{value:g}" if cls.sweep_key and value is not None else cls.name

    def build_model(self, preset: str, embedding_dim: int | None = None, text_length: int | None = None,
                    **arch) -> nn.Module:
        """The prior; `arch`: `training.prior.preset_config`'s num_layers, dropout, text_hidden."""
        return PriorTransformer(**preset_config(preset, embedding_dim, text_length, **arch))

    def loss(self, model: nn.Module, batch: PriorBatch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """(the loss, its parts): the parts are tensors attached to the graph; detach what you keep."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: PriorBatch, generator: torch.Generator) -> torch.Tensor:
        """Image embeddings as used at inference (one forward pass; the diffusion baseline samples)."""
        return self._forward(model, batch, generator)

    def _forward(self, model, batch, generator) -> torch.Tensor:
        # eps ~ N(0, I) as the prior's "hidden_states" input: g(eps, z_y) of eq. 3.
        noise = torch.randn(batch.image_embed.shape, generator=generator, device=batch.image_embed.device)
        return model(noise, batch.text_embed, batch.text_hidden, batch.text_mask).predicted_image_embedding


class ProjectionObjective(Objective):
    name = "projection"

    def __init__(self, reduction: str = DEFAULT_REDUCTION):
        self.reduction = reduction

    @classmethod
    def create(cls, **kw) -> "ProjectionObjective":
        return cls(kw.get("reduction", DEFAULT_REDUCTION))

    def loss(self, model, batch, generator):
        loss = projection_loss(self._forward(model, batch, generator), batch.image_embed, self.reduction)
        return loss, {PROJ: loss}


class EclipseObjective(Objective):
    name = "eclipse"
    balance = (CLS_WEIGHTED, PROJ)  # the trainer logs ||grad lambda*L_CLS|| / ||grad L_proj||
    min_batch = 2  # InfoNCE's negatives are the other rows of the batch
    sweep_key = "eclipse_lambda"

    def __init__(self, lam: float = DEFAULT_LAMBDA, tau: float = DEFAULT_TAU, reduction: str = DEFAULT_REDUCTION):
        self.lam, self.tau, self.reduction = lam, tau, reduction

    @classmethod
    def create(cls, **kw) -> "EclipseObjective":
        return cls(kw.get("lam", DEFAULT_LAMBDA), kw.get("tau", DEFAULT_TAU), kw.get("reduction", DEFAULT_REDUCTION))

    def loss(self, model, batch, generator):
        pred = self._forward(model, batch, generator)
        return eclipse_loss(pred, batch.image_embed, batch.text_embed, self.lam, self.tau, self.reduction)


class DiffusionObjective(Objective):
    name = "diffusion"
    needs_text_hidden = True  # diffusers' stock prior
    extra_tokens = 1  # the timestep token
    standardises = True  # clip_mean / clip_std of the target

    def __init__(self, text_drop_prob: float = 0.1, num_inference_steps: int = 25, guidance_scale: float = 4.0):
        self.text_drop_prob = text_drop_prob
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.scheduler = make_scheduler()

    @classmethod
    def create(cls, **kw) -> "DiffusionObjective":
        return cls(kw.get("text_drop_prob", 0.1), kw.get("num_inference_steps", 25), kw.get("guidance_scale", 4.0))

    def build_model(self, preset: str, embedding_dim: int | None = None, text_length: int | None = None,
                    **arch) -> nn.Module:
        """diffusers' stock PriorTransformer with the ECLIPSE preset's size, plus its time embedding.

        clip_mean/clip_std standardise the target (set from the data before training); frozen.
        `arch`: num_layers and dropout as for the time-free prior; the stock class always reads the hidden states.
        """
        if not arch.get("text_hidden", True):
            raise ValueError("the diffusion baseline's stock prior always reads the text hidden states "
                             "(text_hidden=False is for the time-free priors)")
        cfg = preset_config(preset, embedding_dim, text_length, **arch)
        cfg["additional_embeddings"] += self.extra_tokens
        model = DiffusionPriorTransformer(**cfg)
        with torch.no_grad():
            model.clip_std.fill_(1.0)
        model.clip_mean.requires_grad_(False)
        model.clip_std.requires_grad_(False)
        return model

    def loss(self, model, batch, generator):
        return diffusion_loss(model, self.scheduler, batch, generator, self.text_drop_prob)

    @torch.no_grad()
    def predict(self, model, batch, generator):
        return sample_diffusion_prior(
            model, batch.text_embed, batch.text_hidden, batch.text_mask, self.num_inference_steps,
            self.guidance_scale, generator, self.scheduler,
        )


# The one registry of objectives: a new one is a class above and a line here (and in ObjectiveName).
OBJECTIVE_TYPES: dict[str, type[Objective]] = {
    c.name: c for c in (EclipseObjective, ProjectionObjective, DiffusionObjective)
}
assert tuple(OBJECTIVE_TYPES) == OBJECTIVES


def objective_type(name: str) -> type[Objective]:
    """The class of objective `name`: what differs about it, without building anything."""
    if name not in OBJECTIVE_TYPES:
        raise ValueError(f"unknown objective {name!r}; choose one of {list(OBJECTIVES)}")
    return OBJECTIVE_TYPES[name]


def make_objective(name: str, **kw) -> Objective:
    reduction = kw.get("reduction", DEFAULT_REDUCTION)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown projection-loss reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    return objective_type(name).create(**kw)
