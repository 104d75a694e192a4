"""Learning-rate decay over a run (`federation.lr_schedule`, `lr-final`, `Scenario.lr_final`): a
device trains round t at the cosine curve's value for t, constant over the round; one call that
trains alone (the references) follows the curve over its steps; the private part keeps its rate."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import pytest
import torch

from federation import training
from federation.config import RunConfig
from federation.errors import FedgeError
from federation.fleet import device_for_partition, load_device_data
from federation.local import device_settings
from federation.lr_schedule import check_final, cosine, round_factor, step_factor
from federation.scenarios import get_scenario


def test_the_curve_by_hand() -> None:
    assert cosine(0.0, 0.1) == 1.0 and cosine(1.0, 0.1) == pytest.approx(0.1)
    assert cosine(0.5, 0.1) == pytest.approx(0.55)  # halfway: the mean of 1 and final
    assert cosine(0.25, 0.2) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    # rounds: 1 in round 1, final in round T and after it (a resumed run for more rounds)
    by_round = [round(round_factor(t, 5, 0.2), 6) for t in (1, 2, 3, 4, 5, 6)]
    assert by_round == [1.0, 0.882843, 0.6, 0.317157, 0.2, 0.2]
    assert round_factor(1, 1, 0.1) == 1.0 and step_factor(0, 1, 0.1) == 1.0  # nothing to decay over
    assert [step_factor(s, 3, 0.5) for s in range(3)] == [1.0, 0.75, 0.5]
    assert all(round_factor(t, 12, 1.0) == 1.0 for t in range(1, 13))  # 1: constant
    factors = [round_factor(t, 12, 0.1) for t in range(1, 13)]
    assert all(a > b for a, b in itertools.pairwise(factors))


@pytest.mark.parametrize("final", [0.0, -0.5, 1.5, True, "0.1", math.nan])
def test_a_final_outside_zero_one_is_refused(final: Any) -> None:
    assert check_final(final) is not None
    with pytest.raises(ValueError, match="lr-final"):
        cosine(0.5, final)


@pytest.mark.parametrize("final", [1.5, 0.0, -0.1])
def test_the_run_config_refuses_it_by_name(final: float) -> None:
    with pytest.raises(FedgeError, match="lr-final"):
        RunConfig.parse({"lr-final": final})


def test_a_scenario_names_a_class_of_its_fleet_and_a_fraction() -> None:
    base = get_scenario("smoke")
    with pytest.raises(FedgeError, match="lr_final names `tablet`, not a class of its fleet"):
        dataclasses.replace(base, lr_final={"tablet": 0.1})
    with pytest.raises(FedgeError, match=r"lr_final of `sensor` must lie in \(0, 1\]"):
        dataclasses.replace(base, lr_final={"sensor": 0.0})


def _sensor(run: RunConfig, task: str = "sensor") -> Any:
    devices = (device_for_partition(run.scenario, p, run.seed) for p in range(run.scenario.size))
    return next(d for d in devices if d.task == task)


def test_a_device_trains_its_rounds_point_of_the_curve_at_a_constant_rate() -> None:
    run = RunConfig.parse({"scenario": "smoke", "lr-final": 0.1, "num-rounds": 12})
    device = _sensor(run)
    base = run.train_for("sensor")
    assert base.lr_final == 0.1
    first, last = (device_settings(run, device, server_round=t) for t in (1, 12))
    assert (first.lr, first.head_lr) == (base.lr, base.head_lr)
    assert (last.lr, last.head_lr) == pytest.approx((0.1 * base.lr, 0.1 * base.head_lr))
    assert first.lr_final == last.lr_final == 1.0  # within the round: constant
    assert first.private_lr == last.private_lr == base.private_lr
    # without a round (a device trained alone, the local-only reference): the whole curve
    assert device_settings(run, device).lr_final == 0.1 and device_settings(run, device).lr == base.lr
    # without lr-final: constant rates in every round
    plain = RunConfig.parse({"scenario": "smoke"})
    assert device_settings(plain, device, server_round=12).lr == plain.train_for("sensor").lr


def test_the_default_decays_the_watches_alone() -> None:
    run = RunConfig.parse({})
    sensor = _sensor(run)
    phone = _sensor(run, "phone")
    assert device_settings(run, sensor, server_round=1).lr == pytest.approx(0.01)
    assert device_settings(run, sensor, server_round=run.rounds).lr == pytest.approx(0.2 * 0.01)
    assert device_settings(run, sensor, server_round=run.rounds).head_lr == pytest.approx(0.2 * 0.01)
    last, first = (device_settings(run, phone, server_round=t) for t in (run.rounds, 1))
    assert last.lr == first.lr


def test_a_scenario_decays_one_class_and_leaves_the_others(tmp_path: Any) -> None:
    run = RunConfig.parse({"scenario": "smart-home"})
    scenario = dataclasses.replace(run.scenario, lr_final={"sensor": 0.5})
    run = dataclasses.replace(run, scenario=scenario)
    assert run.train_for("sensor").lr_final == 0.5 and run.train_for("phone").lr_final == 1.0
    # a class's own setting wins over the run's
    assert RunConfig.parse({"lr-final": 0.3}).train_for("sensor").lr_final == 0.2
    assert RunConfig.parse({"lr-final": 0.3}).train_for("phone").lr_final == 0.3
    (tmp_path / "decay.toml").write_text(
        '[scenario]\nname = "decay"\ndescription = "d"\nfleet = { "sensor/low" = 4 }\n'
        "per_round = { sensor = 2 }\nrounds = 3\nlocal_steps = { sensor = 5 }\nlr_final = { sensor = 0.3 }\n"
    )
    loaded = RunConfig.parse({"scenario": str(tmp_path / "decay.toml")})
    assert loaded.train_for("sensor").lr_final == 0.3


def test_one_call_follows_the_curve_over_its_steps_and_the_private_rate_stays(monkeypatch: Any) -> None:
    run = RunConfig.parse({"scenario": "smoke", "lr-final": 0.25})
    device = _sensor(run)
    data = load_device_data(device, run.seed, run.seq_len)
    seen: list[list[float]] = []

    def record(optimizers: list[torch.optim.Optimizer], loss: torch.Tensor) -> None:
        seen.append([group["lr"] for opt in optimizers for group in opt.param_groups])
        step(optimizers, loss)

    step = training._step
    monkeypatch.setattr(training, "_step", record)
    from federation.local import task_model

    settings = dataclasses.replace(device_settings(run, device, data), steps=5)
    model = task_model(run, "sensor", device.rank)
    private = torch.nn.Parameter(torch.zeros(3))
    extra = torch.optim.SGD([private], lr=0.7)

    def loss(_idx: torch.Tensor) -> torch.Tensor:
        return sum((p**2).sum() for p in model.parameters() if p.requires_grad) + (private**2).sum()

    training.train_steps(model, 64, loss, settings, 0, extra_optimizers=[extra])
    assert len(seen) == 5
    *scheduled, own = zip(*seen, strict=True)
    assert all(rate == 0.7 for rate in own)  # the private part's rate is not decayed
    for rates in scheduled:
        start = rates[0]
        assert [r / start for r in rates] == pytest.approx([step_factor(s, 5, 0.25) for s in range(5)])
