"""`exact-mixed-rank` (the default rule): a sum of what devices upload, then one division.

FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017) generalised to exact heterogeneous-rank LoRA under a shared
frozen A (docs/architecture.md, "LoRA aggregation"). A device uploads a *contribution*:

- for every shared key, its delta (new - global) times its weight p_k (examples trained on);
- for every key, the weights behind it (`KEY#weight`): for a LoRA B, one weight per column —
  p_k on the r_k columns the device trained, 0 on the rest (its B delta is zero-padded to
  r_max); for a head's class rows (`head.classes.*`, `federation.rules.base.is_class_row_key`)
  one weight per class — p_k on the classes the device holds, 0 on the rest (and those rows'
  deltas are not uploaded); for any other key (heads) a single p_k.

The server only *adds* contributions (in plaintext, or under secure aggregation, which reveals
nothing but the sum), then `finalize` divides: each B column becomes the weighted mean over the
devices that trained it, each class's head row the weighted mean over the devices that hold the
class, every other head key the weighted mean over the devices of its task, and what nobody
trained keeps its value. With A frozen and shared, sum_k p_k B_k A = (sum_k p_k B_k) A,
so for devices of one rank the new adapter is exactly the weighted mean of their updates
B_k A; for mixed ranks each block of columns is the weighted mean over the devices that
trained it (small devices do not dilute what large ones learned). The frozen shared A follows
FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

Class-wise head averaging: under label skew (a watch records 3-5 of 7 exercises) a device's
softmax pushes down the rows of the classes it never sees, so a plain mean of the head lets
each round's sample of devices drag the absent classes' rows around. fedge averages each
class's rows over the devices that hold it: a server-side complement to FedRS (Li & Zhan,
"FedRS: Federated Learning with Restricted Softmax for Label Distribution Non-IID Data", KDD
2021), whose restricted softmax (the run's `absent-class-scale`) damps the same push on the
device; docs/methods.md has the measured effect. A device that reports no classes
(`classes=None`) weighs every class row, which is the plain mean.

As a `federation.rules.Rule` (`RULE`): `contribution` on the device; `init` / `add` / `finalize`
on the server, then `add_mean_delta`. The state is one running sum per key, so memory does not
grow with the number of devices in a round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from federation.rules.base import Rule, Slot, add_mean_delta, is_class_row_key

NAME = "exact-mixed-rank"
WEIGHT = "#weight"


def is_column_key(key: str) -> bool:
    """LoRA B matrices ([out, r] or [out, r, k]) are weighted per column (axis 1)."""
    return ".lora_B." in key


def rank_axis(key: str) -> int | None:
    """The axis a key's rank runs along: B's columns (1), a shared A's rows (0, for the rules
    that train A and reuse this rule's sums), none for any other key (heads)."""
    if is_column_key(key):
        return 1
    if ".lora_A." in key:
        return 0
    return None


def weights_axis(key: str) -> int | None:
    """The axis a key's weights run along: its rank axis (LoRA), its classes (0, a head's class
    rows), or none (one weight behind the whole key)."""
    axis = rank_axis(key)
    if axis is None and is_class_row_key(key):
        return 0
    return axis


