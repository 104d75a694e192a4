"""Fixed-point encoding of float updates into Z_(2^m) for secure aggregation.

Masking (Bonawitz et al., CCS 2017; Bell et al., CCS 2020) works on integers modulo 2^m, so a
client clips its update, scales it to fixed point, rounds stochastically and reduces it mod 2^m;
the server decodes the (unmasked) modular sum back to floats.

- Clipping to [-clip, clip] bounds every coordinate, which is what lets the modulus be chosen so
  that no sum of the round can wrap (see `modulus_bits`).
- Stochastic rounding is unbiased, E[q] = x * scale, so quantization adds zero-mean noise rather
  than a systematic drift that would accumulate over rounds. Its uniforms come from a ChaCha20
  keystream under a fresh key from os.urandom (a CSPRNG, ~8x faster than os.urandom itself).
  This randomness is not secret - the mask, not the rounding, hides the input - so a caller
  may inject its own source through `rng_bytes` (tests do, for reproducibility).
- Negative integers are represented in two's complement mod 2^m; `decode_sum` reads a modular
  sum S back as signed: S if S < 2^(m-1), else S - 2^m.
- Example weights (num-examples) travel inside the masked vector: a client encodes w * q
  (`weight=w`) and, separately, w itself (`encode_integers`), so the server only ever learns
  sum_k w_k q_k and sum_k w_k.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = [
    "decode_signed",
    "decode_sum",
    "encode",
    "encode_integers",
    "modulus_bits",
    "quantization_error_bound",
    "scale_for",
]

MAX_MODULUS_BITS = 64  # numpy uint64 arithmetic wraps mod 2^64 for free; wider needs big ints
MAX_VALUE_BITS = 53  # scale * clip = 2^(v-1) - 1 must be exact in float64's 53-bit mantissa


def modulus_bits(value_bits: int, n_clients: int, weight_bits: int) -> int:
    """Smallest safe m: value_bits + ceil(log2(n_clients)) + weight_bits + 1.

    Each client's coordinate is w*q with |q| <= 2^(value_bits-1) - 1 (value_bits includes the
    sign) and 0 <= w < 2^weight_bits, so |sum of n_clients| < 2^(value_bits-1+weight_bits+
    ceil(log2 n)) and fits the signed range (-2^(m-1), 2^(m-1)) of Z_(2^m) with one bit to
    spare. That guard bit keeps the guarantee if a caller's weight reaches 2^weight_bits exactly
    (weight_bits taken as floor(log2(max weight)) instead of its bit length).
    For the weights themselves, sum w < n * 2^weight_bits also fits. Raises if m > 64.
    """
    if value_bits < 2:
        raise ValueError(f"value_bits must be >= 2 (one sign bit plus magnitude), got {value_bits}")
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if weight_bits < 0:
        raise ValueError(f"weight_bits must be >= 0, got {weight_bits}")
    m = value_bits + (n_clients - 1).bit_length() + weight_bits + 1  # (n-1).bit_length() == ceil(log2 n)
    if m > MAX_MODULUS_BITS:
        raise ValueError(
            f"modulus would need {m} bits (> {MAX_MODULUS_BITS}) for value_bits={value_bits}, "
            f"n_clients={n_clients}, weight_bits={weight_bits}: lower value_bits or weight_bits"
        )
    return m


def scale_for(clip: float, value_bits: int) -> float:
    """Fixed-point scale: clip maps to the largest magnitude 2^(value_bits-1) - 1."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a positive finite number, got {clip}")
    if not 2 <= value_bits <= MAX_VALUE_BITS:
        raise ValueError(f"value_bits must be in [2, {MAX_VALUE_BITS}], got {value_bits}")
    return (2 ** (value_bits - 1) - 1) / clip


def _check_modulus(m: int) -> None:
    if not 2 <= m <= MAX_MODULUS_BITS:
        raise ValueError(f"modulus_bits must be in [2, {MAX_MODULUS_BITS}], got {m}")


def _reduce(v: np.ndarray, m: int) -> np.ndarray:
    """Reduce uint64 values mod 2^m in place (mod 2^64 already happened by wrap-around)."""
    if m < 64:
        np.bitwise_and(v, np.uint64((1 << m) - 1), out=v)
    return v


def _secure_bytes(n: int) -> bytes:
    # ChaCha20 keyed by 32 fresh OS-random bytes is a CSPRNG; zero nonce is fine for a one-use key.
    return Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None).encryptor().update(bytes(n))


