"""Server optimizers over any aggregation rule: FedAvgM and FedAdam.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar and McMahan, "Adaptive Federated
Optimization", ICLR 2021 (FedAdam; FedAvgM there after Hsu, Qi and Brown, "Measuring the Effects
of Non-Identical Data Distribution for Federated Visual Classification", 2019).

The rule's own step gives the round's pseudo-gradient, per key: Delta = rule.update(x, aggregate,
1) - x (for a sum rule: the weighted mean of the devices' deltas). The server optimizer turns it
into the step it applies:

- `none`:    x <- x + eta Delta  (eta = server-lr; 1: the rule's own update);
- `fedavgm`: m <- beta m + Delta,  x <- x + eta m  (server-momentum = beta);
- `fedadam`: m <- beta1 m + (1 - beta1) Delta,  v <- beta2 v + (1 - beta2) Delta^2,
             x <- x + eta m / (sqrt(v) + tau)  (server-beta1, server-beta2, server-tau; Reddi et
             al.'s Algorithm 2, without bias correction, as there).

It runs on the server after the aggregate is known, so secure aggregation, which gives the
server the sum and nothing else, still carries every sum rule under it. Its state (m, v per key)
is the server's: `RunState` saves it in the checkpoint under `server-opt/...` and `--resume`
restores it, so a resumed run takes the same steps.

Parameters (run config): `server-optimizer` ("none" | "fedavgm" | "fedadam"), `server-lr`,
`server-momentum`, `server-beta1`, `server-beta2`, `server-tau`. Paper defaults for FedAdam:
beta1 0.9, beta2 0.99, tau 1e-3, with eta tuned (1e-2 .. 1e-1 for adapters of this size).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from federation.checkpoint import split_prefixed

OPTIMIZERS = ("none", "fedavgm", "fedadam")
STATE_PREFIX = "server-opt/"


@dataclass(frozen=True)
class ServerOptimizer:
    kind: str = "none"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"server optimizer {self.kind!r} is not one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"server-lr must be > 0, got {self.lr}")
        for name, value in (("momentum", self.momentum), ("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= value < 1:
                raise ValueError(f"server-{name} must lie in [0, 1), got {value}")
        if not self.tau > 0:
            raise ValueError(f"server-tau must be > 0, got {self.tau}")


def pseudo_gradient(
    before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Delta = after - before per key (float64), for the keys the rule's step moved."""
    out = {}
    for key, new in after.items():
        old = before.get(key)
        if old is None or old.shape != new.shape:
            continue
        diff = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
        if np.any(diff):
            out[key] = diff
    return out


def step(
    opt: ServerOptimizer,
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(new global state, new optimizer state) from the state before the round, the rule's own
    update `after`, and the optimizer's state (`m/KEY`, `v/KEY`)."""
    delta = pseudo_gradient(before, after)
    new = {k: np.array(v, copy=True) for k, v in after.items()}
    moments = {k: np.array(v, copy=True) for k, v in state.items()}
    # Keys the round moved, and keys an earlier round moved (their momentum still carries them:
    # a zero pseudo-gradient this round, as in the papers' algorithms).
    keys = list(delta) + sorted(
        {n[2:] for n in moments if n[2:] not in delta and n[2:] in after and n[2:] in before}
    )
    for key in keys:
        x = np.asarray(before[key], dtype=np.float64)
        d = delta.get(key, np.zeros_like(x))
        if opt.kind == "none":
            moved = x + opt.lr * d
        elif opt.kind == "fedavgm":
            m = opt.momentum * moments.get(f"m/{key}", np.zeros_like(d)) + d
            moments[f"m/{key}"] = m
            moved = x + opt.lr * m
        else:  # fedadam
            m = opt.beta1 * moments.get(f"m/{key}", np.zeros_like(d)) + (1 - opt.beta1) * d
            v = opt.beta2 * moments.get(f"v/{key}", np.zeros_like(d)) + (1 - opt.beta2) * d * d
            moments[f"m/{key}"], moments[f"v/{key}"] = m, v
            moved = x + opt.lr * m / (np.sqrt(v) + opt.tau)
        new[key] = moved.astype(np.asarray(after[key]).dtype)
    return new, moments


def split_server_opt(
    checkpoint: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A checkpoint's arrays as (global state, server optimizer state without its prefix)."""
    return split_prefixed(checkpoint, STATE_PREFIX)