def trained_entries(key: str, marks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per device, which entries of `key` it trained: `marks` [devices, entries] are the devices'
    `KEY#weight` slots, `shape` [devices, *key's shape]; True where the weight behind is > 0."""
    marks = np.asarray(marks)
    axis = weights_axis(key)
    view = [marks.shape[0]] + [1] * (len(shape) - 1)
    if axis is not None:
        view[axis + 1] = -1
    elif marks.shape[1:] != (1,):
        raise ValueError(f"{key}: one weight per device expected, got {marks.shape[1:]}")
    return np.broadcast_to(marks.reshape(view) > 0, shape)


def _column_view(weights: np.ndarray, ndim: int, axis: int = 1) -> np.ndarray:
    """Broadcast a per-rank weight vector against a LoRA matrix of `ndim` dimensions along `axis`."""
    shape = [1] * ndim
    shape[axis] = -1
    return weights.reshape(shape)


def _beyond(value: np.ndarray, axis: int, r: int) -> np.ndarray:
    """The part of a LoRA matrix beyond rank r along its rank axis."""
    return value[:, r:] if axis == 1 else value[r:]


def contribution(
    delta: Mapping[str, np.ndarray],
    weight: float,
    rank: int | None = None,
    classes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One device's upload: weighted deltas plus the weights behind them.

    `rank`: the columns of each B the device trained (None, or at least r_max: all of them; a
    device's rank is capped by the model's). Columns beyond it must be zero in `delta` (a
    rank-r device holds no parameters there).
    `classes`: which of the task's classes the device holds (bool, one per class row of the
    head); the rows of the others are left out (weight 0, delta 0). None: every class row counts.
    """
    if not (np.isfinite(weight) and weight > 0):
        raise ValueError(f"aggregation weight must be a positive number, got {weight}")
    out: dict[str, np.ndarray] = {}
    for key, value in delta.items():
        value = np.asarray(value, dtype=np.float32)
        axis = rank_axis(key)
        if axis is None and is_class_row_key(key):
            held = np.ones(value.shape[0], bool) if classes is None else np.asarray(classes).ravel()
            if held.dtype != bool or held.shape != value.shape[:1]:
                raise ValueError(
                    f"classes must be {value.shape[0]} booleans for {key}, got {held.dtype} {held.shape}"
                )
            if not held.any():
                raise ValueError("a device holds at least one class of its task")
            weights = np.where(held, np.float32(weight), np.float32(0))
            value = value * _column_view(held, value.ndim, 0)
        elif axis is not None:
            r_max = value.shape[axis]
            r = r_max if rank is None else min(rank, r_max)
            if r < 1:
                raise ValueError(f"rank {r} is outside 1..{r_max} for {key}")
            if np.any(_beyond(value, axis, r) != 0):
                raise ValueError(f"{key} has non-zero entries beyond the device's rank {r}")
            weights = np.zeros(r_max, dtype=np.float32)
            weights[:r] = weight
        else:
            weights = np.array([weight], dtype=np.float32)
        out[key] = value * np.float32(weight)
        out[key + WEIGHT] = weights
    return out


@dataclass
class SumState:
    """Running sums of contributions, per key (float64: order-independent to ~1e-16)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    count: int = 0  # contributions added (a secure sum of many counts as one)


def init() -> SumState:
    return SumState()


def add(state: SumState, contrib: Mapping[str, np.ndarray]) -> SumState:
    """Fold one contribution (or an already-summed batch of them) into the state, in place."""
    for key, value in contrib.items():
        value = np.asarray(value, dtype=np.float64)
        if key in state.sums:
            state.sums[key] += value
        else:
            state.sums[key] = value.copy()
    state.count += 1
    return state


def finalize(state: SumState) -> dict[str, np.ndarray]:
    """The mean delta of every key someone trained: each B column over the devices that trained
    it, each class row over the devices that hold the class (0 where none did), every other key
    over its contributors."""
    out: dict[str, np.ndarray] = {}
    for key, total in state.sums.items():
        if key.endswith(WEIGHT) or key + WEIGHT not in state.sums:
            continue
        weights = state.sums[key + WEIGHT]
        axis = weights_axis(key)
        if axis is not None:
            w = _column_view(weights, total.ndim, axis)
            out[key] = np.divide(total, w, out=np.zeros_like(total), where=w > 0)
        elif weights[0] > 0:
            out[key] = total / weights[0]
    return out


def apply(
    state: SumState, global_state: Mapping[str, np.ndarray], server_lr: float = 1.0
) -> dict[str, np.ndarray]:
    """The new global state: each key moves by the weighted mean delta of its contributors."""
    return add_mean_delta(global_state, finalize(state), server_lr)


def layout(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Slot]:
    """What a device uploads for a task of these state shapes: every key's weighted delta, and
    its weights (`KEY#weight`: per column, axis 1, for a LoRA B; per class, axis 0, for a head's
    class rows; one for any other key)."""
    out: dict[str, Slot] = {}
    for key, shape in shapes.items():
        axis = weights_axis(key)
        out[key] = Slot(tuple(shape), weighted_by=key + WEIGHT, axis=axis)
        out[key + WEIGHT] = Slot(
            (shape[axis],) if axis is not None else (1,),
            weights=True,
            classes=axis is not None and rank_axis(key) is None,
        )
    return out


def expected_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes of a contribution to a state with these shapes (weights included)."""
    return {key: slot.shape for key, slot in layout(shapes).items()}


def validate_contribution(
    contrib: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], max_weight: float
) -> str | None:
    """Why a device's contribution must be left out of the sum, or None if it is fine."""
    expected = expected_shapes(shapes)
    missing, extra = set(expected) - set(contrib), set(contrib) - set(expected)
    if missing:
        return f"missing keys {sorted(missing)[:3]}"
    if extra:
        return f"unexpected keys {sorted(extra)[:3]}"
    for key, shape in expected.items():
        value = np.asarray(contrib[key])
        if tuple(value.shape) != tuple(shape):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if not np.issubdtype(value.dtype, np.floating):
            return f"{key} has dtype {value.dtype}, expected floating point"
        if not np.isfinite(value).all():
            return f"{key} holds NaN or inf"
    weights = {float(w) for k in shapes for w in np.asarray(contrib[k + WEIGHT]).ravel() if w != 0}
    if len(weights) != 1:
        return "weights must be one positive number per device (0 on untrained columns)"
    weight = weights.pop()
    if not 0 < weight <= max_weight:
        return f"weight {weight} is outside (0, {max_weight}]"
    for key in shapes:
        axis = weights_axis(key)
        if axis is not None:
            w = np.asarray(contrib[key + WEIGHT])
            trained = w > 0
            if rank_axis(key) is None:  # a head's class rows: any classes, at least one
                if not trained.any():
                    return f"{key}#weight holds no class (a device holds at least one)"
            elif trained.any() and not trained[: int(trained.sum())].all():
                return f"{key}#weight must cover a prefix of the ranks (a device trains the first r)"
            untrained = ~_column_view(trained, np.ndim(contrib[key]), axis)
            if np.any(np.where(untrained, np.asarray(contrib[key]), 0) != 0):
                return f"{key} has non-zero values in columns (or class rows) the device did not train"
    return None


RULE = Rule(
    name=NAME,
    paper="FedAvg (McMahan et al., AISTATS 2017) over LoRA B with a shared frozen A (FFA-LoRA, "
    "Sun et al., ICLR 2024), per-column weights for mixed ranks, head class rows averaged over the "
    "devices holding each class (after FedRS, Li & Zhan, KDD 2021)",
    is_sum=True,
    not_sum_reason="",
    layout=layout,
    upload=contribution,
    check=validate_contribution,
    init=init,
    add=add,
    finalize=finalize,
    update=add_mean_delta,
    class_rows=True,
)
