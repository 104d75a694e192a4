"""`hetlora`: HetLoRA, heterogeneous ranks by zero-padding, norm-weighted aggregation, rank
self-pruning.

Cho et al., "Heterogeneous Low-Rank Approximation for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024 Findings (first at FL@FM-NeurIPS'23 as "Heterogeneous LoRA for
Federated Fine-tuning of On-Device Foundation Models"). A device of rank r_k takes the first
r_k columns of the global B and rows of the global A (truncation), trains them, and the server

- zero-pads each device's A_k and B_k back to r_max;
- weighs them by how much the device's adapter changes its model, the Frobenius norm
  S_k = ||B_k A_k||_F (sparsity-weighted aggregation): A <- sum_k S_k pad(A_k) / sum_k S_k, and
  B likewise; rows and columns a device does not hold count as its zeros (the zero-padding
  that shrinks the higher ranks the fewer devices train them);
- and each device prunes its own rank when the top part of its adapter is fading (rank
  self-pruning): with r' = max(1, min(r - 1, floor(gamma r))), if ||B[:, r':r] A[r':r]||_F
  fell since the device's last round at this rank, it trains rank r' from then on.

In fedge: the global state carries A and B at r_max (`Adapter.train_a`); a device drops the
global adapter beyond its rank (`Adapter.truncate`), trains A and B with AdamW, and uploads its
trained A and B themselves (zero beyond its rank, `Adapter.upload_full`) with weight x its head
delta; S_k is over all of the device's targets at once (one weight per device), and heads are
averaged by examples. Its pruned rank and the last norm are kept on the device between rounds
(`Rule.device_rank`, `Rule.device_keep`, the node state that holds a TV's private part). The
paper's regulariser on the top ranks during local training is not applied. Not a sum: the
weights are each device's own update norm, normalised over the round, and the server computes
them from each device's adapter, which secure aggregation would hide.

Parameters: `PRUNE_DECAY` (gamma = 0.9; a device prunes at least one rank at a time), the
run's `lr`, `lora-rank` (= r_max), `lora-alpha`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from federation.rules import flexlora
from federation.rules.base import (
    Adapter,
    Rule,
    a_key_of,
    is_a_key,
    is_b_key,
    lora_product,
)

NAME = "hetlora"
WEIGHT = flexlora.WEIGHT
PRUNE_DECAY = 0.9
RANK, TAIL_NORM = "hetlora.rank", "hetlora.tail-norm"  # device-kept: its rank, the top ranks' norm


def adapter_norm(arrays: Mapping[str, np.ndarray], start: int = 0, stop: int | None = None) -> float:
    """||B[:, start:stop] A[start:stop]||_F over every target of a device's adapter (one number)."""
    total = 0.0
    for key, b in arrays.items():
        if is_b_key(key) and not key.endswith(WEIGHT):
            a = np.asarray(arrays[a_key_of(key)])
            total += float(np.sum(lora_product(np.asarray(b)[:, start:stop], a[start:stop]) ** 2))
    return math.sqrt(total)


def pruned_rank(rank: int) -> int:
    return max(1, min(rank - 1, math.floor(PRUNE_DECAY * rank)))


def device_rank(kept: Mapping[str, np.ndarray], tier_rank: int) -> int:
    """This round's rank: the device's self-pruned rank, never above its tier's."""
    if RANK in kept:
        return max(1, min(tier_rank, int(np.asarray(kept[RANK]).ravel()[0])))
    return tier_rank


def device_keep(
    kept: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], rank: int
) -> dict[str, np.ndarray]:
    """After training at `rank`: prune to r' if the top ranks' norm fell since the last round at
    this rank, else keep the rank and remember the norm."""
    if rank <= 1:
        return {RANK: np.array([1.0])}
    low = pruned_rank(rank)
    norm = adapter_norm(trained, low, rank)
    last_rank = int(np.asarray(kept[RANK]).ravel()[0]) if RANK in kept else -1
    if TAIL_NORM in kept and last_rank == rank and norm < float(np.asarray(kept[TAIL_NORM]).ravel()[0]):
        return {RANK: np.array([float(low)]), TAIL_NORM: np.array([math.inf])}
    return {RANK: np.array([float(rank)]), TAIL_NORM: np.array([norm])}


@dataclass
class HetState:
    lora: dict[str, np.ndarray] = field(default_factory=dict)  # key -> sum_k S_k pad(X_k)
    norms: dict[str, float] = field(default_factory=dict)  # task prefix -> sum_k S_k
    examples: dict[str, float] = field(default_factory=dict)  # task prefix -> sum_k p_k
    heads: dict[str, np.ndarray] = field(default_factory=dict)  # head key -> sum_k p_k delta_k
    count: int = 0


def init() -> HetState:
    return HetState()


def add(state: HetState, contrib: Mapping[str, np.ndarray]) -> HetState:
    """Fold one device: S_k x its padded A and B, S_k, and its example-weighted head deltas."""
    by_task: dict[str, dict[str, np.ndarray]] = {}
    for key, value in contrib.items():
        prefix, _, _ = key.rpartition("/")
        by_task.setdefault(prefix, {})[key] = np.asarray(value, dtype=np.float64)
    for prefix, part in by_task.items():
        weight = float(part[f"{prefix}/{WEIGHT}" if prefix else WEIGHT].ravel()[0])
        norm = adapter_norm(part)
        state.norms[prefix] = state.norms.get(prefix, 0.0) + norm
        state.examples[prefix] = state.examples.get(prefix, 0.0) + weight
        for key, value in part.items():
            if key.endswith(WEIGHT):
                continue
            bucket, scaled = (
                (state.lora, norm * value) if (is_a_key(key) or is_b_key(key)) else (state.heads, value)
            )
            if key in bucket:
                bucket[key] += scaled
            else:
                bucket[key] = scaled
    state.count += 1
    return state


def finalize(state: HetState) -> dict[str, np.ndarray]:
    """The new A and B (values: the norm-weighted mean of the padded adapters) and each head's
    mean delta (by examples)."""
    out: dict[str, np.ndarray] = {}
    for key, total in state.heads.items():
        out[key] = total / state.examples[key.rpartition("/")[0]]
    for key, total in state.lora.items():
        norms = state.norms[key.rpartition("/")[0]]
        if norms > 0:  # every adapter of the round unchanged from zero: nothing to average
            out[key] = total / norms
    return out


RULE = Rule(
    name=NAME,
    paper='HetLoRA (Cho et al., "Heterogeneous Low-Rank Approximation for Federated Fine-tuning of '
    'On-Device Foundation Models", EMNLP 2024 Findings)',
    is_sum=False,
    not_sum_reason="its weights are each device's own update norm ||B_k A_k||, normalised over the "
    "round, which the server computes from each device's adapter, and secure aggregation reveals "
    "only their sum",
    layout=flexlora.layout,
    upload=flexlora.upload,
    check=flexlora.check,
    init=init,
    add=add,
    finalize=finalize,
    update=flexlora.update,
    adapter=Adapter(train_a=True, lora_fa=False, truncate=True, upload_full=True),
    device_rank=device_rank,
    device_keep=device_keep,
)
