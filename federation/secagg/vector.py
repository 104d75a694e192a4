"""A device's contribution as one fixed-point vector, and the server's decoding of the sum.

Layout: the keys of `aggregation.expected_shapes(shapes)` in sorted order, flattened. Values
(deltas of LoRA B and heads) are clipped, stochastically rounded and multiplied by the device's
integer weight (its examples) inside the encoding; the weights themselves (`KEY#weight`) are
exact integers. So the server learns sum_k w_k x_k and sum_k w_k, never a device's weight.
`check_plausible_sum` then checks what every honest sum satisfies (hostile devices).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from federation.aggregation import WEIGHT, contribution, expected_shapes
from federation.secagg.protocol import Params, SecAggAbort
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


class ImplausibleSumError(SecAggAbort):
    """The decoded sum is not one that honest devices can produce: a device lied in its input."""


def check_plausible_sum(
    decoded: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], params: Params, devices: int
) -> float:
    """What every sum of `devices` honest contributions satisfies; raise ImplausibleSumError, naming
    the check, when this one does not. Returns the total weight W.

    Honest device k contributes weight w_k in 1..max_weight to every head key and to the first
    r_k >= 1 columns of every LoRA B, and w_k * q with |q| <= clip * scale to each coordinate
    (clipping happens before rounding, so the bound is exact). Hence:
    - weights: every head weight and column 0 of every B equal W; B's column weights never
      increase along the columns and stay in [0, W];
    - total: devices <= W <= devices * max_weight;
    - values: |sum| <= clip * (the weight behind that entry), coordinate by coordinate.
    Without proofs of bounded input (ACORN, Bell et al., USENIX Security 2023; RoFL, Lycklama
    et al., S&P 2023) a device can still send any vector that keeps the *sum* within these
    bounds: these checks catch garbage (huge values, negative or inflated weights, a bogus
    revealed seed), not a careful poisoner (docs/secure-aggregation.md, "Hostile devices").
    """
    head_weights: dict[str, float] = {}
    column_weights: dict[str, np.ndarray] = {}
    for key in shapes:
        w = np.asarray(decoded[key + WEIGHT], dtype=np.float64).ravel()
        if ".lora_B." in key:
            column_weights[key] = w
        else:
            head_weights[key] = float(w[0])
    firsts = set(head_weights.values()) | {float(w[0]) for w in column_weights.values()}
    if len(firsts) != 1:
        raise ImplausibleSumError(
            f"weights inconsistent across keys (weights-consistent): {sorted(firsts)[:4]}"
        )
    total = firsts.pop()
    if not devices <= total <= devices * params.max_weight:
        raise ImplausibleSumError(
            f"total weight {total:g} outside [{devices}, {devices * params.max_weight}] for {devices} "
            "devices (weight-range)"
        )
    for key, w in column_weights.items():
        if np.any(w < 0) or np.any(w > total) or np.any(np.diff(w) > 0):
            raise ImplausibleSumError(f"{key}: column weights are not a non-increasing profile in [0, W]")
    slack = 1.0 + 1e-9  # float64 rounding of the decode, nothing more: the bound itself is exact
    for key in shapes:
        value = np.abs(np.asarray(decoded[key], dtype=np.float64))
        if key in column_weights:
            limit = params.clip * column_weights[key].reshape((1, -1) + (1,) * (value.ndim - 2))
        else:
            limit = np.float64(params.clip * total)
        if np.any(value > limit * slack):
            worst = float(np.max(value - limit))
            raise ImplausibleSumError(
                f"{key}: a coordinate exceeds clip x its weight by {worst:.3g} (value-bound)"
            )
    return total
