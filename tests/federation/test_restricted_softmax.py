"""The sensor's local training under label skew: FedRS's restricted softmax scales the logits of
the classes a device has no examples of by alpha (`absent-class-scale`), so a watch pushes down
the exercises it never recorded less (alpha = 0: not at all; 1: the full softmax)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from federation.config import RunConfig
from federation.data.sensor import load_sensor_client
from federation.errors import FedgeError
from federation.model.edge import build_task_model
from federation.model.lora import LoraSettings
from federation.tasks.sensor import SensorModel, train_sensor
from federation.training import TrainSettings, restricted_logits, train_classifier


def _head_rows(model: SensorModel) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.head["classes"]
    return out.weight.detach().clone(), out.bias.detach().clone()


def _watch() -> tuple[object, list[int], list[int]]:
    data = load_sensor_client("s3a", 0)  # trains on exercises 0, 1, 4, 5 only
    present = sorted(set(torch.unique(data.train_y).tolist()))
    absent = sorted(set(range(7)) - set(present))
    assert absent, "the test needs a watch with missing exercises"
    return data, present, absent


def test_restricted_logits_scale_only_the_absent_columns_by_hand() -> None:
    logits = torch.tensor([[2.0, -1.0, 4.0, 0.5], [1.0, 3.0, -2.0, -6.0]])
    out = restricted_logits(logits, torch.tensor([0, 2]), 0.5)
    assert torch.equal(out, torch.tensor([[2.0, -0.5, 4.0, 0.25], [1.0, 1.5, -2.0, -3.0]]))
    # the loss the device minimises, by hand for the first row with label 0:
    # -log(e^2 / (e^2 + e^-0.5 + e^4 + e^0.25))
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(-0.5) + math.exp(4) + math.exp(0.25)))
    got = torch.nn.functional.cross_entropy(out[:1], torch.tensor([0]))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_leaves_the_head_rows_of_classes_a_watch_never_saw_untouched() -> None:
    data, present, absent = _watch()
    model = build_task_model("sensor", LoraSettings(), 0)
    assert isinstance(model, SensorModel)
    weight, bias = _head_rows(model)
    settings = TrainSettings(steps=10, absent_class_scale=0.0)
    train_sensor(model, data.train_x, data.train_y, settings, seed=0)
    new_weight, new_bias = _head_rows(model)
    for c in absent:  # the absent logits are 0 x (w_c . h + b_c): no gradient, and AdamW has no decay
        assert torch.equal(new_weight[c], weight[c]) and new_bias[c] == bias[c]
    for c in present:
        assert not torch.equal(new_weight[c], weight[c])


def _absent_rows_after(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    data, _, absent = _watch()
    model = build_task_model("sensor", LoraSettings(), 0)
    assert isinstance(model, SensorModel)
    weight, _ = _head_rows(model)
    train_sensor(model, data.train_x, data.train_y, TrainSettings(steps=3, absent_class_scale=alpha), seed=0)
    return weight[absent], _head_rows(model)[0][absent]


def test_the_default_alpha_trains_absent_rows_differently_from_the_full_softmax() -> None:
    default = TrainSettings(steps=1).absent_class_scale
    assert 0.0 < default < 1.0  # the sensor trains with FedRS by default
    before, restricted = _absent_rows_after(default)
    _, full = _absent_rows_after(1.0)
    # Under AdamW a row's step is normalised per parameter, so alpha acts mostly through the
    # softmax itself (absent classes take less probability), not as a smaller step: the absent
    # rows still move, but not as the full softmax moves them.
    assert not torch.equal(restricted, before)
    assert not torch.allclose(restricted, full, atol=1e-6)


def test_alpha_one_is_the_full_softmax_bit_for_bit() -> None:
    data, _, _ = _watch()
    x, y = data.train_x, data.train_y
    full = TrainSettings(steps=3, absent_class_scale=1.0)
    heads = []
    for train in (
        lambda m: train_sensor(m, x, y, full, 0),
        lambda m: train_classifier(m, x, y, TrainSettings(steps=3), 0, label_smoothing=0.1),
    ):
        model = build_task_model("sensor", LoraSettings(), 0)
        train(model)
        heads.append(_head_rows(model))  # type: ignore[arg-type]
    assert torch.equal(heads[0][0], heads[1][0]) and torch.equal(heads[0][1], heads[1][1])


def test_the_run_config_carries_alpha_to_the_devices_and_refuses_a_bad_one() -> None:
    run = RunConfig.parse({"scenario": "smoke", "absent-class-scale": 0.25})
    assert run.train.absent_class_scale == 0.25
    for bad in (1.5, -0.1):
        with pytest.raises(FedgeError, match="absent-class-scale"):
            RunConfig.parse({"scenario": "smoke", "absent-class-scale": bad})
    with pytest.raises(ValueError, match="absent-class-scale"):
        dataclasses.replace(run.train, absent_class_scale=2.0)
