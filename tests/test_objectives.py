"""Each loss against a hand computation on a tiny batch (plain Python math, no torch.nn.functional)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from training.objectives import (
    DEFAULT_LAMBDA,
    DEFAULT_REDUCTION,
    DEFAULT_TAU,
    DiffusionObjective,
    EclipseObjective,
    PriorBatch,
    ProjectionObjective,
    contrastive_loss,
    diffusion_loss,
    eclipse_loss,
    make_scheduler,
    projection_loss,
    sample_diffusion_prior,
)
from training.prior import build_prior

PRED = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
IMAGE = [[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]]
TEXT = [[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]]


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _hand_sq_norm(pred, target):
    """Eq. 3 as written: per row the squared L2 norm (summed over D), then the mean over rows."""
    per_row = [sum((p - t) ** 2 for p, t in zip(pr, tr, strict=True)) for pr, tr in zip(pred, target, strict=True)]
    return sum(per_row) / len(per_row)


def _hand_mse(pred, target):
    sq = [(p - t) ** 2 for pr, tr in zip(pred, target, strict=True) for p, t in zip(pr, tr, strict=True)]
    return sum(sq) / len(sq)


def _hand_infonce(pred, text, tau):
    """Eq. 4: -1/N sum_i log( exp(cos(p_i, t_i)/tau) / sum_j exp(cos(p_i, t_j)/tau) )."""
    total = 0.0
    for i, p in enumerate(pred):
        logits = [_cos(p, t) / tau for t in text]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(pred)


def test_lambda_is_the_papers():
    assert DEFAULT_LAMBDA == 0.2  # the paper: "setting lambda = 0.2"
    assert EclipseObjective().lam == 0.2


def test_tau_is_our_documented_choice_clips_initial_temperature():
    """The paper does not state tau; we use CLIP's initial temperature 0.07 (see training.objectives)."""
    assert DEFAULT_TAU == 0.07 and EclipseObjective().tau == 0.07
    # ... and it is what the loss uses when no tau is passed.
    default = contrastive_loss(torch.tensor(PRED), torch.tensor(TEXT)).item()
    assert default == pytest.approx(_hand_infonce(PRED, TEXT, 0.07), rel=1e-5)
    assert default != pytest.approx(_hand_infonce(PRED, TEXT, 1.0), rel=1e-3)


def test_projection_loss_sum_is_eq3s_letter_over_dimensions_then_the_batch():
    # rows: (1-0)^2 + (0-0)^2 = 1;  (0-1)^2 + (2-2)^2 = 1;  (1-3)^2 + (1+1)^2 = 8  ->  10 / 3 rows
    got = projection_loss(torch.tensor(PRED), torch.tensor(IMAGE), reduction="sum")
    assert _hand_sq_norm(PRED, IMAGE) == pytest.approx(10 / 3)
    assert got.item() == pytest.approx(10 / 3, rel=1e-6)


