"""A device's contribution as one fixed-point vector, and the server's decoding of the sum.

Layout: the keys of `aggregation.expected_shapes(shapes)` in sorted order, flattened. Values
(deltas of LoRA B and heads) are clipped, stochastically rounded and multiplied by the device's
integer weight (its examples) inside the encoding; the weights themselves (`KEY#weight`) are
exact integers. So the server learns sum_k w_k x_k and sum_k w_k, never a device's weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from federation.aggregation import WEIGHT, contribution, expected_shapes
from federation.secagg.protocol import Params
from federation.secagg.quantize import decode_signed, decode_sum, encode, encode_integers


def vector_length(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(int(np.prod(s)) for s in expected_shapes(shapes).values())


def encode_update(
    delta: Mapping[str, np.ndarray],
    weight: int,
    shapes: Mapping[str, tuple[int, ...]],
    params: Params,
    rank: int | None = None,
) -> np.ndarray:
    """The device's contribution, encoded in Z_(2^m) (uint64), ready to be masked."""
    if not 0 < weight <= params.max_weight:
        raise ValueError(f"weight {weight} is outside (0, {params.max_weight}]: it could wrap the sum")
    weights = contribution(delta, float(weight), rank)  # the `#weight` entries (and checks ranks)
    parts = []
    for key in sorted(expected_shapes(shapes)):
        if key.endswith(WEIGHT):
            parts.append(encode_integers(np.rint(weights[key]).astype(np.int64).ravel(), params.modulus_bits))
        else:
            value = np.asarray(delta[key], dtype=np.float64)
            if value.shape != tuple(shapes[key]):
                raise ValueError(f"{key} has shape {value.shape}, expected {tuple(shapes[key])}")
            parts.append(
                encode(value.ravel(), params.clip, params.value_bits, params.modulus_bits, weight=int(weight))
            )
    vector = np.concatenate(parts)
    if len(vector) != params.length:
        raise ValueError(f"encoded length {len(vector)} != the round's {params.length}")
    return vector


def decode_total(
    vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]], params: Params
) -> dict[str, np.ndarray]:
    """The decoded sum as an aggregation contribution (sum of w x, and sum of w per key)."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for key, shape in sorted(expected_shapes(shapes).items()):
        size = int(np.prod(shape))
        chunk = vector[offset : offset + size]
        offset += size
        if key.endswith(WEIGHT):
            out[key] = decode_signed(chunk, params.modulus_bits).astype(np.float64).reshape(shape)
        else:
            out[key] = decode_sum(chunk, params.clip, params.value_bits, params.modulus_bits).reshape(shape)
    return out
