"""The aggregation-rule interface: plain functions over explicit state (in the manner of FedJAX's
`FederatedAlgorithm` and Flower's strategies).

A rule says
- what a device uploads from its trained adapter (`upload`), and its layout for a task's state
  shapes (`layout`: every key, its shape, and whether it is a value or the weights behind values);
- how the server refuses a malformed upload (`check`);
- the server's streamed aggregate: `init` -> `add` (one upload, or an already-summed batch of them
  for a sum rule) -> `finalize` (the mean delta per key);
- how the global state moves (`update`);
- whether it is a **sum** of device uploads (`is_sum`): only then can secure aggregation, which
  reveals nothing but the sum, carry it; a rule that is not says why (`not_sum_reason`), and a run
  asking for both is refused at config parse.

State keys are `task/key` on the server (one aggregate for every task of a round); `layout` and
`check` see one task's keys without the prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Arrays = Mapping[str, np.ndarray]
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Slot:
    """One uploaded key.

    A *weights* slot (`weights=True`) holds the device's weight (a positive integer number of
    examples) on a prefix of its entries, at least the first, and 0 on the rest.
    A *value* slot holds the device's weight times its delta for the same key; `weighted_by` names
    the weights slot behind it and `axis` the value's axis those weights run along (None: the
    weights slot has one entry, behind the whole key).
    Secure aggregation encodes values and weights from this declaration alone
    (`federation.secagg.vector`).
    """

    shape: tuple[int, ...]
    weights: bool = False
    weighted_by: str = ""
    axis: int | None = None


@dataclass(frozen=True)
class Rule:
    """An aggregation rule as a record of plain functions; the server state `S` is explicit."""

    name: str
    paper: str  # where the rule comes from
    is_sum: bool  # the aggregate needs only the sum of the uploads
    not_sum_reason: str  # for a rule that is not a sum: why secure aggregation cannot carry it
    layout: Callable[[Shapes], dict[str, Slot]]
    upload: Callable[[Arrays, float, int | None], dict[str, np.ndarray]]  # (delta, weight, rank)
    check: Callable[[Arrays, Shapes, float], str | None]  # (upload, shapes, max weight) -> why not
    init: Callable[[], Any]
    add: Callable[[Any, Arrays], Any]
    finalize: Callable[[Any], dict[str, np.ndarray]]  # the mean delta of every key someone trained
    update: Callable[[Arrays, Arrays, float], dict[str, np.ndarray]]  # (global, aggregate, server lr)

    def __post_init__(self) -> None:
        if not self.is_sum and not self.not_sum_reason:
            raise ValueError(f"rule {self.name!r} is not a sum and must say why (not_sum_reason)")


def add_mean_delta(global_state: Arrays, aggregate: Arrays, server_lr: float = 1.0) -> dict[str, np.ndarray]:
    """The usual update: each key the aggregate holds moves by server_lr x its mean delta (float64
    arithmetic, stored in the state's dtype); every other key keeps its value."""
    new = {k: np.array(v, copy=True) for k, v in global_state.items()}
    for key, mean in aggregate.items():
        if key in new:
            new[key] = (new[key].astype(np.float64) + server_lr * mean).astype(new[key].dtype)
    return new


def upload_size(layout: Mapping[str, Slot]) -> int:
    """Coordinates in one upload."""
    return sum(int(np.prod(slot.shape)) for slot in layout.values())
