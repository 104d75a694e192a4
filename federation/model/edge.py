"""Distributed DP inside secure aggregation's integer encoding: the round's plan, a device's
private integer vector, and the server's decoding of the sum.

The pipeline of Kairouz, Liu and Steinke (ICML 2021) and Agarwal, Kairouz and Liu (NeurIPS 2021),
as TensorFlow Federated's `DistributedDpSumFactory` runs it:

  device:  flatten the update's values (L coordinates) -> clip to L2 norm c -> rotate (randomized
           Hadamard, public per-round seed; D = L padded to a power of two) -> scale by s ->
           conditional stochastic rounding (L2 norm <= Delta_2) -> add its noise share
           (discrete Gaussian of variance V / n, or Skellam of variance V / n) -> reduce mod 2^m
           -> mask (secure aggregation, unchanged).
  server:  unmask the sum -> read it as signed integers -> check it is a sum honest devices can
           make -> divide by s -> rotate back -> cut to L.

**The plan** (`plan_dp`, computed from public values by the server *and* by every device, which
refuses a round whose modulus or noise is not its own computation):
- s = (2^(value_bits - 1) - 1) / c: c maps to secagg-value-bits' fixed-point range (2^23 by
  default), so rounding adds at most sqrt(D)/2 to a norm of s c (a relative ~3e-5 for fedge's
  largest task).
- Delta_2 = the conditional-rounding bound (`rounding.rounded_l2_bound`); the sensitivity of the
  sum to one device's update (add/remove one device's update) in the integer domain.
- V = (noise_multiplier x Delta_2)^2: the noise variance of the sum per coordinate when the n
  planned devices all survive; each device adds V / n. Fewer survivors mean less noise: the
  accountant charges what the survivors added (`accountant.py`).
- m: the smallest modulus with 2^(m-1) > n Delta_2 + t, t the noise level that every one of the D
  coordinates stays under except with probability `WRAP_TARGET` (2^-40, union bound over the
  coordinates of `noise.tail_probability`). The signal part cannot wrap at all: each device's
  integer vector has |q_j| <= ||q||_2 <= Delta_2. The plan states the resulting wrap probability.

**The check of the sum** (`check_private_sum`): each coordinate within n Delta_2 + t, and the
sum's L2 norm within n Delta_2 + the noise norm's high-probability bound (Hsu, Kakade and Zhang's
bound for a sub-Gaussian vector, at the same 2^-40). A wrapped coordinate decodes to about
+-2^(m-1), beyond the first bound: a wrap is detected and the group's update is aborted, never
applied. A device that skips its own clipping is bounded by the second bound (see
docs/privacy.md, "Hostile devices").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from federation.privacy.noise import discrete_gaussian, skellam, tail_probability
from federation.privacy.rotation import padded_length, rotate, unrotate
from federation.privacy.rounding import clip_l2, conditional_round, rounded_l1_bound, rounded_l2_bound

__all__ = ["MECHANISMS", "WRAP_TARGET", "DpPlan", "PrivateSumError", "check_private_sum", "decode_values",
           "encode_values", "plan_dp"]  # fmt: skip

MECHANISMS = ("distributed-discrete-gaussian", "skellam")
WRAP_TARGET = 2.0**-40  # per round and group: the chance that the noise wraps any coordinate
MAX_BITS = 64


class PrivateSumError(ValueError):
    """A decoded private sum is not one that honest devices can produce (or it wrapped)."""


@dataclass(frozen=True)
class DpPlan:
    """Everything both sides derive from the round's public DP parameters."""

    mechanism: str
    noise_multiplier: float
    clip: float
    n: int  # devices planned in the group
    length: int  # L: value coordinates before padding
    dim: int  # D: after padding to a power of two
    scale: float  # s
    l2_bound: float  # Delta_2 (integer domain)
    l1_bound: float  # Delta_1 (integer domain)
    local_variance: float  # each device's noise variance per coordinate (0: no noise)
    modulus_bits: int  # m
    coordinate_bound: float  # |sum_j| <= this for an honest sum (but with prob. wrap_probability)
    wrap_probability: float

    @property
    def variance(self) -> float:
        """The sum's noise variance per coordinate when all n devices survive."""
        return self.local_variance * self.n


def _noise_threshold(mechanism: str, variance: float, dim: int) -> float:
    """The smallest t (to 1e-6 relative) with dim x P(|noise| >= t) <= WRAP_TARGET."""
    if variance <= 0:
        return 0.0
    lo, hi = 0.0, math.sqrt(variance) * 4.0
    while dim * tail_probability(mechanism, variance, hi) > WRAP_TARGET:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        if dim * tail_probability(mechanism, variance, mid) > WRAP_TARGET:
            lo = mid
        else:
            hi = mid
    return hi


