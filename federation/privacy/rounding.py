"""L2 clipping, scaling and conditional stochastic rounding of distributed DP's encoding.

Kairouz, Liu and Steinke, ICML 2021 (Section 4.1, Theorem 1 and Proposition 22): a device clips
its (rotated) update to L2 norm c, scales it by s, and rounds every coordinate to a neighbouring
integer at random, unbiased (P(up) = the fractional part). Rounding can lengthen the vector, which
would raise the sensitivity the noise must cover; *conditional* rounding redraws the rounding until
the integer vector's norm is at most

    Delta_2 = min( s c + sqrt(d),  sqrt( (s c)^2 + d / 4 + sqrt(2 ln(1/beta)) (s c + sqrt(d) / 2) ) )

(the first term holds for any rounding, the second with probability >= 1 - beta per draw), so
the sensitivity is Delta_2 exactly, not with high probability. beta = exp(-1/2), as in
TensorFlow Federated's `DistributedDpSumFactory`: a draw passes with probability >= 1 - beta ~ 0.39
(in practice almost always: the bound is loose), and `MAX_DRAWS` failed draws raise.

The uniforms come from a ChaCha20 keystream under a fresh os.urandom key (`federation.secagg.
quantize`'s source); a caller may pass its own `rng_bytes` (tests do).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from federation.secagg.quantize import _secure_bytes, _uniform01

__all__ = ["BETA", "clip_l2", "conditional_round", "rounded_l1_bound", "rounded_l2_bound"]

BETA = math.exp(-0.5)
MAX_DRAWS = 64


def clip_l2(x: np.ndarray, clip: float) -> np.ndarray:
    """x scaled down to L2 norm `clip` if it is longer (float64). Non-finite input raises: a NaN
    would otherwise pass the norm test and poison everyone's sum."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"dp-clip must be a positive finite number, got {clip}")
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot encode non-finite values (NaN/inf) for a private sum")
    norm = float(np.linalg.norm(x))
    return x * (clip / norm) if norm > clip else x.copy()


def rounded_l2_bound(scaled_clip: float, dim: int, beta: float = BETA) -> float:
    """Delta_2: the L2 norm bound of a conditionally rounded vector of `dim` coordinates whose
    norm before rounding is at most `scaled_clip` (s c)."""
    if dim < 1 or not 0 <= beta < 1 or not scaled_clip > 0:
        raise ValueError(
            f"need dim >= 1, 0 <= beta < 1 and a positive norm; got {dim}, {beta}, {scaled_clip}"
        )
    first = scaled_clip + math.sqrt(dim)
    if beta == 0:
        return first
    second = math.sqrt(
        scaled_clip**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (scaled_clip + math.sqrt(dim) / 2)
    )
    return min(first, second)


def rounded_l1_bound(l2_bound: float, dim: int) -> float:
    """Delta_1 of an integer vector with L2 norm <= l2_bound: <= sqrt(d) Delta_2, and <= Delta_2^2
    (every non-zero integer coordinate has |q| <= q^2)."""
    return l2_bound * min(math.sqrt(dim), l2_bound)


def conditional_round(
    y: np.ndarray,
    l2_bound: float,
    rng_bytes: Callable[[int], bytes] | None = None,
) -> np.ndarray:
    """Unbiased stochastic rounding of `y` (already clipped and scaled), redrawn until the integer
    vector's L2 norm is <= l2_bound. Returns int64."""
    y = np.asarray(y, dtype=np.float64)
    low = np.floor(y)
    frac = y - low
    base = low.astype(np.int64)
    source = rng_bytes or _secure_bytes
    for _ in range(MAX_DRAWS):
        q = base + (_uniform01(y.size, source).reshape(y.shape) < frac)
        if float(np.linalg.norm(q.astype(np.float64))) <= l2_bound:
            return q
    raise ValueError(
        f"conditional rounding failed {MAX_DRAWS} times to stay within L2 norm {l2_bound:.6g}: the input "
        "was not clipped to the bound the round promises"
    )