def _uniform01(n: int, rng_bytes: Callable[[int], bytes]) -> np.ndarray:
    raw = rng_bytes(8 * n)
    if len(raw) != 8 * n:
        raise ValueError(f"rng_bytes returned {len(raw)} bytes, expected {8 * n}")
    # Top 53 bits of each uint64 -> exact doubles k / 2^53 in [0, 1).
    return (np.frombuffer(raw, dtype="<u8") >> np.uint64(11)).astype(np.float64) * 2.0**-53


def encode(
    x: np.ndarray,
    clip: float,
    value_bits: int,
    modulus_bits: int,
    rng_bytes: Callable[[int], bytes] | None = None,
    *,
    weight: int = 1,
) -> np.ndarray:
    """Clip, scale, stochastically round, multiply by `weight`, reduce mod 2^modulus_bits.

    Returns uint64 values in [0, 2^modulus_bits) with x's shape. Non-finite inputs raise: a NaN
    would otherwise become an arbitrary integer and silently corrupt everyone's sum.
    """
    scale = scale_for(clip, value_bits)
    _check_modulus(modulus_bits)
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or weight < 0:
        raise ValueError(f"weight must be a non-negative integer, got {weight!r}")
    weight = int(weight)
    if value_bits + weight.bit_length() > modulus_bits:
        # |w q| < 2^(value_bits-1+bits(w)) must stay below 2^(m-1) for a single client to be decodable.
        raise ValueError(
            f"weight {weight} needs {value_bits + weight.bit_length()} bits > modulus_bits={modulus_bits}"
        )
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot encode non-finite values (NaN/inf) for secure aggregation")
    y = np.clip(x, -clip, clip) * scale
    # clip * scale can land one ulp above the integer 2^(v-1) - 1 and then round up past it;
    # clipping to that exact integer keeps |q| <= 2^(v-1) - 1, which modulus_bits relies on.
    limit = float(2 ** (value_bits - 1) - 1)
    np.clip(y, -limit, limit, out=y)
    low = np.floor(y)
    u = _uniform01(y.size, rng_bytes or _secure_bytes).reshape(y.shape)
    q = low.astype(np.int64) + (u < (y - low))  # P(round up) = frac: unbiased
    if weight != 1:
        q *= weight  # no overflow: checked above that |w q| < 2^63
    return _reduce(q.view(np.uint64), modulus_bits)


def encode_integers(values: np.ndarray | int, modulus_bits: int) -> np.ndarray:
    """Encode exact signed integers (example weights, per-column counts) mod 2^modulus_bits."""
    _check_modulus(modulus_bits)
    v = np.atleast_1d(np.asarray(values))
    if not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"encode_integers needs an integer array, got dtype {v.dtype}")
    bound = 1 << (modulus_bits - 1)
    if v.size and (int(v.max()) >= bound or int(v.min()) < -bound):
        raise ValueError(f"integers must lie in [-2^{modulus_bits - 1}, 2^{modulus_bits - 1})")
    return _reduce(v.astype(np.int64).view(np.uint64), modulus_bits)


def decode_signed(s: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Read residues in [0, 2^m) as two's-complement signed int64 values."""
    _check_modulus(modulus_bits)
    s = np.asarray(s)
    if s.dtype != np.uint64:
        raise ValueError(f"expected a uint64 array, got dtype {s.dtype}")
    if modulus_bits < 64 and s.size and int(s.max()) >> modulus_bits:
        raise ValueError(f"values out of range for modulus 2^{modulus_bits}")
    # Shift the m-bit sign bit up to bit 63, reinterpret as int64, arithmetic-shift back down:
    # sign extension without branches or int64 overflow.
    shift = np.uint64(64 - modulus_bits)
    return (s << shift).view(np.int64) >> np.int64(64 - modulus_bits)


def decode_sum(s: np.ndarray, clip: float, value_bits: int, modulus_bits: int) -> np.ndarray:
    """Decode a modular sum of `encode` outputs into float64 (the sum of weighted, clipped inputs)."""
    scale = scale_for(clip, value_bits)
    return decode_signed(s, modulus_bits).astype(np.float64) / scale


def quantization_error_bound(clip: float, value_bits: int, n_clients: int, *, max_weight: int = 1) -> float:
    """Per-coordinate bound on |decoded sum - sum of w_k * clip(x_k)|: n_clients * max_weight / scale.

    Stochastic rounding moves each value by strictly less than one quantum (1/scale), times the
    client's weight. The weighted mean (decoded sum / sum of weights) is therefore off by less
    than 1/scale, the n_clients=1 bound, however many clients there are.
    """
    if n_clients < 0 or max_weight < 0:
        raise ValueError("n_clients and max_weight must be non-negative")
    return n_clients * max_weight / scale_for(clip, value_bits)