def plan_dp(
    mechanism: str, noise_multiplier: float, clip: float, value_bits: int, n: int, length: int
) -> DpPlan:
    """The round's DP plan for a group of n devices uploading `length` value coordinates."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown DP mechanism {mechanism!r}: one of {', '.join(MECHANISMS)}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"dp-clip must be positive, got {clip}")
    if n < 1 or length < 1 or not 2 <= value_bits <= 53:
        raise ValueError(f"bad group size {n}, length {length} or value bits {value_bits}")
    dim = padded_length(length)
    scale = (2 ** (value_bits - 1) - 1) / clip
    l2 = rounded_l2_bound(scale * clip, dim)
    l1 = rounded_l1_bound(l2, dim)
    variance = (noise_multiplier * l2) ** 2
    t = _noise_threshold(mechanism, variance, dim)
    signal = n * l2
    needed = signal + t
    m = max(2, math.ceil(math.log2(needed + 1)) + 1)
    while 2 ** (m - 1) - 1 < needed:
        m += 1
    if m > MAX_BITS:
        raise ValueError(
            f"a private sum of {n} devices needs a {m}-bit modulus (> {MAX_BITS}): lower secagg-value-bits "
            "or dp-noise-multiplier"
        )
    room = 2 ** (m - 1) - 1 - signal
    wrap = min(1.0, dim * tail_probability(mechanism, variance, room)) if variance > 0 else 0.0
    return DpPlan(mechanism, float(noise_multiplier), float(clip), n, length, dim, scale, l2, l1,
                  variance / n, m, needed, wrap)  # fmt: skip


def encode_values(
    values: np.ndarray,
    plan: DpPlan,
    rotation_seed: bytes,
    rng_bytes: Callable[[int], bytes] | None = None,
) -> np.ndarray:
    """A device's private integer vector (int64, D coordinates): clipped, rotated, scaled,
    conditionally rounded, plus its noise share. Reduce it mod 2^m before masking."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size != plan.length:
        raise ValueError(f"{x.size} values, the round's plan has {plan.length}")
    y = rotate(clip_l2(x, plan.clip), rotation_seed) * plan.scale
    q = conditional_round(y, plan.l2_bound, rng_bytes)
    if plan.local_variance > 0:
        if plan.mechanism == "skellam":
            q = q + skellam(plan.dim, plan.local_variance, rng_bytes)
        else:
            q = q + discrete_gaussian(plan.dim, math.sqrt(plan.local_variance), rng_bytes)
    return q


def check_private_sum(total: np.ndarray, plan: DpPlan, survivors: int) -> None:
    """Raise PrivateSumError unless the signed integer sum of `survivors` devices is one that
    honest devices produce (except with probability ~2 x WRAP_TARGET): every coordinate within
    survivors x Delta_2 + t, and the L2 norm within survivors x Delta_2 + the noise norm bound."""
    s = np.asarray(total, dtype=np.float64)
    variance = plan.local_variance * survivors
    t = _noise_threshold(plan.mechanism, variance, plan.dim)
    worst = float(np.max(np.abs(s))) if s.size else 0.0
    if worst > survivors * plan.l2_bound + t:
        raise PrivateSumError(
            f"a coordinate of the private sum is {worst:.4g}, beyond the {survivors * plan.l2_bound + t:.4g} "
            "honest devices can reach: the sum wrapped the modulus or a device sent an unclipped vector "
            "(dp-coordinate-bound)"
        )
    u = math.log(1 / WRAP_TARGET)
    noise_norm = math.sqrt(variance * (plan.dim + 2 * math.sqrt(plan.dim * u) + 2 * u))
    if plan.mechanism == "skellam" and variance > 0:  # Bernstein's sub-exponential correction
        noise_norm *= math.sqrt(1 + t / (3 * variance))
    norm = float(np.linalg.norm(s))
    limit = survivors * plan.l2_bound + noise_norm
    if norm > limit:
        raise PrivateSumError(
            f"the private sum's L2 norm {norm:.4g} exceeds {limit:.4g}, what {survivors} clipped devices "
            "and the noise can reach: a device skipped its clipping (dp-norm-bound)"
        )


def decode_values(total: np.ndarray, plan: DpPlan, rotation_seed: bytes) -> np.ndarray:
    """The float sum of the devices' clipped values (plus the noise) in the original coordinates:
    divide by s, rotate back, cut to L."""
    return unrotate(np.asarray(total, dtype=np.float64) / plan.scale, rotation_seed, plan.length)
