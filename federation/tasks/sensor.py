"""The sensor task: exercise recognition on a smartwatch's IMU (accelerometer + gyroscope).

Data: seglearn's watch recordings, one client per subject half (`federation.data.sensor`);
held-out: whole recordings. Model: the compact pretrained IMU encoder (a 1D-CNN; a sensor's
model must fit a sensor), LoRA on its conv and projection layers, a linear head
(`federation.model.edge.SensorModel`). Metrics: accuracy and macro-F1; baseline: the majority
exercise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from federation.data.sensor import N_CLASSES
from federation.metrics import macro_f1_from_confusion
from federation.model.edge import TaskModel, seeded_init
from federation.model.lora import LoraSettings, wrap_with_lora
from federation.tasks.base import Sums, Task, TaskInfo
from federation.training import TrainResult, TrainSettings, eval_classifier, train_classifier

if TYPE_CHECKING:
    from federation.config import RunConfig

SENSOR_LORA_TARGETS: tuple[str, ...] = ("conv2", "conv3", "proj")
SENSOR_LABEL_SMOOTHING = 0.1


class SensorModel(TaskModel):
    """Exercise recognition: pretrained IMU encoder + LoRA, linear head."""

    task = "sensor"

    def __init__(
        self, lora: LoraSettings, seed: int, n_classes: int = N_CLASSES, rank: int | None = None
    ) -> None:
        super().__init__()
        from federation.model.imu import FEATURES, load_imu_encoder

        rank = lora.rank if rank is None else rank
        settings = LoraSettings(rank=lora.rank, alpha=lora.alpha, targets=SENSOR_LORA_TARGETS)
        self.backbone = wrap_with_lora(load_imu_encoder(), settings, seed, "sensor", rank)
        self._init_rank(settings, seed, rank)
        # The frozen encoder's features are large (tens) and uncalibrated for a fresh head:
        # normalising them first keeps the first rounds' logits sane. `classes`: one output row
        # per exercise, which the default rule averages class by class (Task.classes_held).
        self.head = nn.ModuleDict({"norm": nn.LayerNorm(FEATURES), "classes": nn.Linear(FEATURES, n_classes)})
        seeded_init(self.head, seed, "sensor-head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head["classes"](self.head["norm"](self.backbone(x)))


def train_sensor(
    model: SensorModel, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings, seed: int
) -> TrainResult:
    # Label smoothing: a watch's few recordings make its head overconfident on other wearers'
    # recordings; with 0.1 the smart-home held-out loss after 12 rounds went 1.40 -> 1.04 and
    # accuracy 0.59 -> 0.62 (one seed, in-process FedAvg of the fleet).
    # Each watch holds 3-5 of the 7 exercises: FedRS's restricted softmax (settings'
    # absent_class_scale) lets the exercises a watch never recorded take less probability.
    return train_classifier(
        model, x, y, settings, seed, label_smoothing=SENSOR_LABEL_SMOOTHING,
        absent_class_scale=settings.absent_class_scale,
    )  # fmt: skip


def eval_sensor(
    model: SensorModel, x: torch.Tensor, y: torch.Tensor, n_classes: int = N_CLASSES
) -> dict[str, float | list[float]]:
    return eval_classifier(model, x, y, n_classes)


class SensorTask(Task):
    info = TaskInfo(
        name="sensor",
        description="exercise recognition from 2 s watch IMU windows, one device per subject half",
        metrics=("accuracy", "macro_f1"),
        primary_metric="accuracy",
        flops_per_example=15e6,  # the IMU CNN on one 2 s window, forward + backward (devices.toml)
        eval_cap=100_000,  # windows: the whole held-out set of any fleet
    )

    def clients(self, cache: Path | None) -> Sequence[str]:
        from federation.data.sensor import sensor_clients

        return sensor_clients()

    def load_client(self, client_id: str, seed: int, *, seq_len: int, cache: Path | None) -> Any:
        from federation.data.sensor import load_sensor_client

        return load_sensor_client(client_id, seed)

    def build_model(self, lora: LoraSettings, seed: int, rank: int, run: RunConfig | None) -> TaskModel:
        return SensorModel(lora, seed, rank=rank)

    def train(
        self,
        model: TaskModel,
        data: Any,
        settings: TrainSettings,
        seed: int,
        *,
        client_id: str,
        run: RunConfig,
        private: np.ndarray | None,
    ) -> tuple[TrainResult, np.ndarray | None]:
        return train_sensor(model, data.train_x, data.train_y, settings, seed), None  # type: ignore[arg-type]

    def classes_held(self, data: Any) -> np.ndarray:
        # a watch records 3-5 of the 7 exercises: its head rows for the others are not its to move
        return np.bincount(data.train_y.numpy(), minlength=N_CLASSES)[:N_CLASSES] > 0

    def train_size(self, data: Any) -> int:
        return len(data.train_y)  # the watch's training windows

    def evaluate(
        self, model: TaskModel, data: Any, *, client_id: str, run: RunConfig, private: np.ndarray | None
    ) -> Sums:
        return eval_sensor(model, data.test_x, data.test_y)  # type: ignore[arg-type]

    def held_out(self, data: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        return torch.cat([d.test_x for d in data]), torch.cat([d.test_y for d in data])

    def evaluate_held_out(self, model: TaskModel, held: tuple[torch.Tensor, ...], run: RunConfig) -> Sums:
        return eval_sensor(model, held[0], held[1])  # type: ignore[arg-type]

    def metrics(self, sums: Mapping[str, Any]) -> dict[str, float]:
        confusion = sums["confusion"]
        n_classes = round(np.sqrt(len(confusion)))
        return {
            "accuracy": float(sums["correct"]) / float(sums["count"]),
            "macro_f1": macro_f1_from_confusion(confusion, n_classes),
        }

    def baselines(self, data: Sequence[Any], held: tuple[torch.Tensor, ...]) -> dict[str, dict[str, float]]:
        from federation.data.baselines import sensor_baselines

        return sensor_baselines(list(data))


TASK = SensorTask()
