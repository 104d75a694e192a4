"""A device's contribution as one fixed-point vector, and the server's decoding of the sum.

Layout: what the run's aggregation rule declares it uploads (`Rule.layout`: keys, shapes, which
entries are weights and which weights stand behind each value), in sorted key order, flattened.
Values (a slot holding the device's weight times its delta) are clipped, stochastically rounded
and multiplied by the device's integer weight (its examples) inside the encoding; weights are
exact integers. So the server learns sum_k w_k x_k and sum_k w_k, never a device's weight. Only a
rule that is a sum of uploads (`Rule.is_sum`) can be encoded. `check_plausible_sum` then checks
what every honest sum satisfies (hostile devices).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from federation.rules.base import Rule, Slot, device_upload
from federation.secagg.protocol import Params, SecAggAbort
from federation.secagg.quantize import decode_signed, decode_sum, encode, encode_integers


def secure_layout(rule: Rule, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Slot]:
    """The rule's upload layout for a task of these state shapes, if secure aggregation can carry it."""
    if not rule.is_sum:
        raise ValueError(f"aggregation rule {rule.name!r} is not a sum: {rule.not_sum_reason}")
    return dict(sorted(rule.layout(shapes).items()))


def vector_length(rule: Rule, shapes: Mapping[str, tuple[int, ...]], dp: bool = False) -> int:
    """Coordinates of the secure vector; with distributed DP the values are rotated as one vector
    padded to a power of two (`dp_value_length` of them), then the weights."""
    if not dp:
        return sum(int(np.prod(slot.shape)) for slot in secure_layout(rule, shapes).values())
    from federation.privacy.rotation import padded_length

    layout = secure_layout(rule, shapes)
    weights = sum(int(np.prod(slot.shape)) for slot in layout.values() if slot.weights)
    return padded_length(dp_value_length(rule, shapes)) + weights


def dp_value_length(rule: Rule, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Value coordinates of the rule's layout (what distributed DP clips, rotates and noises)."""
    return sum(int(np.prod(slot.shape)) for slot in secure_layout(rule, shapes).values() if not slot.weights)


def _encode_private(
    rule: Rule, delta: Mapping[str, np.ndarray], upload: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]], params: Params,
) -> np.ndarray:  # fmt: skip
    """Distributed DP's vector: the unweighted values clipped, rotated, rounded and noised as one
    (`federation.privacy.encoding`), then the weights (1 on every trained entry) exactly."""
    from federation.privacy.encoding import encode_values

    layout = secure_layout(rule, shapes)
    values = []
    for key, slot in layout.items():
        if not slot.weights:
            value = np.asarray(delta[key], dtype=np.float64)
            if value.shape != tuple(slot.shape):
                raise ValueError(f"{key} has shape {value.shape}, expected {tuple(slot.shape)}")
            values.append(value.ravel())
    private = encode_values(np.concatenate(values), params.dp_plan(), params.dp_rotation_seed)
    weights = [np.rint(upload[k]).astype(np.int64).ravel() for k, slot in layout.items() if slot.weights]
    return encode_integers(np.concatenate([private, *weights]), params.modulus_bits)


def encode_update(
    rule: Rule,
    delta: Mapping[str, np.ndarray],
    weight: int,
    shapes: Mapping[str, tuple[int, ...]],
    params: Params,
    rank: int | None = None,
    classes: np.ndarray | None = None,
) -> np.ndarray:
    """The device's contribution, encoded in Z_(2^m) (uint64), ready to be masked. With distributed
    DP every device weighs 1 (its examples stay on it): the noise covers one device's clipped update,
    so no device may count more than once; and `classes` is not used (every class row counts): the
    weights are exact integers outside the noise, so per-class weights would publish, unnoised, how
    many devices hold each class."""
    if params.dp:
        if params.dp_length != dp_value_length(rule, shapes):
            raise ValueError(f"the round's private length {params.dp_length} is not this task's values'")
        if not weight > 0:
            raise ValueError(f"weight {weight} must be positive")
        vector = _encode_private(rule, delta, rule.upload(delta, 1.0, rank), shapes, params)
        if len(vector) != params.length:
            raise ValueError(f"encoded length {len(vector)} != the round's {params.length}")
        return vector
    if not 0 < weight <= params.max_weight:
        raise ValueError(f"weight {weight} is outside (0, {params.max_weight}]: it could wrap the sum")
    upload = device_upload(rule, delta, float(weight), rank, classes)  # the weights entries (and the checks)
    layout = secure_layout(rule, shapes)
    parts = []
    for key, slot in layout.items():
        if slot.weights:
            parts.append(encode_integers(np.rint(upload[key]).astype(np.int64).ravel(), params.modulus_bits))
            continue
        value = np.asarray(delta[key], dtype=np.float64)
        if value.shape != tuple(slot.shape):
            raise ValueError(f"{key} has shape {value.shape}, expected {tuple(slot.shape)}")
        if slot.axis is not None and layout[slot.weighted_by].classes:
            # class rows: each row carries the weight behind it (0 for a class the device lacks)
            behind = np.rint(upload[slot.weighted_by]).astype(np.int64)
            rows = np.moveaxis(value, slot.axis, 0)
            encoded = np.stack([
                encode(row.ravel(), params.clip, params.value_bits, params.modulus_bits, weight=int(w))
                .reshape(row.shape)
                for row, w in zip(rows, behind, strict=True)
            ])  # fmt: skip
            parts.append(np.moveaxis(encoded, 0, slot.axis).ravel())
        else:
            parts.append(
                encode(value.ravel(), params.clip, params.value_bits, params.modulus_bits, weight=int(weight))
            )
    vector = np.concatenate(parts)
    if len(vector) != params.length:
        raise ValueError(f"encoded length {len(vector)} != the round's {params.length}")
    return vector


