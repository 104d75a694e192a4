"""`trimmed-mean`: the coordinate-wise beta-trimmed mean of the devices' deltas.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (the trimmed mean, beside the median): per coordinate, the server
drops the floor(beta x c) largest and the floor(beta x c) smallest of the c devices' values and
averages the rest, so fewer than beta x c arbitrarily bad devices cannot move that coordinate
outside the range of the honest values. beta = `TRIM_FRACTION` (0.2, Flower's `FedTrimmedAvg`
default); where every device trained every entry the result is Flower's `trim_mean` (tested).

Over fedge's model it is the median's twin (`federation/rules/median.py`): a device uploads its
*unweighted* delta and marks of the entries it trained (1 on a LoRA B's first r columns, a single
1 for a head); each B column is trimmed over the devices that trained that column, each head over
its task's devices; the examples a device trained on are not uploaded. With fewer than
1 / beta devices on a coordinate nothing is trimmed there (it is the plain mean): robustness
needs devices to outvote the bad ones.

Not a sum: the server keeps every upload of the round, and secure aggregation cannot carry it.
"""

from __future__ import annotations

import numpy as np

from federation.rules import median
from federation.rules.base import Rule, add_mean_delta
from federation.rules.exact_mixed_rank import WEIGHT, trained_entries

NAME = "trimmed-mean"
TRIM_FRACTION = 0.2  # dropped from each end, per coordinate (Flower's FedTrimmedAvg beta)


def trimmed_mean(values: np.ndarray, trained: np.ndarray, beta: float = TRIM_FRACTION) -> np.ndarray:
    """Per coordinate of `values` [devices, *shape], the mean of the devices that trained it
    (`trained`, same shape) after dropping floor(beta x c) from each end (c: how many trained it);
    0 where nobody did."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {beta}")
    masked = np.where(trained, values, np.nan)
    ordered = np.sort(masked, axis=0)  # NaN (untrained) sorts last
    counts = trained.sum(axis=0)
    cut = np.floor(beta * counts).astype(np.int64)
    rank = np.arange(values.shape[0]).reshape((-1,) + (1,) * (values.ndim - 1))
    keep = (rank >= cut) & (rank < counts - cut)
    kept = np.maximum(counts - 2 * cut, 1)
    total = np.where(keep, ordered, 0.0).sum(axis=0)
    return np.where(counts > 0, total / kept, 0.0)


def finalize(state: median.Uploads) -> dict[str, np.ndarray]:
    """Per coordinate, the trimmed mean over the devices that trained it (0 where none did)."""
    out: dict[str, np.ndarray] = {}
    for key, values in state.values.items():
        if key.endswith(WEIGHT) or key + WEIGHT not in state.values:
            continue
        stacked = np.stack(values)
        trained = trained_entries(key, np.stack(state.values[key + WEIGHT]), stacked.shape)
        if trained.any():
            out[key] = trimmed_mean(stacked, trained)
    return out


RULE = Rule(
    name=NAME,
    paper="coordinate-wise trimmed mean (Yin et al., ICML 2018), beta = 0.2",
    is_sum=False,
    not_sum_reason="a trimmed mean needs every device's own delta to sort, and secure aggregation "
    "reveals only their sum",
    layout=median.layout,
    upload=median.upload,
    check=median.check,  # the same per-device upload as the median's, so the same check
    init=median.init,
    add=median.add,
    finalize=finalize,
    update=add_mean_delta,
    class_rows=True,
)