def test_projection_loss_defaults_to_the_mean_over_d_as_f_mse_loss():
    # 10 over 6 entries, i.e. Eq. 3 / D (D = 2): the default, so that lambda weighs as the paper says
    got = projection_loss(torch.tensor(PRED), torch.tensor(IMAGE))
    assert DEFAULT_REDUCTION == "mean"
    assert got.item() == pytest.approx(10 / 6, rel=1e-6)
    assert got.item() == pytest.approx(_hand_mse(PRED, IMAGE), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        projection_loss(torch.tensor(PRED), torch.tensor(IMAGE), reduction="max")


def test_sum_reduction_scales_with_d_and_mean_does_not():
    # two copies of each row side by side: D doubles, the per-row squared norm doubles
    wide_pred, wide_image = torch.tensor(PRED).repeat(1, 2), torch.tensor(IMAGE).repeat(1, 2)
    assert projection_loss(wide_pred, wide_image, "sum").item() == pytest.approx(20 / 3, rel=1e-6)
    assert projection_loss(wide_pred, wide_image, "mean").item() == pytest.approx(10 / 6, rel=1e-6)


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_contrastive_loss_matches_eq4(tau):
    got = contrastive_loss(torch.tensor(PRED), torch.tensor(TEXT), tau)
    assert got.item() == pytest.approx(_hand_infonce(PRED, TEXT, tau), rel=1e-5)


def test_contrastive_loss_is_scale_free_and_low_for_aligned_predictions():
    text = torch.tensor(TEXT)
    assert contrastive_loss(3 * text, text).item() < contrastive_loss(text.flip(0), text).item()
    assert contrastive_loss(torch.tensor(PRED) * 7, text).item() == pytest.approx(
        contrastive_loss(torch.tensor(PRED), text).item(), rel=1e-5)


def test_eclipse_loss_is_projection_plus_lambda_infonce():
    total, parts = eclipse_loss(torch.tensor(PRED), torch.tensor(IMAGE), torch.tensor(TEXT))
    expected = 10 / 6 + 0.2 * _hand_infonce(PRED, TEXT, 0.07)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert parts["loss_proj"].item() == pytest.approx(_hand_mse(PRED, IMAGE), rel=1e-6)
    assert parts["loss_cls"].item() == pytest.approx(_hand_infonce(PRED, TEXT, 0.07), rel=1e-5)
    assert parts["loss_cls_weighted"].item() == pytest.approx(0.2 * _hand_infonce(PRED, TEXT, 0.07), rel=1e-5)
    sum_total, _ = eclipse_loss(torch.tensor(PRED), torch.tensor(IMAGE), torch.tensor(TEXT), reduction="sum")
    assert sum_total.item() == pytest.approx(10 / 3 + 0.2 * _hand_infonce(PRED, TEXT, 0.07), rel=1e-5)


def test_the_parts_are_the_two_terms_of_eq5_on_the_graph():
    """The trainer logs the parts and takes each term's gradient: they must add up to the loss, bit
    for bit, and stay attached to the prediction's graph."""
    pred = torch.tensor(PRED, requires_grad=True)
    total, parts = eclipse_loss(pred, torch.tensor(IMAGE), torch.tensor(TEXT), lam=3.0)
    assert torch.equal(total, parts["loss_proj"] + parts["loss_cls_weighted"])
    assert torch.equal(parts["loss_cls_weighted"], 3.0 * parts["loss_cls"])
    (g_cls,) = torch.autograd.grad(parts["loss_cls_weighted"], pred, retain_graph=True)
    (g_proj,) = torch.autograd.grad(parts["loss_proj"], pred, retain_graph=True)
    (g_total,) = torch.autograd.grad(total, pred)
    assert torch.allclose(g_cls + g_proj, g_total)
    assert EclipseObjective.balance == ("loss_cls_weighted", "loss_proj")
    assert ProjectionObjective.balance is None and DiffusionObjective.balance is None
    torch.manual_seed(0)
    loss, parts = ProjectionObjective().loss(build_prior("tiny"), _batch(), torch.Generator().manual_seed(5))
    assert set(parts) == {"loss_proj"} and torch.equal(parts["loss_proj"], loss) and parts["loss_proj"].requires_grad


def _batch(d: int = 32, b: int = 4, seed: int = 0) -> PriorBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 77, dtype=torch.bool)
    for i in range(b):
        mask[i, : 3 + 2 * i] = True
    hidden = torch.randn(b, 77, d, generator=g) * mask[..., None]
    return PriorBatch(torch.randn(b, d, generator=g), torch.randn(b, d, generator=g), hidden, mask)


def test_objectives_feed_noise_through_the_prior():
    """projection/eclipse objects = the plain losses applied to g(eps, z_y), eps drawn from the generator."""
    torch.manual_seed(0)
    model, batch = build_prior("tiny"), _batch()
    eps = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    pred = model(eps, batch.text_embed, batch.text_hidden, batch.text_mask).predicted_image_embedding
    loss, _ = ProjectionObjective().loss(model, batch, torch.Generator().manual_seed(5))
    assert loss.item() == pytest.approx(projection_loss(pred, batch.image_embed).item(), rel=1e-6)
    loss, _ = EclipseObjective(lam=0.5, tau=0.2).loss(model, batch, torch.Generator().manual_seed(5))
    assert loss.item() == pytest.approx(eclipse_loss(pred, batch.image_embed, batch.text_embed, 0.5, 0.2)[0].item(),
                                        rel=1e-6)


