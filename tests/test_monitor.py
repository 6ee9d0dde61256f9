"""training.monitor: the balance of Eq. 5 (grad_ratio at the output layer), its warning, the loss window."""

import math

import pytest
import torch

from training.config import TrainConfig
from training.monitor import (
    RATIO_CEILING,
    RATIO_FLOOR,
    BalanceWatch,
    LossWindow,
    balance_warning,
    grad_ratio,
    output_layer_params,
)
from training.prior import build_prior


def test_grad_ratio_is_the_ratio_of_each_terms_gradient_at_the_output_layer():
    """Against .grad from one backward per term; the other parameters' .grad and the graph are left alone."""
    torch.manual_seed(0)
    model = build_prior("tiny")
    params = output_layer_params(model)
    assert params == [model.proj_to_clip_embeddings.weight, model.proj_to_clip_embeddings.bias]
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    hidden, mask = torch.randn(8, 77, 32, generator=g), torch.ones(8, 77, dtype=torch.bool)
    pred = model(x, text, hidden, mask).predicted_image_embedding
    a, b = pred.pow(2).sum() * 0.3, (pred - text).abs().sum()
    ratio = grad_ratio(a, b, params)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated

    def norm(loss):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))

    assert float(ratio) == pytest.approx(norm(a) / norm(b), rel=1e-5)


def test_the_watch_warns_once_when_every_early_ratio_stayed_outside_the_range_on_one_side():
    low = BalanceWatch(steps=100, start=0)  # the first 10 % = steps 1..10
    assert [low.add(s, RATIO_FLOOR / 10) for s in (5, 10, 15)] == [None, "low", None]
    high = BalanceWatch(steps=100, start=0)
    assert [high.add(s, RATIO_CEILING * 3) for s in (5, 10, 15)] == [None, "high", None]
    for early in ((RATIO_FLOOR * 2, RATIO_FLOOR / 10), (RATIO_CEILING * 2, RATIO_CEILING / 2), (1.0, 1.0),
                  (RATIO_FLOOR / 10, RATIO_CEILING * 10)):  # one measurement in range, or one on each side
        watch = BalanceWatch(steps=100, start=0)
        assert [watch.add(s, r) for s, r in zip((5, 10), early, strict=True)] == [None, None]
    assert BalanceWatch(steps=100, start=50).add(60, 0.0) is None  # resumed past the window: nothing to judge


def test_the_warning_names_the_setting_the_ratio_and_the_lambda_that_brings_it_into_range():
    cfg = TrainConfig(store="s", out="o", eclipse_lambda=0.2, steps=100, proj_reduction="sum")
    text = balance_warning(cfg, 1280, [0.001, 0.002], 10, "low")
    assert "doing next to nothing" in text and "stayed below 0.01" in text
    assert "lambda = 0.2, D = 1280, proj_reduction = sum (Eq. 3 summed over D)" in text
    assert "max 0.002" in text and "eclipse_lambda ~ 10 to 100" in text  # 0.2 * 0.1 / 0.002, 0.2 / 0.002
    cfg = TrainConfig(store="s", out="o", eclipse_lambda=20, steps=100)
    text = balance_warning(cfg, 64, [40.0, 50.0], 10, "high")
    assert "swamps the projection term" in text and "stayed above 10" in text and "out of the image space" in text
    assert "lambda = 20, D = 64, proj_reduction = mean (Eq. 3 averaged over D)" in text
    assert "min 40" in text and "eclipse_lambda ~ 0.05 to 0.5" in text  # 20 * 0.1 / 40, 20 / 40
    # lambda = 0 (or a term without gradient) measures 0: the warning says no lambda helps, and does not divide by it
    zero = balance_warning(TrainConfig(store="s", out="o", eclipse_lambda=0.0, steps=100), 64, [0.0, 0.0], 10, "low")
    assert "No lambda changes that" in zero and "eclipse_lambda ~" not in zero


def test_the_loss_window_sums_on_the_device_and_drops_the_graph():
    w = LossWindow(torch.device("cpu"))
    x = torch.tensor(2.0, requires_grad=True)
    for _ in range(3):
        w.add(x * 1.5, {"loss_proj": x * 1.0})
    assert (w.steps, float(w.loss), float(w.parts["loss_proj"])) == (3, 9.0, 6.0)
    assert not w.parts["loss_proj"].requires_grad and not w.loss.requires_grad
    w.reset()
    assert (w.steps, float(w.loss), w.parts) == (0, 0.0, {})