def decode_total(
    rule: Rule, vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]], params: Params, survivors: int = 0
) -> dict[str, np.ndarray]:
    """The decoded sum as one of the rule's uploads (sum of w x, and sum of w per key). With
    distributed DP the values are checked (a wrap or an unclipped device aborts: `ImplausibleSumError`),
    unscaled and rotated back; they then hold the sum of the clipped updates plus the noise."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    if params.dp:
        from federation.privacy.encoding import decode_values

        plan = params.dp_plan()
        private = decode_signed(vector[: plan.dim], params.modulus_bits)
        _check_private(private, plan, survivors)
        values = decode_values(private, plan, params.dp_rotation_seed)
        weights = vector[plan.dim :]
        value_offset = 0
        for key, slot in secure_layout(rule, shapes).items():
            size = int(np.prod(slot.shape))
            if slot.weights:
                chunk = weights[offset : offset + size]
                offset += size
                out[key] = decode_signed(chunk, params.modulus_bits).astype(np.float64).reshape(slot.shape)
            else:
                out[key] = values[value_offset : value_offset + size].reshape(slot.shape)
                value_offset += size
        return out
    for key, slot in secure_layout(rule, shapes).items():
        size = int(np.prod(slot.shape))
        chunk = vector[offset : offset + size]
        offset += size
        if slot.weights:
            out[key] = decode_signed(chunk, params.modulus_bits).astype(np.float64).reshape(slot.shape)
        else:
            total = decode_sum(chunk, params.clip, params.value_bits, params.modulus_bits)
            out[key] = total.reshape(slot.shape)
    return out


class ImplausibleSumError(SecAggAbort):
    """The decoded sum is not one that honest devices can produce: a device lied in its input."""


def _check_private(private: np.ndarray, plan, survivors: int) -> None:  # plan: DpPlan
    from federation.privacy.encoding import PrivateSumError, check_private_sum

    if survivors < 1:
        raise ValueError("decoding a private sum needs the number of devices in it")
    try:
        check_private_sum(private, plan, survivors)
    except PrivateSumError as exc:
        raise ImplausibleSumError(str(exc)) from None


def check_plausible_sum(
    rule: Rule,
    decoded: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    params: Params,
    devices: int,
) -> float:
    """What every sum of `devices` honest contributions satisfies; raise ImplausibleSumError, naming
    the check, when this one does not. Returns the total weight W.

    Honest device k puts its weight w_k in 1..max_weight on a prefix (at least the first entry) of
    every weights slot of the rule's layout, 0 on the rest (on a class weights slot: on the classes
    it holds, at least one), and w_k * q with |q| <= clip * scale in each value coordinate behind a
    weight w_k (0 behind a 0; clipping happens before rounding, so the bound is exact). Hence:
    - weights: the first entry of every (non-class) weights slot equals W; entries never increase
      along a slot and stay in [0, W]; a class slot's entries stay in [0, W] and sum to at least W
      (every device holds a class) and at most W x the classes;
    - total: devices <= W <= devices * max_weight;
    - values: |sum| <= clip * (the weight behind that entry), coordinate by coordinate.
    Without proofs of bounded input (ACORN, Bell et al., USENIX Security 2023; RoFL, Lycklama
    et al., S&P 2023) a device can still send any vector that keeps the *sum* within these
    bounds: these checks catch garbage (huge values, negative or inflated weights, a bogus
    revealed seed), not a careful poisoner (docs/secure-aggregation.md, "Hostile devices").
    """
    layout = secure_layout(rule, shapes)
    weights = {
        k: np.asarray(decoded[k], dtype=np.float64).ravel() for k, slot in layout.items() if slot.weights
    }
    firsts = {float(w[0]) for k, w in weights.items() if not layout[k].classes}
    if len(firsts) != 1:
        raise ImplausibleSumError(
            f"weights inconsistent across keys (weights-consistent): {sorted(firsts)[:4]}"
        )
    total = firsts.pop()
    if params.dp and total != devices:  # every device weighs exactly 1
        raise ImplausibleSumError(f"total weight {total:g} is not the {devices} devices' (weight-range)")
    if not devices <= total <= devices * params.max_weight:
        raise ImplausibleSumError(
            f"total weight {total:g} outside [{devices}, {devices * params.max_weight}] for {devices} "
            "devices (weight-range)"
        )
    for key, w in weights.items():
        if layout[key].classes:
            if params.dp and np.any(w != total):  # under DP every device weighs every class row
                raise ImplausibleSumError(f"{key}: class weights under distributed DP (weight-range)")
            if np.any(w < 0) or np.any(w > total) or not total <= w.sum() <= total * w.size:
                raise ImplausibleSumError(
                    f"{key}: class weights are not in [0, W] or do not sum to between W and W x classes"
                )
        elif np.any(w < 0) or np.any(w > total) or np.any(np.diff(w) > 0):
            raise ImplausibleSumError(f"{key}: column weights are not a non-increasing profile in [0, W]")
    if params.dp:
        return total  # the values were checked in the rotated integer domain (decode_total)
    slack = 1.0 + 1e-9  # float64 rounding of the decode, nothing more: the bound itself is exact
    for key, slot in layout.items():
        if slot.weights:
            continue
        value = np.abs(np.asarray(decoded[key], dtype=np.float64))
        behind = weights[slot.weighted_by]
        if slot.axis is None:
            limit = params.clip * behind[0]
        else:
            view = [1] * value.ndim
            view[slot.axis] = -1
            limit = params.clip * behind.reshape(view)
        if np.any(value > limit * slack):
            worst = float(np.max(value - limit))
            raise ImplausibleSumError(
                f"{key}: a coordinate exceeds clip x its weight by {worst:.3g} (value-bound)"
            )
    return total