def test_diffusion_model_is_stock_diffusers_prior_of_the_same_size():
    from diffusers import PriorTransformer as Stock

    with torch.device("meta"):
        model = DiffusionObjective().build_model("kandinsky22")
    assert type(model) is Stock
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.num_layers, cfg.embedding_dim) == (16, 32, 10, 1280)
    assert cfg.additional_embeddings == 4  # text embedding, time, noisy embedding, prd
    sched = make_scheduler().config
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.prediction_type) == (1000, "linear", "sample")


def test_diffusion_loss_matches_hand_computation():
    torch.manual_seed(0)
    objective = DiffusionObjective()
    model = objective.build_model("tiny")
    with torch.no_grad():
        model.clip_mean.fill_(0.5)
        model.clip_std.fill_(2.0)
    batch = _batch()
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    drop = torch.tensor([False, True, False, True])
    loss, _ = diffusion_loss(model, objective.scheduler, batch, timesteps=t, noise=noise, drop=drop)

    # By hand: linear betas from 1e-4 to 0.02 over 1000 steps, abar_t = prod_{s<=t} (1 - beta_s).
    betas = [1e-4 + s * (0.02 - 1e-4) / 999 for s in range(1000)]
    abar, running = [], 1.0
    for beta in betas:
        running *= 1 - beta
        abar.append(running)
    x0 = (batch.image_embed.double() - 0.5) / 2.0
    x_t = torch.stack([math.sqrt(abar[int(ti)]) * x0[i] + math.sqrt(1 - abar[int(ti)]) * noise[i].double()
                       for i, ti in enumerate(t)]).float()
    keep = (~drop).float()
    text_embed = batch.text_embed * keep[:, None]  # dropped rows: the null condition (zeros, no real tokens)
    hidden = batch.text_hidden * keep[:, None, None]
    mask = batch.text_mask & ~drop[:, None]
    assert not mask[1].any() and mask[0].sum() == 3
    pred = model(x_t, t, proj_embedding=text_embed, encoder_hidden_states=hidden, attention_mask=mask)
    expected = _hand_mse(pred.predicted_image_embedding.tolist(), x0.float().tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_diffusion_loss_draws_timesteps_noise_and_dropout_from_the_generator():
    torch.manual_seed(0)
    objective = DiffusionObjective(text_drop_prob=0.5)
    model, batch = objective.build_model("tiny"), _batch()
    a = objective.loss(model, batch, torch.Generator().manual_seed(3))[0]
    b = objective.loss(model, batch, torch.Generator().manual_seed(3))[0]
    c = objective.loss(model, batch, torch.Generator().manual_seed(4))[0]
    assert a.item() == b.item() != c.item()


def test_sampler_with_guidance_one_equals_a_hand_written_conditional_ddpm_loop():
    """25 DDPM steps; with guidance 1 the CFG mix is the conditional prediction, so a plain loop must agree."""
    torch.manual_seed(0)
    model = DiffusionObjective().build_model("tiny").eval()
    with torch.no_grad():
        model.clip_mean.fill_(0.25)
        model.clip_std.fill_(3.0)
    batch = _batch(b=2)
    got = sample_diffusion_prior(model, batch.text_embed, batch.text_hidden, batch.text_mask, 25, 1.0,
                                 torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    sched = DDPMScheduler.from_config(make_scheduler().config)
    sched.set_timesteps(25)
    assert len(sched.timesteps) == 25
    x = torch.randn(2, 32, generator=gen)
    with torch.no_grad():
        for t in sched.timesteps:
            pred = model(x, t, proj_embedding=batch.text_embed, encoder_hidden_states=batch.text_hidden,
                         attention_mask=batch.text_mask).predicted_image_embedding
            x = sched.step(pred, t, x, generator=gen).prev_sample
    assert torch.allclose(got, x * 3.0 + 0.25, atol=1e-4)


def test_sampler_guidance_changes_the_result_and_is_seeded():
    torch.manual_seed(0)
    model = DiffusionObjective().build_model("tiny").eval()
    batch = _batch(b=2)
    args = (model, batch.text_embed, batch.text_hidden, batch.text_mask)
    a = sample_diffusion_prior(*args, generator=torch.Generator().manual_seed(1))
    b = sample_diffusion_prior(*args, generator=torch.Generator().manual_seed(1))
    c = sample_diffusion_prior(*args, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
