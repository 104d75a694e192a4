"""One device's work in a round: load the global shared state, train or evaluate locally.

This is what the ClientApp runs on a device, and what `fedge bench overhead` runs directly in
one process as the no-framework limit. No Flower here.

A device trains at its own LoRA rank r (its tier's, capped by the model's r_max): a rank-r task
model computes with the whole global adapter but trains, and holds optimizer state for, only
the first r columns of each B; its delta is returned zero-padded to r_max, ready for
`federation.rules.exact_mixed_rank.contribution(delta, weight, rank=r)`. Evaluation uses the r_max model.

The run's aggregation rule says how the adapter is held (`federation.rules.Adapter`): a rule
may share and train A (its rows beyond r are zero in the delta too), keep some keys on the
device (`kept`: trained from the device's own copy, returned to the device, never in the
delta), ask for the device's trained adapter itself rather than its delta (`upload_full`), or
choose the device's rank from what it keeps (`Rule.device_rank`, HetLoRA's self-pruning).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from federation.config import RunConfig
from federation.fleet import Device
from federation.lr_schedule import round_factor
from federation.model.edge import TaskModel, cached_task_model
from federation.rules.base import Rule, is_a_key, is_b_key, is_residual_key
from federation.tasks import get_task
from federation.training import TrainSettings, epoch_steps, round_seed


@dataclass
class LocalResult:
    # new shared state - received shared state, for every key the device trains and uploads
    # (B: 0 beyond `rank`, A: 0 beyond row `rank`); for a rule with `upload_full`, the trained
    # A and B themselves (0 beyond the rank). No residual, no key the device keeps.
    delta: dict[str, np.ndarray]
    metrics: dict[str, float]
    private: np.ndarray | None  # the device's private part after training (TV), kept on device
    rank: int  # the columns of each B the device trained
    kept: dict[str, np.ndarray] = field(default_factory=dict)  # the rule's device-kept state, kept on device
    # the task classes the device holds (bool, one per class row of its head), for a rule that
    # averages class rows over the devices holding each class; None: weigh every class row
    classes: np.ndarray | None = None


def task_model(run: RunConfig, task: str, rank: int | None = None) -> TaskModel:
    """The process's task model at `rank` (default r_max: what the server and evaluation use)."""
    return cached_task_model(task, run.lora, run.seed, rank, run)


def device_settings(
    run: RunConfig, device: Device, data: Any = None, server_round: int | None = None
) -> TrainSettings:
    """The round's local work on this device: the scenario's steps, the batch its tier's memory
    budget allows (capped by the run's batch-size). Its weight in the aggregate follows. For a
    class the scenario trains by local epochs, the steps its `data` holds (`epoch_steps`, up to
    the class's steps); without `data`, that bound. In round `server_round` the class's learning
    rates are that round's point of its decay over the run (`lr_schedule.round_factor`),
    constant over the round's steps; without a round (one call that trains alone, as the
    local-only reference does), they decay over the call's steps."""
    settings = run.train_for(device.device_class)
    batch = min(settings.batch_size, device.batch_size)
    epochs = run.scenario.local_epochs.get(device.device_class)
    steps = settings.steps
    if epochs is not None and data is not None:
        steps = epoch_steps(epochs, get_task(device.task).train_size(data), batch, settings.steps)
    settings = replace(settings, batch_size=batch, steps=steps)
    if server_round is not None and settings.lr_final < 1.0:
        factor = round_factor(server_round, run.rounds, settings.lr_final)
        settings = replace(settings, lr=settings.lr * factor, head_lr=settings.head_lr * factor, lr_final=1.0)
    return settings


def training_rank(run: RunConfig, device: Device) -> int:
    """The columns of B a device trains: its tier's rank (or the run's `uniform-rank`), capped by
    the model's r_max."""
    return min(run.uniform_rank or device.rank, run.lora.rank)


