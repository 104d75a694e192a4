"""One device's work in a round: load the global shared state, train or evaluate locally.

This is what the ClientApp runs on a device, and what `fedge bench overhead` runs directly in
one process as the no-framework limit. No Flower here.

A device trains at its own LoRA rank r (its tier's, capped by the model's r_max): a rank-r task
model computes with the whole global adapter but trains, and holds optimizer state for, only
the first r columns of each B; its delta is returned zero-padded to r_max, ready for
`federation.aggregation.contribution(delta, weight, rank=r)`. Evaluation uses the r_max model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.aggregation import is_column_key
from federation.config import RunConfig
from federation.fleet import Device
from federation.model.edge import TaskModel, TVModel, cached_task_model
from federation.training import (
    TrainSettings,
    eval_phone,
    eval_sensor,
    eval_tv,
    round_seed,
    train_phone,
    train_sensor,
    train_tv,
)


@dataclass
class LocalResult:
    delta: dict[str, np.ndarray]  # new shared state - received shared state (B: 0 beyond `rank`)
    metrics: dict[str, float]
    private: np.ndarray | None  # the device's private part after training (TV), kept on device
    rank: int  # the columns of each B the device trained


def task_model(run: RunConfig, task: str, rank: int | None = None) -> TaskModel:
    """The process's task model at `rank` (default r_max: what the server and evaluation use)."""
    return cached_task_model(task, run.lora, run.seed, run.tv_user_dim, rank)


def device_settings(run: RunConfig, device: Device) -> TrainSettings:
    """The round's local work on this device: the scenario's steps, the batch its tier's memory
    budget allows (capped by the run's batch-size). Its weight in the aggregate follows."""
    settings = run.train_for(device.device_class)
    return replace(settings, batch_size=min(settings.batch_size, device.batch_size))


def training_rank(run: RunConfig, device: Device) -> int:
    """The columns of B a device trains: its tier's rank (or the run's `uniform-rank`), capped by
    the model's r_max."""
    return min(run.uniform_rank or device.rank, run.lora.rank)


def _tv_tokens(run: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from federation.data.tv import tv_items

    items = tv_items(cache=Path(run.cache_dir) if run.cache_dir else None)
    return items.input_ids, items.attention_mask


def _private(model: TVModel, device: Device, run: RunConfig, stored: np.ndarray | None) -> torch.Tensor:
    if stored is None or stored.shape != (model.user_dim + 1,):
        return model.new_private(device.data_client, run.seed)
    return torch.as_tensor(stored, dtype=torch.float32)


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
    new_private = None
    if device.task == "phone":
        result = train_phone(model, data.train, settings, seed)  # type: ignore[arg-type]
    elif device.task == "tv":
        assert isinstance(model, TVModel)
        tokens, mask = _tv_tokens(run)
        user = _private(model, device, run, private)
        result, user = train_tv(
            model, user, data.train_items, data.train_labels, tokens, mask, settings, seed
        )
        new_private = user.numpy()
    else:
        result = train_sensor(model, data.train_x, data.train_y, settings, seed)  # type: ignore[arg-type]
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
    """Summed held-out results on the device (TV: after fitting its private part)."""
    model = task_model(run, device.task)
    model.load_shared_state(shared)
    if device.task == "phone":
        return eval_phone(model, data.test)  # type: ignore[arg-type]
    if device.task == "tv":
        assert isinstance(model, TVModel)
        tokens, mask = _tv_tokens(run)
        return eval_tv(
            model,
            _private(model, device, run, private),
            data.train_items,
            data.train_labels,
            data.test_items,
            data.test_labels,
            tokens,
            mask,
            run.train.private_lr,
        )
    return eval_sensor(model, data.test_x, data.test_y)  # type: ignore[arg-type]
