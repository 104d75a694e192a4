"""The sensor's local training under label skew: the softmax runs over the device's own classes
(FedRS restricted softmax), so a watch never pushes down the classes it has no examples of."""

from __future__ import annotations

import torch

from federation.data.sensor import load_sensor_client
from federation.model.edge import build_task_model
from federation.model.lora import LoraSettings
from federation.tasks.sensor import SensorModel, train_sensor
from federation.training import TrainSettings, train_classifier


def _head_rows(model: SensorModel) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.head["out"]
    return out.weight.detach().clone(), out.bias.detach().clone()


def test_a_watch_leaves_the_head_rows_of_classes_it_never_saw_untouched() -> None:
    data = load_sensor_client("s3a", 0)  # trains on exercises 0, 1, 4, 5 only
    present = set(torch.unique(data.train_y).tolist())
    absent = sorted(set(range(7)) - present)
    assert absent, "the test needs a watch with missing exercises"
    model = build_task_model("sensor", LoraSettings(), 0)
    assert isinstance(model, SensorModel)
    weight, bias = _head_rows(model)
    train_sensor(model, data.train_x, data.train_y, TrainSettings(steps=10), seed=0)
    new_weight, new_bias = _head_rows(model)
    for c in absent:  # AdamW without weight decay: no gradient, no step
        assert torch.equal(new_weight[c], weight[c]) and new_bias[c] == bias[c]
    for c in present:
        assert not torch.equal(new_weight[c], weight[c])


def test_the_full_softmax_is_still_the_default_of_train_classifier() -> None:
    data = load_sensor_client("s3a", 0)
    model = build_task_model("sensor", LoraSettings(), 0)
    assert isinstance(model, SensorModel)
    weight, _ = _head_rows(model)
    train_classifier(model, data.train_x, data.train_y, TrainSettings(steps=3), seed=0)
    new_weight, _ = _head_rows(model)
    absent = sorted(set(range(7)) - set(torch.unique(data.train_y).tolist()))
    assert all(not torch.equal(new_weight[c], weight[c]) for c in absent)  # pushed down everywhere
