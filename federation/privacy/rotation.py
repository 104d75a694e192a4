"""The randomized Hadamard rotation of distributed DP's encoding.

Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
Secure Aggregation", ICML 2021, Section 4 (and TensorFlow Federated's `DistributedDpSumFactory`):
before a device rounds its update to integers it applies x -> H D x / sqrt(D_pad), with D a
diagonal of random signs and H the Walsh-Hadamard matrix of order D_pad (the length padded to a
power of two). The rotation is orthogonal, so it keeps the L2 norm (and the DP sensitivity), and
it spreads the update's energy evenly over the coordinates ("flattening"), so that per-coordinate
rounding and the modulus's range are spent evenly. The server undoes it on the decoded sum:
because it is linear, rotate(sum x_k) = sum rotate(x_k), so every device must use the same signs:
the sign seed is public and fresh per round (sent with the round's parameters). It is not a
secret: the privacy comes from the noise, not from the rotation.

The signs come from a ChaCha20 keystream of the 32-byte seed (`cryptography`), the transform is a
vectorised in-place fast Walsh-Hadamard transform (D_pad log2 D_pad additions).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["padded_length", "rotate", "signs", "unrotate"]

SEED_BYTES = 32


def padded_length(length: int) -> int:
    """The power of two a vector of `length` coordinates is zero-padded to (at least 1)."""
    if length < 1:
        raise ValueError(f"cannot rotate an empty vector (length {length})")
    return 1 << (length - 1).bit_length()


def signs(seed: bytes, length: int) -> np.ndarray:
    """`length` random signs (+1.0 / -1.0) drawn from the seed's ChaCha20 keystream."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a rotation seed is {SEED_BYTES} bytes, got {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(bytes(seed), bytes(16)), mode=None).encryptor()
    raw = np.frombuffer(stream.update(bytes((length + 7) // 8)), dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little")[:length]
    return 1.0 - 2.0 * bits.astype(np.float64)


def _hadamard(x: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of a power-of-two-long vector (its own inverse)."""
    n = x.shape[0]
    y = x.astype(np.float64, copy=True)
    h = 1
    while h < n:
        view = y.reshape(-1, 2, h)
        a = view[:, 0, :].copy()
        view[:, 0, :] += view[:, 1, :]
        view[:, 1, :] = a - view[:, 1, :]
        h *= 2
    return y / np.sqrt(n)


def rotate(x: np.ndarray, seed: bytes) -> np.ndarray:
    """H D x / sqrt(D_pad), x zero-padded to D_pad = padded_length(len(x)). Returns D_pad floats."""
    x = np.asarray(x, dtype=np.float64).ravel()
    size = padded_length(x.size)
    padded = np.zeros(size)
    padded[: x.size] = x
    return _hadamard(padded * signs(seed, size))


def unrotate(y: np.ndarray, seed: bytes, length: int) -> np.ndarray:
    """The inverse of `rotate`: D H y / sqrt(D_pad), cut back to the first `length` coordinates."""
    y = np.asarray(y, dtype=np.float64).ravel()
    size = y.size
    if size != padded_length(length):
        raise ValueError(f"a rotated vector of {length} coordinates has {padded_length(length)}, got {size}")
    return (_hadamard(y) * signs(seed, size))[:length]
