"""`ffa-lora`: FFA-LoRA, A frozen at a shared random init, only B trained and averaged, one rank.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024. With every device's A fixed at the same random init A0, the weighted mean of the
devices' B is exactly the weighted mean of their updates: sum_k p_k B_k A0 / P = (sum_k p_k B_k
/ P) A0. It halves the upload and is a plain sum, so secure aggregation carries it.

In fedge: A0 is drawn from the run seed on the server and every device (never sent); the
devices train B (and the head) with plain AdamW at the run's `lr`, as in the paper, where fedge's
default (`exact-mixed-rank`, which builds on this rule) uses LoRA-FA's projected step and mixes
ranks by per-column weights. FFA-LoRA trains one rank on every device: a mixed-rank fleet is
refused unless `uniform-rank` is set. The aggregation is the default rule's sum (weight x delta
and the weights), which for one rank is plain FedAvg of B.

Parameters: none beyond the run's (`lr` for B, `lora-rank`, `lora-alpha`: the paper notes that
with A frozen a larger scaling alpha / r helps).
"""

from __future__ import annotations

from dataclasses import replace

from federation.rules import exact_mixed_rank
from federation.rules.base import Adapter

NAME = "ffa-lora"

# The default rule's sum, streamed and secure-aggregated as it is; only what the device trains
# (its `adapter`) differs.
RULE = replace(
    exact_mixed_rank.RULE,
    name=NAME,
    paper='FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024)',
    adapter=Adapter(train_a=False, lora_fa=False, uniform_rank=True),
)
