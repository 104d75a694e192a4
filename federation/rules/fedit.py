"""`fedit`: FedIT, the weighted average of A and of B, each on its own.

Zhang et al., "Towards Building the Federated GPT:
Federated Instruction Tuning", ICASSP 2024. Every device trains both LoRA matrices (A from the
shared seeded init, B from zero, plain AdamW: LoRA-FA needs A frozen) and the server takes
FedAvg of A and of B separately:

    A <- sum_k p_k A_k / sum_k p_k,   B <- sum_k p_k B_k / sum_k p_k,   p_k = examples.

This is the *inexact* baseline: the new adapter's product (sum p_k B_k / P)(sum p_k A_k / P) is
not the average of the devices' products sum p_k B_k A_k / P (the error is the weighted
covariance of the B_k and the A_k, what FedEx-LoRA folds back). Each device's upload counts
with its own weight: one known public baseline kept only client 0's adapter, which
tests/federation/test_rule_fedit.py would catch.

In fedge: the global state carries A (`Adapter.train_a`); a device uploads weight x delta of A,
B and the head, plus the weight behind each (the default rule's sums, with A's rows weighted
like B's columns), so the server's sum is all it needs: secure aggregation carries it. The
paper trains one rank on every device: a mixed-rank fleet is refused unless `uniform-rank` is
set.

Parameters: none beyond the run's (`lr` for A and B with AdamW, `lora-rank`, `lora-alpha`).
"""

from __future__ import annotations

from dataclasses import replace

from federation.rules import exact_mixed_rank
from federation.rules.base import Adapter

NAME = "fedit"

# The default rule's sum, streamed and secure-aggregated as it is; only what the device trains
# (its `adapter`) differs.
RULE = replace(
    exact_mixed_rank.RULE,
    name=NAME,
    paper='FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", '
    "ICASSP 2024): FedAvg of A and of B separately",
    adapter=Adapter(train_a=True, lora_fa=False, uniform_rank=True),
)
