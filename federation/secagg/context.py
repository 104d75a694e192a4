"""Unambiguous byte encodings of protocol context: HKDF `info` strings and AES-GCM associated data.

Secure aggregation (Bonawitz et al., CCS 2017; Bell et al., CCS 2020) derives every key and mask
from a per-round context so that nothing computed for one run, round or protocol stage can be
replayed in another. The encoding must be injective: naive concatenation would let run "a1",
round 2 collide with run "a", round 12. Each field is therefore tagged with its type and
length-prefixed, behind a fixed domain label.
"""

from __future__ import annotations

import struct

__all__ = ["pack_fields", "round_context", "share_aad"]

# Versioned so that a future change of encoding can never collide with this one.
_DOMAIN = b"fedge-secagg-v1"


def pack_fields(*fields: bytes | str | int) -> bytes:
    """Injectively encode a sequence of bytes / str / non-negative int fields (< 2**64)."""
    out = [_DOMAIN]
    for field in fields:
        # bool is an int subclass; refuse it so True and 1 cannot silently mean the same field.
        if isinstance(field, bool):
            raise TypeError("pack_fields: bool is not a valid field (pass an int explicitly)")
        if isinstance(field, int):
            if not 0 <= field < 2**64:
                raise ValueError(f"pack_fields: integer field {field} is outside [0, 2**64)")
            out.append(b"i" + struct.pack(">Q", field))
        elif isinstance(field, str):
            data = field.encode("utf-8")
            out.append(b"s" + struct.pack(">I", len(data)) + data)
        elif isinstance(field, bytes | bytearray | memoryview):
            data = bytes(field)
            out.append(b"b" + struct.pack(">I", len(data)) + data)
        else:
            raise TypeError(f"pack_fields: unsupported field type {type(field).__name__}")
    return b"".join(out)


def round_context(run_id: bytes | str | int, server_round: int, stage: str) -> bytes:
    """Context for key agreement and mask derivation: (run id, round, protocol stage)."""
    return pack_fields("round-context", run_id, server_round, stage)


def share_aad(run_id: bytes | str | int, server_round: int, sender_id: int, receiver_id: int) -> bytes:
    """AES-GCM associated data for a share bundle sent from `sender_id` to `receiver_id`.

    Binding both ids and the round means the server, which relays the ciphertexts, cannot
    redirect a bundle to another client or replay one from an earlier round or run.
    """
    return pack_fields("share-aad", run_id, server_round, sender_id, receiver_id)
