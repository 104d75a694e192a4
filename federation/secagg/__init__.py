"""Secure-aggregation math: SecAgg+ (Bell et al., CCS 2020) with the dropout recovery of SecAgg
(Bonawitz et al., CCS 2017), as pure functions. No Flower imports; `server/` and `clients/` drive
the protocol over Flower's Message API.

- `shamir`: t-out-of-n secret sharing of seeds and keys over GF(2^521 - 1).
- `quantize`: clipping, unbiased stochastic rounding, fixed point in Z_(2^m) with a no-wrap m.
- `masking`: X25519 + HKDF pairwise seeds, ChaCha20 mask expansion, masking and unmasking.
- `graph`: the sparse random neighbour graph and its degree/threshold recommendations.
- `envelope`: AES-GCM sealing of share bundles, bound to run, round, sender and receiver.
- `context`: injective encodings of those contexts.
- `packing`: masked vectors packed to exactly m bits per coordinate for upload.
- `pki`: certified Ed25519 device keys (an operator CA) against a malicious server.
- `protocol`: one round as pure device and server steps, with every device-side check.
- `vector`: a device's contribution as one fixed-point vector; plausibility of a decoded sum.
Every primitive comes from `cryptography`; randomness from `secrets` / os.urandom only.
"""

from .context import pack_fields, round_context, share_aad
from .envelope import TamperedShareError, open_, seal
from .graph import neighbours, recommended_degree, recommended_threshold
from .masking import MaskedVectorError, agree, check_masked_vector, mask_vector, masked_input, unmask_sum
from .packing import PackedVectorError, pack_residues, packed_size, unpack_residues
from .quantize import (
    decode_signed,
    decode_sum,
    encode,
    encode_integers,
    modulus_bits,
    quantization_error_bound,
    scale_for,
)
from .shamir import combine, split

__all__ = [
    "MaskedVectorError",
    "PackedVectorError",
    "TamperedShareError",
    "agree",
    "check_masked_vector",
    "combine",
    "decode_signed",
    "decode_sum",
    "encode",
    "encode_integers",
    "mask_vector",
    "masked_input",
    "modulus_bits",
    "neighbours",
    "open_",
    "pack_fields",
    "pack_residues",
    "packed_size",
    "quantization_error_bound",
    "recommended_degree",
    "recommended_threshold",
    "round_context",
    "scale_for",
    "seal",
    "share_aad",
    "split",
    "unmask_sum",
    "unpack_residues",
]
