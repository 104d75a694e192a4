"""Authenticated encryption of Shamir share bundles between two clients (AES-GCM).

In SecAgg (Bonawitz et al., CCS 2017, round "ShareKeys") and SecAgg+ (Bell et al., CCS 2020),
a client's shares travel to its neighbours through the server, encrypted under a key the two
clients agreed by X25519 (`masking.agree` with an encryption-stage context: a 256-bit key). The
server must neither read them (with t of them it would rebuild a device's self-mask seed) nor
tamper with, redirect or replay them. AES-GCM gives confidentiality and integrity; the
associated data binds run id, round, sender and receiver (`context.share_aad`). The pairwise key
is symmetric, so the associated data is what stops a share u sealed for v from being handed back
to u as if v had sent it (u would then open and reveal shares of its own seed); a bundle
replayed from another round or run also fails (its key's context differs too).

Format: 12-byte random nonce || ciphertext || 16-byte tag. The nonce comes from os.urandom:
with a 96-bit random nonce, collisions under one key are negligible for the handful of messages
a pairwise key ever encrypts (keys are per context, hence per round).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["TamperedShareError", "open_", "seal"]

NONCE_BYTES = 12
TAG_BYTES = 16


class TamperedShareError(ValueError):
    """A share bundle failed authentication: modified, truncated, replayed or misaddressed."""


def _check_key(key: bytes) -> None:
    if len(key) not in (16, 24, 32):
        raise ValueError(f"AES-GCM key must be 16, 24 or 32 bytes, got {len(key)}")


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate `plaintext`, binding `aad`; returns nonce || ciphertext || tag."""
    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(bytes(key)).encrypt(nonce, bytes(plaintext), bytes(aad))


def open_(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Decrypt a `seal` output; raise TamperedShareError unless key, bytes and aad all match."""
    _check_key(key)
    data = bytes(ciphertext)
    if len(data) < NONCE_BYTES + TAG_BYTES:
        raise TamperedShareError(f"share bundle truncated: {len(data)} bytes < {NONCE_BYTES + TAG_BYTES}")
    try:
        return AESGCM(bytes(key)).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], bytes(aad))
    except InvalidTag:
        raise TamperedShareError(
            "share bundle failed authentication (tampered, or from another round, run, sender or receiver)"
        ) from None
