"""The privacy accountant of distributed DP: epsilon at delta, per round and over the run.

Each applied private sum of a task is one release of a vector query with integer L2 sensitivity
Delta_2 (and L1 sensitivity Delta_1) under the noise the *survivors* added: variance
V = survivors x (each device's share). Its Renyi-DP curve is bounded linearly in the order alpha,
eps(alpha) <= xi + rho alpha, which is `dp_accounting`'s `ZCDpEvent(rho, xi)`:

- **Distributed discrete Gaussian** (Kairouz, Liu and Steinke, ICML 2021, Theorem 1 and
  Proposition 14, first term): with s survivors each adding N_Z(0, sigma^2),
  eps(alpha) <= alpha Delta_2^2 / (2 s sigma^2) + tau D, where
  tau = 10 sum_{k=1}^{s-1} exp(-2 pi^2 sigma^2 k / (k + 1)) is the price of the sum of discrete
  Gaussians not being one discrete Gaussian (for fedge's sigma of ~1e6 it is 0 in float64).
  So rho = Delta_2^2 / (2 s sigma^2), xi = tau D.
- **Skellam** (Agarwal, Kairouz and Liu, NeurIPS 2021, Theorem 3.5): the sum is exactly
  Sk with variance mu = V, and for integer alpha
  eps(alpha) <= alpha Delta_2^2 / (2 mu) + ((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2)
  = alpha (Delta_2^2 / (2 mu) + Delta_2^2 / (2 mu^2)) + (6 Delta_1 - Delta_2^2) / (4 mu^2).
  So rho = Delta_2^2 / (2 mu) + Delta_2^2 / (2 mu^2), xi = max(0, (6 Delta_1 - Delta_2^2) / (4 mu^2)).

Both bounds are stated for integer orders (Kairouz et al. and Agarwal et al. evaluate them at
integer alpha, as TensorFlow Federated's accounting does), so the accountant converts at the
integer orders 2..256, 512, 1024 only (`ORDERS`).

Composition: a device runs one task, so a task's releases compose (RDP adds: the rhos and xis
sum) and the run's epsilon is the largest over tasks, converted to (epsilon, delta) by
dp-accounting's `RdpAccountant`. **No amplification by sampling is claimed**: the server picks
which devices train (and knows who survived), so the sample is not secret from the party the
guarantee is against; every device is charged for every release of its task, as if it had
taken part in each round. The neighbouring relation is add/remove one device's update (its
clipped update replaced by nothing, the others unchanged); for "replace one device's update"
the sensitivity doubles (rho x 4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from federation.privacy.encoding import DpPlan

__all__ = ["PrivacyAccountant", "Release", "epsilon_of", "release_rdp"]

ORDERS = (*range(2, 257), 512, 1024)


@dataclass(frozen=True)
class Release:
    """One applied private sum: its task, the round's plan, and how many devices' noise it holds."""

    task: str
    plan: DpPlan
    survivors: int


def release_rdp(release: Release) -> tuple[float, float]:
    """(rho, xi) with eps(alpha) <= xi + rho alpha for this release; (inf, 0) without noise."""
    plan, s = release.plan, release.survivors
    if s < 1:
        raise ValueError("a release needs at least one device")
    variance = plan.local_variance * s
    if variance <= 0:
        return math.inf, 0.0
    l2, l1 = plan.l2_bound, plan.l1_bound
    if plan.mechanism == "skellam":
        rho = l2**2 / (2 * variance) + l2**2 / (2 * variance**2)
        xi = max(0.0, (6 * l1 - l2**2) / (4 * variance**2))
        return rho, xi
    sigma2 = plan.local_variance
    tau = 10 * sum(math.exp(-2 * math.pi**2 * sigma2 * k / (k + 1)) for k in range(1, s))
    return l2**2 / (2 * variance), tau * plan.dim


def epsilon_of(rho: float, xi: float, delta: float) -> float:
    """epsilon at delta of an RDP curve xi + rho alpha (dp-accounting's RDP accountant)."""
    if math.isinf(rho):
        return math.inf
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    accountant.compose(dp_accounting.ZCDpEvent(rho, xi))
    return float(accountant.get_epsilon(delta))


@dataclass
class PrivacyAccountant:
    """The run's privacy ledger: per task, the summed (rho, xi) of its releases."""

    delta: float
    noise_multiplier: float
    mechanism: str
    spent: dict[str, tuple[float, float]] = field(default_factory=dict)

    def record_round(self, releases: Iterable[Release]) -> dict[str, Any]:
        """Add one round's releases; return the round's `privacy` entry of metrics.jsonl."""
        round_eps = 0.0
        wrap = 0.0
        per_task: dict[str, dict[str, Any]] = {}
        for release in releases:
            rho, xi = release_rdp(release)
            round_eps = max(round_eps, epsilon_of(rho, xi, self.delta))
            old_rho, old_xi = self.spent.get(release.task, (0.0, 0.0))
            self.spent[release.task] = (old_rho + rho, old_xi + xi)
            wrap = max(wrap, release.plan.wrap_probability)
            per_task[release.task] = {
                "survivors": release.survivors,
                "round_epsilon": _finite(epsilon_of(rho, xi, self.delta)),
                "effective_noise_multiplier": math.sqrt(release.plan.local_variance * release.survivors)
                / release.plan.l2_bound,
                "modulus_bits": release.plan.modulus_bits,
            }
        for task, (rho, xi) in self.spent.items():
            per_task.setdefault(task, {})
            per_task[task].update({"epsilon": _finite(epsilon_of(rho, xi, self.delta)), "rho": _finite(rho),
                                   "xi": xi})  # fmt: skip
        return {
            "epsilon": _finite(self.epsilon()),
            "delta": self.delta,
            "round_epsilon": _finite(round_eps),
            "noise_multiplier": self.noise_multiplier,
            "wrap_probability": wrap,
            "mechanism": self.mechanism,
            "per_task": per_task,
        }

    def epsilon(self) -> float:
        """The run's epsilon so far: the largest over tasks (0 before any release)."""
        return max((epsilon_of(rho, xi, self.delta) for rho, xi in self.spent.values()), default=0.0)

    def restore(self, entry: Mapping[str, Any] | None) -> None:
        """Continue from a metrics.jsonl `privacy` entry (a resumed run)."""
        if not entry:
            return
        for task, info in dict(entry.get("per_task", {})).items():
            if "rho" in info:
                rho = math.inf if info["rho"] is None else float(info["rho"])
                self.spent[task] = (rho, float(info.get("xi", 0.0)))


def _finite(value: float) -> float | None:
    """JSON has no infinity: an infinite epsilon (no noise) is written as null."""
    return None if math.isinf(value) else float(value)
