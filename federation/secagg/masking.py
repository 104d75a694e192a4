"""Pairwise and self masks for secure aggregation, from X25519, HKDF-SHA256 and ChaCha20.

The one-time-pad construction of Bonawitz et al. (CCS 2017, §4), restricted to the neighbours of
a sparse graph as in SecAgg+ (Bell et al., CCS 2020). Client u uploads, mod 2^m,

    y_u = x_u + PRG(b_u) + sum_{v in N(u), v > u} PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv)

where b_u is a fresh self-mask seed and s_uv = s_vu is agreed by X25519 between u and v. In the
sum over the survivors the pairwise masks between survivors cancel; the server then removes the
survivors' self masks (b_u reconstructed from Shamir shares) and the pairwise masks survivors
shared with dropped clients (s_uv revealed by the surviving client itself: fedge's protocol
shares no mask keys, see `protocol`). The self mask is what keeps a slow client's input hidden
if the server has obtained its pairwise seeds by declaring it dropped.

Mask generator: HKDF-SHA256(seed, info=context) -> 256-bit ChaCha20 key, keystream read as
little-endian uint64. ChaCha20 is constant-time and fast in software on phones and boards
without AES instructions (our clients are edge devices); each key is used for exactly one
stream, so the all-zero nonce is safe. Because 2^m divides 2^64, uniform 64-bit words reduced mod
2^m are exactly uniform: no rejection sampling is needed. `numpy.random` is never used: a 32-bit
seeded Mersenne Twister (flwr issue #7522) would make the masks predictable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .context import pack_fields

__all__ = [
    "MaskedVectorError",
    "agree",
    "check_masked_vector",
    "mask_vector",
    "masked_input",
    "unmask_sum",
]

SEED_BYTES = 32
# Keystream is produced in 1 MiB slices from one shared all-zero source buffer: bounded extra
# memory for any vector length, and the slice stays cache-resident while it is encrypted.
_SLICE_WORDS = 1 << 17
_ZEROS = memoryview(bytes(8 * _SLICE_WORDS))


class MaskedVectorError(ValueError):
    """A masked vector has the wrong shape, dtype, length or residues outside [0, 2^m)."""


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(secret)


def _check_modulus(m: int) -> None:
    if not 1 <= m <= 64:
        raise ValueError(f"modulus_bits must be in [1, 64], got {m}")


def _mask_info(context: bytes, kind: str) -> bytes:
    # Separate domains for self and pairwise masks: the same 32 bytes can never yield both.
    return pack_fields("mask", kind, context)


def mask_vector(seed: bytes, length: int, modulus_bits: int, context: bytes) -> np.ndarray:
    """Pseudorandom uint64 vector uniform in [0, 2^modulus_bits), deterministic in (seed, context)."""
    _check_modulus(modulus_bits)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    out = np.empty(length, dtype=np.uint64)
    _keystream_into(seed, context, out)
    if modulus_bits < 64:
        np.bitwise_and(out, np.uint64((1 << modulus_bits) - 1), out=out)
    return out


def _keystream_into(seed: bytes, context: bytes, out: np.ndarray) -> None:
    """Fill `out` (uint64) with the full 64-bit keystream words of (seed, context).

    Callers that add several masks reduce mod 2^m once at the end: 2^m divides 2^64, so adding
    unreduced words and reducing afterwards gives the same residues as reducing each mask.
    """
    if len(seed) < 16:
        raise ValueError(f"mask seed must be at least 16 bytes, got {len(seed)}")
    key = _hkdf(bytes(seed), pack_fields("mask-vector", context))
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    view = memoryview(out).cast("B")
    total = 8 * out.size
    for start in range(0, total, 8 * _SLICE_WORDS):
        stop = min(start + 8 * _SLICE_WORDS, total)
        chunk = _ZEROS[: stop - start]
        try:
            # Encrypting zeros yields the raw keystream; writing in place avoids a copy per slice.
            enc.update_into(chunk, view[start:stop])
        except ValueError:  # a cryptography version that wants block-size slack in the buffer
            view[start:stop] = enc.update(chunk)
    if not np.little_endian:
        out.byteswap(inplace=True)  # the keystream is defined as little-endian words on every host


def agree(private_key: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    """32-byte seed shared by two clients: HKDF-SHA256(X25519(sk, peer_pk), info=context).

    Symmetric: agree(sk_u, pk_v, c) == agree(sk_v, pk_u, c). Put run id, round and stage in
    `context` (see `round_context`) so one key pair can serve many rounds (Flamingo-style
    setup-once) without ever reusing a mask. Raises ValueError on a malformed or low-order key.
    """
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    return _hkdf(shared, pack_fields("pairwise-seed", context))


def _signed_pairwise(my_id: int, peer_id: int) -> int:
    if peer_id == my_id:
        raise ValueError(f"client {my_id} cannot have a pairwise mask with itself")
    return 1 if peer_id > my_id else -1  # Bonawitz's convention: + for larger ids, - for smaller


def masked_input(
    x_enc: np.ndarray,
    self_mask_seed: bytes,
    pairwise: Mapping[int, bytes],
    my_id: int,
    m: int,
    context: bytes,
) -> np.ndarray:
    """y = x + PRG(b) + sum_{v > me} PRG(s_v) - sum_{v < me} PRG(s_v) (mod 2^m) for 1-D uint64 x."""
    _check_modulus(m)
    y = _residues(x_enc, m, "encoded input").copy()
    # uint64 add/subtract wrap mod 2^64, and 2^m | 2^64, so one final reduction mod 2^m suffices.
    scratch = np.empty_like(y)  # one buffer reused for every mask: no allocation per neighbour
    _keystream_into(self_mask_seed, _mask_info(context, "self"), scratch)
    y += scratch
    for peer, seed in pairwise.items():
        _keystream_into(seed, _mask_info(context, "pair"), scratch)
        if _signed_pairwise(my_id, peer) > 0:
            y += scratch
        else:
            y -= scratch
    if m < 64:
        np.bitwise_and(y, np.uint64((1 << m) - 1), out=y)
    return y


def unmask_sum(
    masked_sum: np.ndarray,
    self_mask_seeds_of_survivors: Mapping[int, bytes] | Iterable[bytes],
    dropped_pairwise: Iterable[tuple[int, int, bytes]],
    m: int,
    context: bytes,
) -> np.ndarray:
    """Remove survivors' self masks and the pairwise masks they shared with dropped clients.

    `masked_sum` is the sum of the survivors' masked inputs, mod 2^m or mod 2^64 (uint64 wrap).
    `dropped_pairwise` holds (survivor_id, dropped_id, seed) for every graph edge between a
    survivor and a dropped client.
    Returns the plain mod-2^m sum of the survivors' encoded inputs.
    """
    _check_modulus(m)
    # The server's running sum wraps mod 2^64; since 2^m divides 2^64 it need not be reduced yet.
    total = _residues(masked_sum, 64, "masked sum").copy()
    seeds = (
        self_mask_seeds_of_survivors.values()
        if isinstance(self_mask_seeds_of_survivors, Mapping)
        else self_mask_seeds_of_survivors
    )
    scratch = np.empty_like(total)
    for seed in seeds:
        _keystream_into(seed, _mask_info(context, "self"), scratch)
        total -= scratch
    for survivor, dropped, seed in dropped_pairwise:
        _keystream_into(seed, _mask_info(context, "pair"), scratch)
        # The survivor added sign(survivor, dropped) * mask; undo exactly that.
        if _signed_pairwise(survivor, dropped) > 0:
            total -= scratch
        else:
            total += scratch
    if m < 64:
        np.bitwise_and(total, np.uint64((1 << m) - 1), out=total)
    return total


def check_masked_vector(v: np.ndarray, length: int, m: int, *, what: str = "masked vector") -> np.ndarray:
    """Validate a received vector: 1-D uint64 of `length` residues in [0, 2^m). Returns it.

    The server runs this on every upload before summing: a wrong length would misalign the sum,
    and an out-of-range residue would break the no-wrap guarantee of the modulus.
    """
    arr = np.asarray(v)
    if arr.ndim == 1 and arr.size != length:
        raise MaskedVectorError(f"{what} has length {arr.size}, expected {length}")
    return _residues(arr, m, what)


def _residues(v: np.ndarray, m: int, what: str) -> np.ndarray:
    _check_modulus(m)
    arr = np.asarray(v)
    if arr.ndim != 1:
        raise MaskedVectorError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.dtype != np.uint64:
        raise MaskedVectorError(f"{what} must have dtype uint64, got {arr.dtype}")
    if m < 64 and arr.size and int(arr.max()) >> m:
        raise MaskedVectorError(f"{what} has residues outside [0, 2^{m})")
    return arr
