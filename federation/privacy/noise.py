"""Integer noise shares of distributed DP: the discrete Gaussian and the Skellam distribution.

- **Discrete Gaussian** N_Z(0, sigma^2) (P(x) proportional to exp(-x^2 / (2 sigma^2)) on the
  integers): Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential Privacy",
  NeurIPS 2020, Algorithm 3: discrete Laplace proposals of scale t = floor(sigma) + 1, each kept
  with probability exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)). The distributed mechanism (Kairouz,
  Liu, Steinke, ICML 2021) has every device add its own N_Z(0, sigma_local^2) share; the sum is
  close to N_Z(0, n sigma_local^2), and the accountant charges the gap (their tau term).
- **Skellam** Sk(mu/2, mu/2) = Poisson(mu/2) - Poisson(mu/2), variance mu: Agarwal, Kairouz and
  Liu, "The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021. A sum
  of independent Skellams is exactly Skellam, so n devices adding variance mu/n each give exactly
  Sk with variance mu. The Poisson draws use Hormann's PTRS transformed rejection ("The
  transformed rejection method for generating Poisson random variables", 1993; numpy's algorithm
  for lambda >= 10) with the log-pmf in a cancellation-free form, so that lambda up to ~1e15
  (fedge's scale makes variances of ~1e13) stays exact in float64; below 10, inversion.

Every uniform comes from a ChaCha20 keystream under a fresh os.urandom key (never `random` or
`numpy.random`): the noise must be unpredictable to the server, which sees the noisy sum. The
samplers are vectorised float64 implementations (as TensorFlow Federated's are), not the
exact-arithmetic versions of the papers; float64 represents every integer they return exactly.

`tail_bound` gives, per mechanism, a t with P(|noise of the sum| >= t) small: what the modulus
must leave room for (`federation.privacy.encoding.wrap_probability`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from federation.secagg.quantize import _secure_bytes, _uniform01

__all__ = ["discrete_gaussian", "poisson", "skellam", "tail_probability"]

Source = Callable[[int], bytes]


def _open_uniform(n: int, source: Source) -> np.ndarray:
    """Uniforms in (0, 1]: never 0, so their logarithm is finite."""
    return 1.0 - _uniform01(n, source)


def _discrete_laplace(n: int, t: float, source: Source) -> np.ndarray:
    """P(Y = y) proportional to exp(-|y| / t): the difference of two geometric variables,
    each drawn by inversion (P(G >= k) = exp(-k / t))."""
    g1 = np.floor(-t * np.log(_open_uniform(n, source)))
    g2 = np.floor(-t * np.log(_open_uniform(n, source)))
    return g1 - g2


def discrete_gaussian(size: int, sigma: float, rng_bytes: Source | None = None) -> np.ndarray:
    """`size` draws of N_Z(0, sigma^2) as int64 (Canonne et al.'s rejection from discrete Laplace)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"discrete Gaussian sigma must be positive and finite, got {sigma}")
    source = rng_bytes or _secure_bytes
    t = math.floor(sigma) + 1.0
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        y = _discrete_laplace(todo.size, t, source)
        accept = _open_uniform(todo.size, source) <= np.exp(
            -((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2)
        )
        out[todo[accept]] = y[accept].astype(np.int64)
        todo = todo[~accept]
    return out


def _log_poisson_pmf(k: np.ndarray, lam: float) -> np.ndarray:
    """log P(Poisson(lam) = k) for k >= 1, without subtracting two numbers of size k log k:
    with d = k - lam, -lam + k log lam - log k! = d - k log1p(d / lam) - log(2 pi k)/2 - c(k),
    c(k) the Stirling series' tail 1/(12k) - 1/(360k^3) + 1/(1260k^5) (exact to float64 for
    k >= 10; smaller k use lgamma)."""
    k = np.asarray(k, dtype=np.float64)
    out = np.empty_like(k)
    small = k < 10
    if np.any(small):
        ks = k[small]
        out[small] = -lam + ks * math.log(lam) - np.array([math.lgamma(v + 1.0) for v in ks])
    big = ~small
    if np.any(big):
        kb = k[big]
        d = kb - lam
        tail = 1.0 / (12.0 * kb) - 1.0 / (360.0 * kb**3) + 1.0 / (1260.0 * kb**5)
        out[big] = d - kb * np.log1p(d / lam) - 0.5 * np.log(2.0 * math.pi * kb) - tail
    return out


def poisson(size: int, lam: float, rng_bytes: Source | None = None) -> np.ndarray:
    """`size` draws of Poisson(lam) as int64."""
    if not (math.isfinite(lam) and lam >= 0) or lam > 1e15:
        raise ValueError(f"Poisson mean must be in [0, 1e15], got {lam}")
    source = rng_bytes or _secure_bytes
    if lam == 0:
        return np.zeros(size, dtype=np.int64)
    if lam < 10:  # inversion: walk the cdf until it passes a uniform
        u = _uniform01(size, source)
        k = np.zeros(size, dtype=np.int64)
        p = np.full(size, math.exp(-lam))
        cdf = p.copy()
        active = u >= cdf
        while np.any(active):
            k[active] += 1
            p[active] *= lam / k[active]
            cdf[active] += p[active]
            active &= u >= cdf
            active &= k < 1000  # P(k >= 1000 | lam < 10) is below 1e-600
        return k
    slam = math.sqrt(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        u = _uniform01(todo.size, source) - 0.5
        v = _uniform01(todo.size, source)
        us = 0.5 - np.abs(u)
        k = np.floor((2 * a / us + b) * u + lam + 0.43)
        quick = (us >= 0.07) & (v <= vr)
        valid = (k >= 0) & ~((us < 0.013) & (v > us))
        slow = ~quick & valid
        accept = quick.copy()
        if np.any(slow):
            ks, vs, uss = k[slow], v[slow], us[slow]
            lhs = np.log(np.maximum(vs, 1e-300)) + math.log(inv_alpha) - np.log(a / (uss * uss) + b)
            rhs = np.where(ks >= 1, _log_poisson_pmf(np.maximum(ks, 1.0), lam), -lam)
            accept[slow] = lhs <= rhs
        out[todo[accept]] = k[accept].astype(np.int64)
        todo = todo[~accept]
    return out


def skellam(size: int, variance: float, rng_bytes: Source | None = None) -> np.ndarray:
    """`size` draws of Sk(variance/2, variance/2) as int64: mean 0, the given variance."""
    if not (math.isfinite(variance) and variance > 0):
        raise ValueError(f"Skellam variance must be positive and finite, got {variance}")
    return poisson(size, variance / 2, rng_bytes) - poisson(size, variance / 2, rng_bytes)


def tail_probability(mechanism: str, variance: float, t: float) -> float:
    """An upper bound on P(|X| >= t) for the noise X of the *sum* (total variance `variance`).

    Discrete Gaussian: a sum of independent N_Z(0, s^2) is sub-Gaussian with proxy sum s^2
    (Canonne et al., Proposition 19), so P(|X| >= t) <= 2 exp(-t^2 / (2 variance)).
    Skellam: a centred Poisson satisfies Bernstein's inequality with range 1, and so does their
    difference: P(|X| >= t) <= 2 exp(-t^2 / (2 (variance + t / 3)))."""
    if t <= 0:
        return 1.0
    if mechanism == "skellam":
        exponent = -(t * t) / (2.0 * (variance + t / 3.0))
    else:
        exponent = -(t * t) / (2.0 * variance)
    return min(1.0, 2.0 * math.exp(exponent))
