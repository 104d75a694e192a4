"""One device's work in a round: load the global shared state, train or evaluate locally.

This is what the ClientApp runs on a device, and what `fedge bench overhead` runs directly in
one process as the no-framework limit. No Flower here.

A device trains at its own LoRA rank r (its tier's, capped by the model's r_max): a rank-r task
model computes with the whole global adapter but trains, and holds optimizer state for, only
the first r columns of each B; its delta is returned zero-padded to r_max, ready for
`federation.rules.exact_mixed_rank.contribution(delta, weight, rank=r)`. Evaluation uses the r_max model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from federation.config import RunConfig
from federation.fleet import Device
from federation.model.edge import TaskModel, cached_task_model
from federation.rules.exact_mixed_rank import is_column_key
from federation.tasks import get_task
from federation.training import TrainSettings, round_seed


@dataclass
class LocalResult:
    delta: dict[str, np.ndarray]  # new shared state - received shared state (B: 0 beyond `rank`)
    metrics: dict[str, float]
    private: np.ndarray | None  # the device's private part after training (TV), kept on device
    rank: int  # the columns of each B the device trained


def task_model(run: RunConfig, task: str, rank: int | None = None) -> TaskModel:
    """The process's task model at `rank` (default r_max: what the server and evaluation use)."""
    return cached_task_model(task, run.lora, run.seed, rank, run)


def device_settings(run: RunConfig, device: Device) -> TrainSettings:
    """The round's local work on this device: the scenario's steps, the batch its tier's memory
    budget allows (capped by the run's batch-size). Its weight in the aggregate follows."""
    settings = run.train_for(device.device_class)
    return replace(settings, batch_size=min(settings.batch_size, device.batch_size))


def training_rank(run: RunConfig, device: Device) -> int:
    """The columns of B a device trains: its tier's rank (or the run's `uniform-rank`), capped by
    the model's r_max."""
    return min(run.uniform_rank or device.rank, run.lora.rank)


def local_train(
    run: RunConfig,
    device: Device,
    data: Any,
    shared: Mapping[str, np.ndarray],
    server_round: int,
    private: np.ndarray | None = None,
) -> LocalResult:
    """Train the device's task model, at the device's rank, on its own training split, from `shared`."""
    rank = training_rank(run, device)
    model = task_model(run, device.task, rank)
    model.load_shared_state(shared)
    seed = round_seed(run.seed, device.data_client, server_round)
    settings = device_settings(run, device)
    # Dropout (MiniLM's) draws from torch's global RNG, which each process seeds on its own: seed
    # it from (run seed, device, round) so a round trains alike in any process, e.g. after a resume.
    torch.manual_seed(seed)
    result, new_private = get_task(device.task).train(
        model, data, settings, seed, client_id=device.data_client, run=run, private=private
    )
    after = model.shared_state()
    delta = {k: (after[k] - np.asarray(v, dtype=after[k].dtype)) for k, v in shared.items()}
    for key in delta:
        if is_column_key(key):
            delta[key][:, rank:] = 0.0  # the frozen tail: the device did not train it
    metrics = {
        "train_loss": result.loss,
        "num-examples": float(result.num_examples),
        "train_seconds": result.train_seconds,
    }
    return LocalResult(delta, metrics, new_private, rank)


def local_evaluate(
    run: RunConfig,
    device: Device,
    data: Any,
    shared: Mapping[str, np.ndarray],
    private: np.ndarray | None = None,
) -> dict[str, float | list[float]]:
    """Summed held-out results on the device (with its private part, where the task has one)."""
    model = task_model(run, device.task)
    model.load_shared_state(shared)
    return get_task(device.task).evaluate(model, data, client_id=device.data_client, run=run, private=private)
