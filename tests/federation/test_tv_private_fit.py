"""The TV viewer's private fit: the MAP estimate of a logistic model on the viewer's own ratings
against the fixed shared item side (`federation.tasks.tv.personalize_tv`), solved to convergence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.local import task_model
from federation.tasks.tv import TV_BIAS_L2, TVModel, personalize_tv
from federation.training import TrainSettings


@pytest.fixture(scope="module")
def tv_model() -> TVModel:
    model = task_model(RunConfig.parse({"scenario": "smart-home"}), "tv")
    assert isinstance(model, TVModel)
    return model


def _ratings(model: TVModel, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Item embeddings at the item side's own scale, and likes that follow one taste direction."""
    gen = torch.Generator().manual_seed(seed)
    items = 0.3 * torch.randn(n, model.user_dim + 1, generator=gen)
    taste = torch.zeros(model.user_dim)
    taste[0] = 3.0
    labels = (torch.rand(n, generator=gen) < torch.sigmoid(items[:, :-1] @ taste)).float()
    return items, labels


def _objective_gradient(
    model: TVModel, user: torch.Tensor, items: torch.Tensor, labels: torch.Tensor, l2: float
) -> torch.Tensor:
    u = user.clone().requires_grad_(True)
    loss = nn.functional.binary_cross_entropy_with_logits(model.score(items, u), labels, reduction="sum")
    loss = loss + l2 * u[:-1].square().sum() + TV_BIAS_L2 * u[-1].square()
    (grad,) = torch.autograd.grad(loss, u)
    return grad


def test_the_fit_is_the_optimum_whatever_the_start(tv_model: TVModel) -> None:
    items, labels = _ratings(tv_model, 80)
    fits = [
        personalize_tv(tv_model, start, items, labels, l2=1.0)
        for start in (
            torch.zeros(tv_model.user_dim + 1),
            tv_model.new_private("7", 3),
            torch.full((17,), 2.0),
        )
    ]
    for user in fits:
        # stationary, to float32 on a sum over 80 ratings (one rating's gradient is ~0.1-1)
        assert _objective_gradient(tv_model, user, items, labels, 1.0).abs().max() < 5e-3
        assert torch.allclose(user, fits[0], atol=1e-3)  # convex: one optimum
    assert fits[0][0] > 0.5  # it found the taste the likes follow


def test_a_viewer_with_no_item_signal_gets_the_bias_the_prior_allows_by_hand(tv_model: TVModel) -> None:
    # all item terms zero: the fit is only the bias b, solving
    # sum_i (sigmoid(b + g) - y_i) + 2 * TV_BIAS_L2 * b = 0, with g the model's global bias
    n, likes = 10, 7
    items = torch.zeros(n, tv_model.user_dim + 1)
    labels = torch.tensor([1.0] * likes + [0.0] * (n - likes))
    user = personalize_tv(tv_model, torch.zeros(tv_model.user_dim + 1), items, labels, l2=1.0)
    g = float(tv_model.head.global_bias.detach())
    b = float(user[-1])
    assert n / (1 + math.exp(-(b + g))) - likes + 2 * TV_BIAS_L2 * b == pytest.approx(0.0, abs=1e-4)
    assert torch.all(user[:-1].abs() < 1e-5)


def test_the_prior_counts_less_against_more_ratings(tv_model: TVModel) -> None:
    items, labels = _ratings(tv_model, 20, seed=1)
    few = personalize_tv(tv_model, torch.zeros(17), items, labels, l2=1.0)
    many = personalize_tv(tv_model, torch.zeros(17), items.repeat(20, 1), labels.repeat(20), l2=1.0)
    assert many[:-1].norm() > 1.5 * few[:-1].norm()  # the same evidence 20 times: further from 0
    stronger = personalize_tv(tv_model, torch.zeros(17), items, labels, l2=10.0)
    assert stronger[:-1].norm() < few[:-1].norm()


def test_a_viewer_who_liked_everything_or_rated_nothing_gets_a_finite_fit(tv_model: TVModel) -> None:
    items, _ = _ratings(tv_model, 30)
    liked_all = personalize_tv(tv_model, torch.zeros(17), items, torch.ones(30), l2=1.0)
    assert torch.isfinite(liked_all).all() and 0 < float(liked_all[-1]) < 20
    nothing = personalize_tv(tv_model, tv_model.new_private("1", 0), items[:0], torch.ones(0), l2=1.0)
    assert torch.allclose(nothing, torch.zeros(17), atol=1e-5)  # the shared side alone: a cold start


def test_private_l2_comes_from_the_run_config_and_must_be_positive() -> None:
    assert RunConfig.parse({"scenario": "smart-home"}).train.private_l2 == pytest.approx(1.0)
    assert RunConfig.parse({"scenario": "smart-home", "private-l2": 3.0}).train.private_l2 == 3.0
    for bad in (0.0, -1.0):
        with pytest.raises(FedgeError, match="private-l2"):
            RunConfig.parse({"scenario": "smart-home", "private-l2": bad})
    with pytest.raises(ValueError, match="private-l2"):
        TrainSettings(steps=1, private_l2=0.0)
