"""`flora`: FLoRA, the devices' adapters stacked, their product merged into the frozen weights,
adapters re-initialised every round.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024. Stacking the devices' modules, B_stack =
[p_1 B_1 | ... | p_K B_K] / P and A_stack = [A_1; ...; A_K], gives B_stack A_stack = sum_k p_k
B_k A_k / P: exactly the weighted average of the devices' updates, for any mix of ranks
(noise-free aggregation). The product is merged into the frozen weight and every device starts
the next round from a fresh adapter (B = 0).

In fedge: the global state carries A, B and each LoRA target's residual R (weight = W0 +
s (R + B A), s = alpha / r_max: the scaling is applied where the weight is formed). Every round
starts from B = 0 and A = A0, the run's seeded A (the paper draws a fresh random A each round;
with B = 0 the starting model is the same, and the seeded A spares sending it). A device of
rank r trains A[:r] and B[:, :r] with AdamW and uploads weight x its deltas dB_k = B_k and dA_k
= A_k - A0 (zero beyond its rank). The server folds, per device, p_k dB_k dA_k, and updates

    R <- R + (sum p_k dB_k / P) A0 + sum p_k dB_k dA_k / P  ( = R + sum p_k B_k A_k / P ),

B <- 0, A <- A0, heads <- their weighted mean. Differences from the paper: the server merges
and sends the residual (d x d' per target) rather than the stacked modules (sum r_k (d + d')),
so a device's download is the merged weight change whatever the round's ranks; one scaling s
for every rank (fedge's), where the paper's per-rank peft scaling alpha / r_k weights
low-rank devices up. The product needs each device's own A and B: not a sum, so secure
aggregation cannot carry it (stacking shows the server every device's adapter).

Parameters: none beyond the run's (`lr`, `lora-rank`, `lora-alpha`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from federation.rules import exact_mixed_rank, fedex_lora
from federation.rules.base import (
    Adapter,
    Rule,
    a_key_of,
    is_a_key,
    is_b_key,
    lora_product,
    residual_key_of,
)

NAME = "flora"
WEIGHT = exact_mixed_rank.WEIGHT
STACKED = "#stacked"  # aggregate key suffix: sum p_k dB_k / P (over every device, whatever its rank)


def finalize(state: fedex_lora.FedExState) -> dict[str, np.ndarray]:
    """Heads: their weighted mean delta; each layer: sum p dB / P (`KEY#stacked`) and sum p dB dA / P
    (its residual key), P the round's total weight (every device trains B's first column)."""
    means = exact_mixed_rank.finalize(state.sums)
    out = {k: v for k, v in means.items() if not (is_a_key(k) or is_b_key(k))}
    for key, total in state.sums.sums.items():
        if not is_b_key(key) or key.endswith(WEIGHT):
            continue
        weight = float(state.sums.sums[key + WEIGHT][0])
        if weight <= 0:
            continue
        out[key + STACKED] = total / weight
        product = state.products.get(residual_key_of(key))
        if product is not None:
            out[residual_key_of(key)] = product / weight
    return out


def update(global_state: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray], server_lr: float = 1.0
           ) -> dict[str, np.ndarray]:  # fmt: skip
    """Merge the stacked product into each residual, re-initialise the adapters (B = 0, A = A0),
    move the heads by their mean delta."""
    new = {k: np.array(v, copy=True) for k, v in global_state.items()}
    for key, mean in aggregate.items():
        if key.endswith(STACKED):
            b_key = key[: -len(STACKED)]
            res = residual_key_of(b_key)
            merged = lora_product(mean, global_state[a_key_of(b_key)])
            new[res] = (new[res].astype(np.float64) + server_lr * merged).astype(new[res].dtype)
        elif key in new:
            new[key] = (new[key].astype(np.float64) + server_lr * mean).astype(new[key].dtype)
    for key in new:
        if is_b_key(key):
            new[key] = np.zeros_like(new[key])  # a fresh adapter: A stays the seeded A0 (never moved)
    return new


RULE = Rule(
    name=NAME,
    paper='FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous '
    'Low-Rank Adaptations", NeurIPS 2024): stacking',
    is_sum=False,
    not_sum_reason="stacking multiplies each device's own B by its own A, so the server needs every "
    "device's adapter, and secure aggregation reveals only their sum",
    layout=fedex_lora.layout,
    upload=exact_mixed_rank.contribution,
    check=fedex_lora.check,
    init=fedex_lora.init,
    add=fedex_lora.add,
    finalize=finalize,
    update=update,
    adapter=Adapter(train_a=True, lora_fa=False, residual=True),
    class_rows=True,
)