def _zero_beyond_rank(key: str, value: np.ndarray, rank: int) -> np.ndarray:
    """A LoRA matrix as a rank-r device holds it, zero-padded to r_max (B: columns, A: rows)."""
    value = np.array(value, copy=True)
    if is_b_key(key):
        value[:, rank:] = 0.0
    elif is_a_key(key):
        value[rank:] = 0.0
    return value


def starting_state(
    rule: Rule, shared: Mapping[str, np.ndarray], kept: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """The state a device computes with: the global shared state, with the keys the rule keeps on
    the device replaced by the device's own copy (none yet: the global one, its initial value)."""
    kept = kept or {}
    return {k: (kept[k] if rule.adapter.keeps(k) and k in kept else v) for k, v in shared.items()}


def local_train(
    run: RunConfig,
    device: Device,
    data: Any,
    shared: Mapping[str, np.ndarray],
    server_round: int,
    private: np.ndarray | None = None,
    kept: Mapping[str, np.ndarray] | None = None,
) -> LocalResult:
    """Train the device's task model, at the device's rank, on its own training split, from `shared`
    (and the rule's device-kept state `kept`)."""
    rule = run.rule
    kept = dict(kept or {})
    rank = training_rank(run, device)
    if rule.device_rank is not None:
        rank = rule.device_rank(kept, rank)
    model = task_model(run, device.task, rank)
    start = starting_state(rule, shared, kept)
    model.load_shared_state(start)
    seed = round_seed(run.seed, device.data_client, server_round)
    # round 0 is no round of a run: a device trained alone (the local-only reference)
    settings = device_settings(run, device, data, server_round if server_round >= 1 else None)
    # Dropout (MiniLM's) draws from torch's global RNG, which each process seeds on its own: seed
    # it from (run seed, device, round) so a round trains alike in any process, e.g. after a resume.
    torch.manual_seed(seed)
    result, new_private = get_task(device.task).train(
        model, data, settings, seed, client_id=device.data_client, run=run, private=private
    )
    after = model.shared_state()
    delta: dict[str, np.ndarray] = {}
    new_kept: dict[str, np.ndarray] = {}
    for key, value in start.items():
        if is_residual_key(key):
            continue  # the residual is the server's to move, never trained on a device
        if rule.adapter.keeps(key):
            new_kept[key] = after[key]
            continue
        if rule.adapter.upload_full and (is_a_key(key) or is_b_key(key)):
            delta[key] = _zero_beyond_rank(key, after[key], rank)
        else:  # beyond the rank: the frozen tail, which the device did not train
            delta[key] = _zero_beyond_rank(key, after[key] - np.asarray(value, dtype=after[key].dtype), rank)
    if rule.device_keep is not None:
        new_kept.update(rule.device_keep(kept, after, rank))
    metrics = {
        "train_loss": result.loss,
        "num-examples": float(result.num_examples),
        "train_seconds": result.train_seconds,
    }
    return LocalResult(delta, metrics, new_private, rank, new_kept, held_classes(run, device.task, data))


def held_classes(run: RunConfig, task: str, data: Any) -> np.ndarray | None:
    """The classes the device reports holding with its upload: its task's `classes_held`, unless
    the run's rule does not weigh class rows, the run asks for plain head averaging
    (`class-wise-heads = false`) or it runs distributed DP (weights are exact there, outside the
    noise: per-class weights would publish how many devices hold each class)."""
    if not (run.class_wise_heads and run.rule.class_rows) or run.dp:
        return None
    return get_task(task).classes_held(data)


def local_evaluate(
    run: RunConfig,
    device: Device,
    data: Any,
    shared: Mapping[str, np.ndarray],
    private: np.ndarray | None = None,
    kept: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float | list[float]]:
    """Summed held-out results on the device (with its private part, where the task has one, and
    the rule's device-kept state)."""
    model = task_model(run, device.task)
    model.load_shared_state(starting_state(run.rule, shared, kept))
    return get_task(device.task).evaluate(model, data, client_id=device.data_client, run=run, private=private)
