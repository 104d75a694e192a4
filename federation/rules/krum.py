"""`krum`: multi-Krum over each task's device deltas.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017. Each device's update is scored by the sum of squared
L2 distances to its n - f - 2 nearest other updates (f: the hostile devices tolerated); Krum keeps
the best-scored update, multi-Krum averages the m = n - f best. A norm-boosted or otherwise far-off
update has a large score and is left out. Flower's `Krum` / `MultiKrum` strategies compute the same
scores (`num_malicious_nodes` = f, `num_nodes_to_select` = m); this module does it per task over
fedge's per-key state.

f per task and round: the largest f with n > 2f + 2 (Blanchard et al.'s condition), and at least 1
from n = 3 on, so that a small round (fedge's smart-home samples 4 devices of a task) still leaves
out its farthest update (below n = 5 that is a heuristic outlier filter, not the paper's
guarantee). With fewer than 3 devices nothing is left out.

Over fedge's model: like `median`, a device uploads its unweighted delta and marks of the entries
it trained (LoRA B columns up to its rank; zero-padded beyond, which is what the distances see).
The selected devices' deltas are averaged per entry over those of them that trained it.
Not a sum: scores need every device's own delta, so secure aggregation cannot carry it.
"""

from __future__ import annotations

import numpy as np

from federation.rules import median
from federation.rules.base import Rule, add_mean_delta
from federation.rules.exact_mixed_rank import WEIGHT, trained_entries

NAME = "krum"


def tolerated(n: int) -> int:
    """f for a round of n devices (see the module docstring)."""
    if n < 3:
        return 0
    return max(1, (n - 3) // 2)


def krum_scores(vectors: np.ndarray, f: int) -> np.ndarray:
    """Blanchard et al.'s score of each row of `vectors` [n, d]: the sum of its squared distances
    to its n - f - 2 nearest other rows (at least 1)."""
    n = vectors.shape[0]
    squared = np.sum(vectors**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2.0 * vectors @ vectors.T, 0.0)
    neighbours = max(1, n - f - 2)
    ordered = np.sort(distances, axis=1)[:, 1 : neighbours + 1]  # column 0: the row itself
    return ordered.sum(axis=1)


def multi_krum(vectors: np.ndarray, f: int | None = None) -> np.ndarray:
    """Indices of the m = n - f best-scored rows (all rows when n < 3)."""
    n = vectors.shape[0]
    f = tolerated(n) if f is None else f
    if n < 3 or f == 0:
        return np.arange(n)
    return np.sort(np.argsort(krum_scores(vectors, f), kind="stable")[: n - f])


def finalize(state: median.Uploads) -> dict[str, np.ndarray]:
    """Per task, the mean over the multi-Krum-selected devices of each entry they trained."""
    by_task: dict[str, list[str]] = {}
    for key in state.values:
        if not key.endswith(WEIGHT) and key + WEIGHT in state.values:
            by_task.setdefault(key.split("/", 1)[0], []).append(key)
    out: dict[str, np.ndarray] = {}
    for keys in by_task.values():
        devices = len(state.values[keys[0]])
        if any(len(state.values[k]) != devices for k in keys):
            raise ValueError("krum: a task's uploads do not hold every key once per device")
        flat = np.concatenate([np.stack(state.values[k]).reshape(devices, -1) for k in sorted(keys)], axis=1)
        chosen = multi_krum(flat)
        for key in keys:
            stacked = np.stack(state.values[key])[chosen]
            trained = trained_entries(key, np.stack(state.values[key + WEIGHT])[chosen], stacked.shape)
            count = trained.sum(axis=0)
            total = np.where(trained, stacked, 0.0).sum(axis=0)
            out[key] = np.divide(total, count, out=np.zeros(stacked.shape[1:]), where=count > 0)
    return out


RULE = Rule(
    name=NAME,
    paper="multi-Krum (Blanchard et al., NeurIPS 2017), f = max(1, (n - 3) // 2), m = n - f",
    is_sum=False,
    not_sum_reason="Krum scores each device's own delta by its distances to the others, and secure "
    "aggregation reveals only their sum",
    layout=median.layout,
    upload=median.upload,
    check=median.check,  # the same per-device upload as the median's, so the same check
    init=median.init,
    add=median.add,
    finalize=finalize,
    update=add_mean_delta,
    class_rows=True,
)
