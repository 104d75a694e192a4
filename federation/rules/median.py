"""`median`: the coordinate-wise median of the devices' deltas.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018: the server moves each coordinate by the median of the devices'
updates of that coordinate, which a minority of arbitrarily bad updates cannot drag far.

Over fedge's model (LoRA B with a shared frozen A, mixed ranks): a device uploads its *unweighted*
delta of every shared key and, per key, which entries it trained (`KEY#weight`: 1 on the first r
columns of a LoRA B, 0 beyond; a single 1 for a head), i.e. the default rule's contribution with
weight 1. The examples a device trained on are not uploaded: the median is unweighted. Each B
column's median is over the devices that trained that column, each head's over its task's
devices; with A frozen and shared, the adapter moves by median(dB) A, the median taken in B's
coordinates (not the median of the products dB_k A, which no rule over B alone can give).

Not a sum: a median needs every device's upload, so the server keeps them all (memory grows with
the devices of a round) and secure aggregation, which reveals only a sum, cannot carry it; a run
with `aggregation = "median"` must set `secure-aggregation = false`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from federation.rules import exact_mixed_rank
from federation.rules.base import Rule, Slot, add_mean_delta
from federation.rules.exact_mixed_rank import WEIGHT

NAME = "median"


def upload(
    delta: Mapping[str, np.ndarray], weight: float, rank: int | None = None, classes: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The device's delta and which entries it trained (its columns; its classes' head rows); its
    weight (examples) stays on the device."""
    if not (np.isfinite(weight) and weight > 0):
        raise ValueError(f"aggregation weight must be a positive number, got {weight}")
    return exact_mixed_rank.contribution(delta, 1.0, rank, classes)


def check(
    contrib: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], max_weight: float
) -> str | None:
    """The default rule's checks (shapes, finite values, trained columns a prefix), with every
    trained entry marked 1."""
    reason = exact_mixed_rank.validate_contribution(contrib, shapes, max(1.0, max_weight))
    if reason:
        return reason
    if any(
        np.any((np.asarray(contrib[k]) != 0) & (np.asarray(contrib[k]) != 1))
        for k in contrib
        if k.endswith(WEIGHT)
    ):
        return "median uploads mark trained entries with 1, untrained with 0"
    return None


@dataclass
class Uploads:
    """Every upload of the round, per key (a median is not a running sum)."""

    values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    count: int = 0


def init() -> Uploads:
    return Uploads()


def add(state: Uploads, contrib: Mapping[str, np.ndarray]) -> Uploads:
    """Keep one device's upload (a secure sum cannot be added: it is not one device's)."""
    for key, value in contrib.items():
        state.values.setdefault(key, []).append(np.asarray(value, dtype=np.float64).copy())
    state.count += 1
    return state


def finalize(state: Uploads) -> dict[str, np.ndarray]:
    """Per coordinate, the median over the devices that trained it (0 where none did)."""
    out: dict[str, np.ndarray] = {}
    for key, values in state.values.items():
        if key.endswith(WEIGHT) or key + WEIGHT not in state.values:
            continue
        stacked = np.stack(values)  # [devices, *shape]
        marks = np.stack(state.values[key + WEIGHT])  # [devices, columns / classes] or [devices, 1]
        trained = exact_mixed_rank.trained_entries(key, marks, stacked.shape)
        if not trained.any():
            continue
        masked = np.where(trained, stacked, np.nan)
        anyone = trained.any(axis=0)
        median = np.zeros(stacked.shape[1:])
        median[anyone] = np.nanmedian(masked[:, anyone], axis=0)
        out[key] = median
    return out


def layout(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Slot]:
    return exact_mixed_rank.layout(shapes)


RULE = Rule(
    name=NAME,
    paper="coordinate-wise median (Yin et al., ICML 2018)",
    is_sum=False,
    not_sum_reason="a coordinate-wise median needs every device's own delta, and secure aggregation "
    "reveals only their sum",
    layout=layout,
    upload=upload,
    check=check,
    init=init,
    add=add,
    finalize=finalize,
    update=add_mean_delta,
    class_rows=True,
)
