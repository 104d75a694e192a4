"""Shamir t-out-of-n secret sharing of byte strings over the prime field GF(2**521 - 1).

Secure aggregation uses it for dropout recovery (Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017, §4; Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020). In fedge's protocol a
device shares only its self-mask seed among its neighbours (Bonawitz's protocol also shares the
masking private key; fedge instead has survivors reveal their pairwise seeds with vanished
neighbours, see `protocol`). Any `threshold` neighbours can reconstruct the seed; fewer learn
nothing about it (information-theoretically).

Field choice: p = 2**521 - 1, the Mersenne prime M521.
- A 32-byte key or seed (the common case) is a single field element: no chunking in the hot path.
  Longer secrets are split into 64-byte chunks (512 bits < 521), each shared with an independent
  random polynomial (reusing coefficients across chunks would leak chunk differences).
- Any 64-bit id (e.g. a Flower node id) is a valid, distinct, nonzero evaluation point.
- Python integers do the 521-bit arithmetic in microseconds; inverses use pow(x, -1, p).

Share format (bytes): 4-byte big-endian secret length, then one 66-byte big-endian field
element per chunk. Random polynomial coefficients come from `secrets` (a CSPRNG): a predictable
coefficient would let fewer than `threshold` shares reveal the secret.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping, Sequence

__all__ = ["PRIME", "combine", "split"]

PRIME = 2**521 - 1
_CHUNK = 64  # secret bytes per field element; 8 * 64 = 512 bits < 521, so every chunk is < PRIME
_ELEM = (PRIME.bit_length() + 7) // 8  # 66 bytes encode any field element
_HEADER = struct.Struct(">I")


def _check_ids(ids: Sequence[int]) -> None:
    for i in ids:
        # bool is an int; a share id of True is almost certainly a caller bug.
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"share ids must be ints, got {i!r}")
        if not 0 < i < PRIME:
            raise ValueError(
                f"share id {i} must be a nonzero integer below the field prime (ids are 1-based)"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"share ids must be distinct, got {sorted(ids)}")


def _chunks(secret: bytes) -> list[bytes]:
    return [secret[i : i + _CHUNK] for i in range(0, len(secret), _CHUNK)]


def split(secret: bytes, threshold: int, share_ids: Sequence[int]) -> dict[int, bytes]:
    """Split `secret` into one share per id; any `threshold` shares reconstruct it.

    threshold == 1 degenerates to every share containing the secret itself (no privacy); it is
    allowed because a protocol with a single neighbour may legitimately need it.
    """
    secret = bytes(secret)
    if not secret:
        raise ValueError("cannot share an empty secret")
    ids = list(share_ids)
    _check_ids(ids)
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if threshold > len(ids):
        raise ValueError(
            f"threshold {threshold} exceeds the number of shares {len(ids)}: "
            "the secret could never be recovered"
        )
    bodies: dict[int, list[bytes]] = {i: [] for i in ids}
    for chunk in _chunks(secret):
        # f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}, a_j uniform in GF(p) from a CSPRNG.
        coeffs = [int.from_bytes(chunk, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
        for x in ids:
            acc = 0
            for c in reversed(coeffs):  # Horner's rule
                acc = (acc * x + c) % PRIME
            bodies[x].append(acc.to_bytes(_ELEM, "big"))
    header = _HEADER.pack(len(secret))
    return {x: header + b"".join(parts) for x, parts in bodies.items()}


def _parse(share_id: int, share: bytes) -> tuple[int, list[int]]:
    if len(share) < _HEADER.size:
        raise ValueError(f"share {share_id} is truncated ({len(share)} bytes)")
    (length,) = _HEADER.unpack_from(share)
    n_chunks = -(-length // _CHUNK)
    if length == 0 or len(share) != _HEADER.size + n_chunks * _ELEM:
        raise ValueError(f"share {share_id} is malformed: {len(share)} bytes for a {length}-byte secret")
    elems = []
    for k in range(n_chunks):
        start = _HEADER.size + k * _ELEM
        v = int.from_bytes(share[start : start + _ELEM], "big")
        if v >= PRIME:
            raise ValueError(f"share {share_id} holds a value outside the field")
        elems.append(v)
    return length, elems


class _Interpolator:
    """Lagrange evaluation through fixed points xs: denominators (O(t^2)) are inverted once."""

    def __init__(self, xs: Sequence[int]) -> None:
        self.xs = list(xs)
        self.inv_den = []
        for i, xi in enumerate(self.xs):
            den = 1
            for j, xj in enumerate(self.xs):
                if j != i:
                    den = den * (xi - xj) % PRIME
            self.inv_den.append(pow(den, -1, PRIME))

    def weights(self, at: int) -> list[int]:
        """l_i(at) for every i, with prefix/suffix products so each call is O(t)."""
        diffs = [(at - x) % PRIME for x in self.xs]
        t = len(diffs)
        prefix = [1] * (t + 1)
        for i, d in enumerate(diffs):
            prefix[i + 1] = prefix[i] * d % PRIME
        suffix = [1] * (t + 1)
        for i in range(t - 1, -1, -1):
            suffix[i] = suffix[i + 1] * diffs[i] % PRIME
        return [prefix[i] * suffix[i + 1] % PRIME * self.inv_den[i] % PRIME for i in range(t)]


def combine(shares: Mapping[int, bytes], threshold: int, *, verify: bool = True) -> bytes:
    """Reconstruct the secret from at least `threshold` shares (Lagrange interpolation at 0).

    The `threshold` smallest ids are interpolated. With `verify`, every extra share must lie on
    the same polynomial; otherwise ValueError. This turns a corrupted or misrouted share into a
    loud error instead of a wrong key, which would silently ruin the unmasked aggregate.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ValueError(
            f"not enough shares to reconstruct: got {len(shares)}, need at least threshold={threshold}"
        )
    ids = sorted(shares)
    _check_ids(ids)
    parsed = {i: _parse(i, bytes(shares[i])) for i in ids}
    lengths = {length for length, _ in parsed.values()}
    if len(lengths) != 1:
        raise ValueError(f"shares disagree on the secret length: {sorted(lengths)}")
    length = lengths.pop()
    base, extra = ids[:threshold], ids[threshold:]
    interp = _Interpolator(base)
    at_zero = interp.weights(0)
    n_chunks = len(parsed[base[0]][1])
    values = [
        sum(w * parsed[x][1][k] for w, x in zip(at_zero, base, strict=True)) % PRIME for k in range(n_chunks)
    ]
    if verify:
        for e in extra:
            w_e = interp.weights(e)
            for k in range(n_chunks):
                if (
                    sum(w * parsed[x][1][k] for w, x in zip(w_e, base, strict=True)) % PRIME
                    != parsed[e][1][k]
                ):
                    raise ValueError(
                        f"share {e} is inconsistent with shares {base}: corrupted or from another secret"
                    )
    out = []
    for k, v in enumerate(values):
        chunk_len = min(_CHUNK, length - k * _CHUNK)
        if v >= 1 << (8 * chunk_len):
            # A true secret chunk is below 2**(8*len); anything else means inconsistent shares.
            raise ValueError(
                "reconstructed value is out of range: shares are corrupted or from different secrets"
            )
        out.append(v.to_bytes(chunk_len, "big"))
    return b"".join(out)
