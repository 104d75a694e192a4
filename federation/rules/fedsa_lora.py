"""`fedsa-lora`: FedSA-LoRA, A shared and averaged, B kept on the device.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025.
Their analysis finds that the A matrices learn what is general
across clients and the B matrices what is client-specific, so only A is shared: each device
trains A and B, uploads A, and keeps its own B from round to round; the server averages A.

In fedge: the global state carries A (`Adapter.train_a`) and B; B never leaves a device
(`Adapter.kept_on_device`): a device trains from its own B (the global initial B, zero, in its
first round), keeps the trained B in its node state beside a TV's private part
(`clients.device`), and uploads weight x delta of A and of the head with their weights, the
default rule's sums. So secure aggregation carries it. The global B stays at zero: the server's
held-out evaluation scores the shared part alone (the head; with B = 0 the adapter is off), and
the personalised model, shared A with each device's own B, is scored on the devices
(`federated-eval-every` and the last round). The heads are averaged (the paper fine-tunes a
classifier on top and shares it); the paper trains one rank on every device: a mixed-rank fleet
is refused unless `uniform-rank` is set.

Parameters: none beyond the run's (`lr` for A and B with AdamW, `lora-rank`, `lora-alpha`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from federation.rules import exact_mixed_rank
from federation.rules.base import Adapter, Rule, Slot, add_mean_delta, is_b_key, is_residual_key

NAME = "fedsa-lora"
ADAPTER = Adapter(train_a=True, lora_fa=False, kept_on_device=(".lora_B.",), uniform_rank=True)


def shared_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The keys that travel: every key but B (kept on the device) and residuals."""
    return {k: s for k, s in shapes.items() if not is_b_key(k) and not is_residual_key(k)}


def layout(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Slot]:
    return exact_mixed_rank.layout(shared_shapes(shapes))


def upload(
    delta: Mapping[str, np.ndarray], weight: float, rank: int | None = None, classes: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    if any(is_b_key(k) for k in delta):
        raise ValueError("FedSA-LoRA keeps B on the device: it is never part of an upload")
    return exact_mixed_rank.contribution(delta, weight, rank, classes)


def check(
    contrib: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], max_weight: float
) -> str | None:
    return exact_mixed_rank.validate_contribution(contrib, shared_shapes(shapes), max_weight)


RULE = Rule(
    name=NAME,
    paper='FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", '
    "ICLR 2025): A shared, B kept on the device",
    is_sum=True,
    not_sum_reason="",
    layout=layout,
    upload=upload,
    check=check,
    init=exact_mixed_rank.init,
    add=exact_mixed_rank.add,
    finalize=exact_mixed_rank.finalize,
    update=add_mean_delta,
    adapter=ADAPTER,
    class_rows=True,
)
