"""Streamed, per-key weighted averaging of device updates (FedAvg, McMahan et al., AISTATS 2017).

In the FedJAX style an aggregation is a pair of plain functions over explicit state:
`init` -> `accumulate` (once per device, as its reply arrives) -> `apply`. The state holds one
running weighted sum per key plus the weight behind it, so memory does not grow with the number
of devices in a round. Each key is averaged over the devices that uploaded it: a LoRA adapter
over the devices that use it, a head over the devices of its task.

Devices upload *deltas* (new - global). With A frozen and shared (see `federation.model.lora`),
the weighted mean of the B deltas is exactly the weighted mean of the devices' LoRA updates.
The rule is a sum, so it is compatible with secure aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class MeanState:
    """Running weighted sums: sums[key] = sum_k w_k * delta_k[key]; weights[key] = sum_k w_k."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    contributors: int = 0


def init() -> MeanState:
    return MeanState()


def accumulate(state: MeanState, delta: Mapping[str, np.ndarray], weight: float) -> MeanState:
    """Add one device's delta with its weight (its number of training examples)."""
    if not weight > 0:
        raise ValueError(f"aggregation weight must be > 0, got {weight}")
    for key, value in delta.items():
        contribution = np.asarray(value, dtype=np.float64) * weight
        if key in state.sums:
            state.sums[key] += contribution
            state.weights[key] += weight
        else:
            state.sums[key] = contribution
            state.weights[key] = float(weight)
    state.contributors += 1
    return state


def apply(
    state: MeanState, global_state: Mapping[str, np.ndarray], server_lr: float = 1.0
) -> dict[str, np.ndarray]:
    """New global state: each key moves by the weighted mean delta of its contributors.

    Keys nobody uploaded this round keep their value.
    """
    new = {k: np.array(v, copy=True) for k, v in global_state.items()}
    for key, total in state.sums.items():
        mean = total / state.weights[key]
        new[key] = (new[key].astype(np.float64) + server_lr * mean).astype(new[key].dtype)
    return new


def validate_update(
    update: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], weight: float
) -> str | None:
    """Why a device's update must be left out of the aggregate, or None if it is fine."""
    missing, extra = set(expected) - set(update), set(update) - set(expected)
    if missing:
        return f"missing keys {sorted(missing)[:3]}"
    if extra:
        return f"unexpected keys {sorted(extra)[:3]}"
    for key, shape in expected.items():
        value = np.asarray(update[key])
        if tuple(value.shape) != tuple(shape):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"{key} has dtype {value.dtype}, expected floating point"
        if not np.isfinite(value).all():
            return f"{key} holds NaN or inf"
    if not (np.isfinite(weight) and weight > 0):
        return f"num-examples {weight} is not a positive number"
    return None
