"""The task interface: what fedge needs from a task, and nothing about any one task.

A task is the learning problem a device class works on: its model (built on a shared, frozen
backbone with LoRA adapters, through `federation.model`), its data (the natural clients, one
client's train and held-out split), local training and evaluation, how summed evaluation
results become metrics, its simple baselines, and the declarations in `TaskInfo` (primary
metric, cost per example for the simulated clock, evaluation cap, where it is evaluated).

The server, the devices, the simulated clock and the reports use a task only through this
interface, looked up by name in `federation.tasks`; phone, tv and sensor are its three built-in
implementations, and a task defined in another package is a fourth one (docs/extending.md).

Contracts every implementation keeps:
- Determinism: `load_client` and `build_model` are pure functions of their arguments (the seed
  above all): the server and every device build the same model and the same splits.
- Evaluation returns *sums* (a loss sum, a `count`, counts, histograms, confusion cells), never
  ratios, so that results from many devices add up exactly on the server; `metrics` turns the
  summed dict into ratios.
- The held-out set is rows: `held_out` returns tensors whose first dimension is the example, so
  that the server can cap it by drawing rows.
- A private part (`TaskInfo.personalised`) never leaves the device: `train` returns it to the
  device's own state, and only `TaskModel.shared_state()` is uploaded.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federation.errors import FedgeError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from federation.config import RunConfig
    from federation.model.edge import TaskModel
    from federation.model.lora import LoraSettings
    from federation.training import TrainResult, TrainSettings

Sums = dict[str, float | list[float]]
"""Summed evaluation results: they add up across devices (`federation.metrics.add_sums`)."""


@dataclass(frozen=True)
class TaskInfo:
    """A task's declarations: what fedge reads without running it."""

    name: str  # the task's key in the global state (`phone/lora....`), metrics and outputs
    description: str
    metrics: tuple[str, ...]  # what `Task.metrics` returns besides `loss` and `examples`
    primary_metric: str  # the metric progress, summaries and plots show (higher is better)
    flops_per_example: float  # one training example, forward + backward (the simulated clock)
    # server-side held-out examples at most (drawn by seed; a scenario may set its own); None: all
    eval_cap: int | None = None
    # evaluated every round on the server, on the union of the fleet's held-out splits
    server_eval: bool = True
    # Devices keep a private part: the full model exists only on them, so it is evaluated there every
    # `federated-eval-every` rounds, and the server-side evaluation scores the shared part alone.
    personalised: bool = False
    device_baselines: tuple[str, ...] = ()  # baselines that know each device's data: compare on-device only

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/:# ") or self.name != self.name.strip():
            raise ValueError(f"task name {self.name!r} must be non-empty without '/', ':', '#' or spaces")
        if self.primary_metric not in self.metrics:
            raise ValueError(f"task {self.name}: primary metric {self.primary_metric!r} not in metrics")
        if not (math.isfinite(self.flops_per_example) and self.flops_per_example > 0):
            raise ValueError(f"task {self.name}: flops_per_example must be > 0")
        if self.eval_cap is not None and self.eval_cap < 1:
            raise ValueError(f"task {self.name}: eval_cap must be >= 1 or None")


class Task(ABC):
    """One learning task. Subclass it, set `info`, implement the abstract methods."""

    info: TaskInfo

    # -- data ----------------------------------------------------------------------------
    @abstractmethod
    def clients(self, cache: Path | None) -> Sequence[str]:
        """Every natural client of the task's dataset, in a fixed order."""

    @abstractmethod
    def load_client(self, client_id: str, seed: int, *, seq_len: int, cache: Path | None) -> Any:
        """One client's train and held-out split (a dataclass; its tensor fields are rows, so a
        synthetic scale scenario can shard it). `seq_len` is the run's text length, for tasks
        that tokenise; `cache` where preprocessed data may be kept."""

    def prepare(self, cache: Path | None) -> int:
        """Check the data is installed and build any cache (`fedge prepare`); returns the clients."""
        return len(self.clients(cache))

    # -- model ---------------------------------------------------------------------------
    @abstractmethod
    def build_model(self, lora: LoraSettings, seed: int, rank: int, run: RunConfig | None) -> TaskModel:
        """A fresh model at the pretrained start (B = 0, heads seeded), training `rank` columns
        of each LoRA B. `run` carries the task's settings (None: pyproject.toml's defaults)."""

    def model_key(self, run: RunConfig | None) -> tuple[Hashable, ...]:
        """The run settings `build_model` reads, so that a process caches one model per value."""
        return ()

    # -- on the device -------------------------------------------------------------------
    @abstractmethod
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
        """Local training from the loaded shared state; returns the result and the device's new
        private part (None for a wholly shared model)."""

    def train_pooled(
        self, model: TaskModel, data: Sequence[Any], settings: TrainSettings, seed: int, *, run: RunConfig
    ) -> TrainResult:
        """The centralized reference's training: the same model on every client's training split
        together, no federation. The default pools the clients into one (`pool`: each tensor
        field concatenated) and trains it as one client. A personalised task overrides it so
        that each client's examples keep their own private part: the model the federated run
        trains, trained centrally, which is what bounds it (the TV task)."""
        from federation.data.common import pool

        return self.train(model, pool(data), settings, seed, client_id="pooled", run=run, private=None)[0]

    @abstractmethod
    def evaluate(
        self, model: TaskModel, data: Any, *, client_id: str, run: RunConfig, private: np.ndarray | None
    ) -> Sums:
        """Summed results on the client's held-out split (with its private part, if any)."""

    def train_size(self, data: Any) -> int:
        """The client's number of training examples: what a device class that trains by local
        epochs (`Scenario.local_epochs`) sizes its steps on. A task that does not say cannot be
        trained by epochs."""
        raise FedgeError(
            f"task {self.info.name!r} does not give its clients' training-set size (Task.train_size): "
            "its device classes cannot train by local epochs (drop them from the scenario's local_epochs)"
        )

    def classes_held(self, data: Any) -> np.ndarray | None:
        """For a task whose head has one output row per class (a head module named `classes`):
        which classes the client's training split holds (bool, one per class). The default rule
        averages each class's rows over the devices that hold it. None (the default): the task
        has no class rows, or every device weighs every row."""
        return None

    # -- on the server -------------------------------------------------------------------
    @abstractmethod
    def held_out(self, data: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """The union of these clients' held-out splits, as aligned rows."""

    @abstractmethod
    def evaluate_held_out(self, model: TaskModel, held: tuple[torch.Tensor, ...], run: RunConfig) -> Sums:
        """Summed results of the shared model on a central held-out set (no private part)."""

    @abstractmethod
    def metrics(self, sums: Mapping[str, Any]) -> dict[str, float]:
        """The `TaskInfo.metrics` from summed results (`count` > 0)."""

    @abstractmethod
    def baselines(self, data: Sequence[Any], held: tuple[torch.Tensor, ...]) -> dict[str, dict[str, float]]:
        """Simple baselines fit on these clients' training splits, scored on `held` (or, for
        per-device baselines, on each client's own held-out split): {name: {metric: value}}."""
