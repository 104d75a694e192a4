"""`fedex-lora`: FedEx-LoRA, FedIT's averages plus the exact residual folded into the frozen weights.

Singhal, Ponkshe and Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", NAACL 2025 (ACL Anthology 2025.naacl-long). Averaging A and B
separately (FedIT) is not the average of the devices' products; FedEx-LoRA keeps FedIT's averages
as the new adapter and adds the difference to the frozen weight, so the model is exactly the
average of the devices' models:

    B' = sum p_k B_k / P,   A' = sum p_k A_k / P,
    W0' = W0 + s (sum_k p_k B_k A_k / P - B' A'),   s = alpha / r  (the LoRA scaling).

Public implementations have dropped the scaling s from that residual; in fedge it cannot go
missing in a rule: the global state keeps the residual R in the adapter's own units (weight =
W0 + s (R + B A), `federation.rules.base`), and the model applies s where the weight is formed,
on the server and on every device alike. With B_k = B + dB_k and A_k = A + dA_k (the round's
deltas), the cross terms cancel and the residual's change is

    dR = sum_k p_k dB_k dA_k / P - (sum p_k dB_k / P)(sum p_k dA_k / P),

which needs each device's own product dB_k dA_k: the server computes it from the device's
upload, so secure aggregation (which reveals only a sum) cannot carry this rule as implemented.
(A device could upload its d x d' product instead, which sums, at ~d/(2r) times the upload.)

In fedge: the global state carries A and the residual of every LoRA target
(`Adapter.train_a`, `Adapter.residual`); devices train A and B with AdamW at `lr` and upload
FedIT's weighted deltas. The paper trains one rank on every device: a mixed-rank fleet is
refused unless `uniform-rank` is set.

Parameters: none beyond the run's (`lr`, `lora-rank`, `lora-alpha`: s = alpha / lora-rank).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from federation.rules import exact_mixed_rank
from federation.rules.base import (
    Adapter,
    Rule,
    Slot,
    a_key_of,
    add_mean_delta,
    is_b_key,
    is_residual_key,
    lora_product,
    residual_key_of,
)

NAME = "fedex-lora"
WEIGHT = exact_mixed_rank.WEIGHT


def uploaded_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every key but the residuals (the server's to move)."""
    return {k: s for k, s in shapes.items() if not is_residual_key(k)}


def layout(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Slot]:
    return exact_mixed_rank.layout(uploaded_shapes(shapes))


def check(
    contrib: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], max_weight: float
) -> str | None:
    return exact_mixed_rank.validate_contribution(contrib, uploaded_shapes(shapes), max_weight)


@dataclass
class FedExState:
    sums: exact_mixed_rank.SumState = field(default_factory=exact_mixed_rank.SumState)
    products: dict[str, np.ndarray] = field(default_factory=dict)  # residual key -> sum p_k dB_k dA_k


def init() -> FedExState:
    return FedExState()


def device_products(upload: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """p_k dB_k dA_k of one device's upload (p dB, p dA and p), by the layer's residual key."""
    out = {}
    for key, value in upload.items():
        if not is_b_key(key) or key.endswith(WEIGHT):
            continue
        weight = float(np.asarray(upload[key + WEIGHT]).ravel()[0])
        if weight <= 0:
            continue
        a = a_key_of(key)
        out[residual_key_of(key)] = lora_product(value, upload[a]) / weight  # (p dB)(p dA) / p
    return out


def add(state: FedExState, upload: Mapping[str, np.ndarray]) -> FedExState:
    """Fold one device's upload: its weighted deltas into the sums, its own product beside them."""
    for key, product in device_products(upload).items():
        if key in state.products:
            state.products[key] += product
        else:
            state.products[key] = product
    exact_mixed_rank.add(state.sums, upload)
    return state


def finalize(state: FedExState) -> dict[str, np.ndarray]:
    """FedIT's mean deltas of A, B and the heads, and each residual's change dR."""
    out = exact_mixed_rank.finalize(state.sums)
    for res_key, total in state.products.items():
        b_key = next(k for k in state.sums.sums if is_b_key(k) and not k.endswith(WEIGHT)
                     and residual_key_of(k) == res_key)  # fmt: skip
        weight = float(state.sums.sums[b_key + WEIGHT][0])  # P: every device trains B's first column
        mean_b, mean_a = out.get(b_key), out.get(a_key_of(b_key))
        if weight <= 0 or mean_b is None or mean_a is None:
            continue
        out[res_key] = total / weight - lora_product(mean_b, mean_a)
    return out


RULE = Rule(
    name=NAME,
    paper='FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient '
    'Fine-Tuning of Foundation Models", NAACL 2025)',
    is_sum=False,
    not_sum_reason="its residual needs each device's own product dB_k dA_k, computed on the server "
    "from the device's A and B, and secure aggregation reveals only their sums",
    layout=layout,
    upload=exact_mixed_rank.contribution,
    check=check,
    init=init,
    add=add,
    finalize=finalize,
    update=add_mean_delta,
    adapter=Adapter(train_a=True, lora_fa=False, residual=True, uniform_rank=True),
    class_rows=True,
)
