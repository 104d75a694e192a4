"""Local optimizers (`federation.optimizers`): what a device's steps update its LoRA matrices and
heads with, chosen by name for the run (`local-optimizer`) or per device class by the scenario."""

from __future__ import annotations

import pytest
import torch

from federation.config import RunConfig
from federation.data.sensor import load_sensor_client
from federation.errors import FedgeError
from federation.fleet import device_for_partition
from federation.model.edge import TaskModel, build_task_model
from federation.model.lora import LoraSettings
from federation.optimizers import LOCAL_OPTIMIZERS, trained_lora
from federation.scenarios import Scenario
from federation.training import TrainSettings, _optimizers, train_steps


def _one_step(
    optimizer: str, lr: float, head_lr: float
) -> tuple[TaskModel, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A watch model's parameters before one local step on a fixed batch, and that batch's gradient."""
    data = load_sensor_client("s3a", 0)
    x, y = data.train_x[:16], data.train_y[:16]
    model = build_task_model("sensor", LoraSettings(), 0)
    # B starts at zero, so give it values: the step's size must not depend on where it starts
    with torch.no_grad():
        for p in trained_lora(model):
            p.copy_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad()
    settings = TrainSettings(steps=1, batch_size=16, lr=lr, head_lr=head_lr, optimizer=optimizer)
    train_steps(model, 16, lambda idx: torch.nn.functional.cross_entropy(model(x[idx]), y[idx]), settings, 0)
    moved = {n: before[n] - p.detach() for n, p in params.items()}
    return model, grads, moved


def test_sgd_moves_every_trained_matrix_and_head_by_its_learning_rate_times_its_gradient() -> None:
    model, grads, moved = _one_step("sgd", lr=2.0, head_lr=0.05)
    lora = {n for n, _ in model.named_parameters() if ".lora_B." in n}
    assert lora and any(n.startswith("head.") for n in grads)
    for name, grad in grads.items():
        rate = 2.0 if name in lora else 0.05
        assert torch.allclose(moved[name], rate * grad, rtol=1e-3, atol=1e-6), name
    # A stays frozen (the default rule shares B; A comes from the seed)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)


def test_adamw_steps_every_coordinate_by_about_its_rate_whatever_its_gradient() -> None:
    """Why a device with few steps a round may want SGD: Adam's first step is lr x g/|g|."""
    _, grads, moved = _one_step("adamw", lr=2.0, head_lr=0.05)
    grad = grads["head.classes.weight"].abs().flatten()
    step = moved["head.classes.weight"].abs().flatten()
    nonzero = grad > 1e-6
    assert grad[nonzero].max() / grad[nonzero].min() > 100  # gradients orders of magnitude apart
    assert torch.allclose(step[nonzero], torch.full_like(step[nonzero], 0.05), rtol=0.02)


def test_an_unknown_optimizer_is_refused_naming_the_choices() -> None:
    assert sorted(LOCAL_OPTIMIZERS) == ["adamw", "sgd"]
    with pytest.raises(ValueError, match="local-optimizer must be one of adamw, sgd, got 'adam'"):
        TrainSettings(steps=1, optimizer="adam")
    with pytest.raises(
        FedgeError, match=r"local-optimizer must be one of adamw, sgd, got 'adam'.*local-optimizer"
    ):
        RunConfig.parse({"local-optimizer": "adam"})
    assert RunConfig.parse({"local-optimizer": "sgd"}).train_for("phone").optimizer == "sgd"


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("optimizer", {"toaster": "sgd"}, "optimizer names `toaster`, not a class of its fleet"),
        ("optimizer", {"phone": "adam"}, "optimizer of `phone` must be one of adamw, sgd"),
        ("lr", {"phone": 0}, "lr of `phone` must be a number > 0"),
        ("lr", {"tv": 1.0}, "lr names `tv`, not a class of its fleet"),
    ],
)
def test_a_scenario_names_a_class_its_optimizer_and_rates_or_is_refused(
    field: str, value: dict[str, object], words: str
) -> None:
    with pytest.raises(FedgeError, match=words):
        Scenario("phones", "", {"phone": 2}, {"phone": 1}, 1, {"phone": 1}, **{field: value})


def test_smart_home_trains_a_tv_with_sgd_at_its_own_rates_and_the_rest_with_the_runs() -> None:
    from federation.local import device_settings, task_model

    run = RunConfig.parse({"lr": 0.002, "head-lr": 0.004})
    tv_settings = run.train_for("tv")
    assert tv_settings.optimizer == "sgd"
    assert (tv_settings.lr, tv_settings.head_lr) != (0.002, 0.004)
    phone = run.train_for("phone")
    assert (phone.optimizer, phone.lr, phone.head_lr) == ("adamw", 0.002, 0.004)
    # the watches: AdamW at their own rates (the scenario's), not the run's
    sensor = run.train_for("sensor")
    assert (sensor.optimizer, sensor.lr, sensor.head_lr) == ("adamw", 0.01, 0.01)
    tv = next(
        d for d in (device_for_partition(run.scenario, p, 0) for p in range(40)) if d.device_class == "tv"
    )
    model = task_model(run, "tv")
    head = set(model.head.parameters())
    optimizers = _optimizers(model, device_settings(run, tv))
    # what the TV's local steps update its LoRA matrices and head with
    assert all(isinstance(o, torch.optim.SGD) for o in optimizers)
    rates = {
        ("head" if o.param_groups[0]["params"][0] in head else "lora"): o.param_groups[0]["lr"]
        for o in optimizers
    }
    assert rates == {"lora": pytest.approx(tv_settings.lr), "head": pytest.approx(tv_settings.head_lr)}
