r"""Exact heterogeneous-rank LoRA aggregation under a shared frozen A, as a streamed sum.

Why A is frozen. A LoRA update is dW = B A (B: d x r, A: r x d'). Averaging A and B separately
(FedIT; HetLoRA, Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, which zero-pads both factors of every rank) does not give the
average of the products: mean(B_k) mean(A_k) != mean(B_k A_k). With A shared, frozen and
generated from the run's seed (FFA-LoRA, Sun et al., "Improving LoRA in Privacy-preserving
Federated Learning", ICLR 2024; LoRA-FA, Zhang et al. 2023), dW is linear in B and averaging B
is exact. fedge adds heterogeneous ranks on top (DESIGN.md, "LoRA aggregation"): A has r_max
rows; a device of rank r trains only the first r columns of B against the first r rows of A
(the rest of the global adapter is merged into its frozen weights, `split_for_rank`) and
uploads its B zero-padded to r_max, weighted, with a 0/1 mask of the columns it trained.

The identities (p_k >= 0 the device weights, r_k its rank, B~_k = [B_k, 0] its upload padded to
r_max columns, a_j the j-th row of A, b_{k,j} column j of B_k):

1. Sum:      (sum_k p_k B~_k) A = sum_k p_k B_k A[:r_k]   for any mix of ranks, exactly, because
             the padded columns are zero. The server needs only this sum and the column
             weights w_j = sum_{k: r_k > j} p_k, both plain sums: compatible with secure
             aggregation, and independent of accumulation order.
2. Columns (`normalize="column"`, the default rule):
             b_j = sum_{k: r_k > j} p_k b_{k,j} / w_j  where w_j > 0, else the previous b_j;
             B A = sum_j b_j a_j^T.
             So each column is averaged over exactly the devices that trained it, and small
             devices do not dilute what large ones learned. Column-block-wise, for a block J of
             columns trained by the same set S_J of devices (with ranks {2, 4, 8}: columns 0-1 by
             everyone, 2-3 by ranks >= 4, 4-7 by rank 8):
             B[:, J] A[J] = sum_{k in S_J} p_k B_k[:, J] A[J] / sum_{k in S_J} p_k,
             the weighted mean of the devices' products restricted to that block. When all
             devices share one rank r this is the weighted mean of B_k A[:r] itself.
3. Totals (`normalize="total"`, uploads are deltas from the global B):
             (B_new - B_prev) A = sum_k p_k dB_k A[:r_k] / sum_k p_k,
             the weighted mean of every device's dW_k for any mix of ranks (a device that did not
             train a column contributes a zero change to it: FedAvg's reading).
With `deltas=True` and column normalisation the result equals the value-averaging one whenever
every device started from the same global B (mean(prev + d) = prev + mean(d)).

One LoRA scaling for every rank: the product B A is scaled by alpha / r_max on every device
(`peft_alpha` gives the `lora_alpha` that makes peft's alpha / r equal to it), else the same
columns would mean different updates on different devices.

State is explicit and functional in the FedJAX style (Ro et al., "FedJAX", 2021): `init`,
`accumulate` / `add`, `finalize`. Its size is one r_max-wide B and one weight vector per adapter,
whatever the number of clients; sums are kept in float64 so that accumulation order changes
the result only at the 1e-16 relative level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from federation.data.common import stable_seed

# float64 accumulators: order-independence to ~1e-16 relative, for the cost of 2x a tiny state.
_ACC = torch.float64


@dataclass(frozen=True)
class HeteroState:
    """Streamed sums for one round: `sums[name]` = sum_k p_k B~_k (d x r_max), `col_weights[name]` =
    sum_k p_k m_k (r_max), `count` = contributions added (a sum of contributions counts as one)."""

    sums: dict[str, torch.Tensor]
    col_weights: dict[str, torch.Tensor]
    count: int = 0


class Contribution(NamedTuple):
    """What one device uploads (or what secure aggregation reveals: the sum of many uploads)."""

    weighted_b: dict[str, torch.Tensor]
    col_weights: dict[str, torch.Tensor]


def frozen_a(seed: int, name: str, r_max: int, in_features: int) -> torch.Tensor:
    """The shared frozen A (r_max x in_features) of adapter `name`, deterministic from (seed, name).

    Distributed as peft draws `lora_A` by default (`kaiming_uniform_(a=sqrt(5))`, i.e.
    U(+-1/sqrt(in))), from a private `torch.Generator`: every process derives the same A
    without sending it, and the global RNG is untouched. Rows come out in order, so the A for
    rank r is the first r rows of the A for any larger r_max.
    """
    if r_max < 1 or in_features < 1:
        raise ValueError(f"r_max and in_features must be >= 1, got {r_max=}, {in_features=}")
    # Same tag and draw as `federation.model.lora.frozen_a`, so the A this module assumes is
    # bit-for-bit the A the devices' peft adapters hold.
    generator = torch.Generator().manual_seed(stable_seed("lora-A", seed, name))
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) reduces to 1/sqrt(fan_in)
    return (torch.rand(r_max, in_features, generator=generator) * 2.0 - 1.0) * bound


def pad_b(b: torch.Tensor, r_max: int) -> torch.Tensor:
    """Zero-pad B (d x r) to d x r_max: the columns a device did not train contribute nothing."""
    if b.dim() != 2 or not 1 <= b.shape[1] <= r_max:
        raise ValueError(f"B must be 2-D with 1..{r_max} columns, got shape {tuple(b.shape)}")
    return torch.nn.functional.pad(b, (0, r_max - b.shape[1]))


def column_weights(rank: int, r_max: int, weight: float) -> torch.Tensor:
    """`weight` on the first `rank` columns, 0 on the rest (float64, length r_max)."""
    if not 1 <= rank <= r_max:
        raise ValueError(f"rank must lie in 1..{r_max}, got {rank}")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be finite and >= 0, got {weight}")
    w = torch.zeros(r_max, dtype=_ACC)
    w[:rank] = weight
    return w


def init(shapes: Mapping[str, tuple[int, int]]) -> HeteroState:
    """Zero state for adapters `name -> (out_features d, r_max)` (the shape of a padded B)."""
    for name, (d, r_max) in shapes.items():
        if d < 1 or r_max < 1:
            raise ValueError(f"shape of {name} must be positive, got {(d, r_max)}")
    return HeteroState(
        sums={name: torch.zeros(d, r_max, dtype=_ACC) for name, (d, r_max) in shapes.items()},
        col_weights={name: torch.zeros(r_max, dtype=_ACC) for name, (_, r_max) in shapes.items()},
    )


def _padded(name: str, b: torch.Tensor, rank: int, d: int, r_max: int) -> torch.Tensor:
    if b.dim() != 2 or b.shape[0] != d:
        raise ValueError(f"B of {name} must have shape ({d}, {rank}) or ({d}, {r_max}), got {tuple(b.shape)}")
    if b.shape[1] == rank:
        return pad_b(b, r_max)
    if b.shape[1] == r_max:
        # A device of rank r owns only its first r columns; anything beyond is a client bug
        # that would silently break exactness, so refuse it rather than mask it.
        if torch.any(b[:, rank:] != 0):
            raise ValueError(f"B of {name} is padded to {r_max} but has non-zero columns beyond rank {rank}")
        return b
    raise ValueError(f"B of {name} must have {rank} or {r_max} columns, got {b.shape[1]}")


def contribution(
    update: Mapping[str, torch.Tensor], rank: int, weight: float, shapes: Mapping[str, tuple[int, int]]
) -> Contribution:
    """One device's upload: p B~ per adapter and p m (its weighted column mask).

    `update[name]` is B (or dB) as trained, d x rank, or already padded to d x r_max. Adapters
    the device did not train are simply absent: their column weights stay 0 for it.
    """
    weighted_b: dict[str, torch.Tensor] = {}
    col_w: dict[str, torch.Tensor] = {}
    for name, b in update.items():
        if name not in shapes:
            raise ValueError(f"unknown adapter {name!r} (known: {', '.join(sorted(shapes))})")
        d, r_max = shapes[name]
        col_w[name] = column_weights(rank, r_max, weight)
        weighted_b[name] = _padded(name, b, rank, d, r_max).to(_ACC) * weight
    return Contribution(weighted_b, col_w)


def add(state: HeteroState, contrib: Contribution) -> HeteroState:
    """A new state with `contrib` (one device's upload, or a secure sum of uploads) added."""
    sums = dict(state.sums)
    col_weights = dict(state.col_weights)
    for name, wb in contrib.weighted_b.items():
        if name not in sums:
            raise ValueError(f"unknown adapter {name!r} (known: {', '.join(sorted(sums))})")
        if wb.shape != sums[name].shape or contrib.col_weights[name].shape != col_weights[name].shape:
            raise ValueError(
                f"contribution to {name} has shape {tuple(wb.shape)}, state {tuple(sums[name].shape)}"
            )
        # Out-of-place: the old state stays valid (functional), and the previous tensors are
        # freed as soon as the caller drops the old state, so memory stays one state's worth.
        sums[name] = sums[name] + wb.to(_ACC)
        col_weights[name] = col_weights[name] + contrib.col_weights[name].to(_ACC)
    return HeteroState(sums, col_weights, state.count + 1)


def accumulate(
    state: HeteroState, update: Mapping[str, torch.Tensor], rank: int, weight: float
) -> HeteroState:
    """Add one device's B (d x rank, or padded d x r_max) of rank `rank` with weight `weight`."""
    shapes = {name: (s.shape[0], s.shape[1]) for name, s in state.sums.items()}
    return add(state, contribution(update, rank, weight, shapes))


def finalize(
    state: HeteroState,
    previous_b: Mapping[str, torch.Tensor],
    *,
    deltas: bool = False,
    normalize: Literal["column", "total"] = "column",
) -> dict[str, torch.Tensor]:
    """The new global B per adapter (d x r_max, in the dtype of `previous_b`, else float32).

    `normalize="column"`: each column is the weighted mean over the devices that trained it
    (identity 2); `"total"` divides every column by the total weight (identity 3; needs
    `deltas=True`, as averaging values with zeros for untrained columns would shrink them).
    With `deltas=True` the uploads are changes to `previous_b` and are added to it. Columns
    nobody trained keep their previous value either way.
    """
    if normalize not in ("column", "total"):
        raise ValueError(f"normalize must be 'column' or 'total', got {normalize!r}")
    if normalize == "total" and not deltas:
        raise ValueError(
            "normalize='total' averages changes: pass deltas=True (uploads relative to previous_b)"
        )
    out: dict[str, torch.Tensor] = {}
    for name, s in state.sums.items():
        w = state.col_weights[name]
        trained = w > 0
        prev = previous_b.get(name)
        if prev is not None and tuple(prev.shape) != tuple(s.shape):
            raise ValueError(f"previous B of {name} has shape {tuple(prev.shape)}, expected {tuple(s.shape)}")
        if prev is None and (deltas or not bool(trained.all())):
            raise ValueError(f"previous B of {name} is needed (untrained columns or deltas) but missing")
        # Every device has rank >= 1, so column 0's weight is the total weight of the devices
        # that sent this adapter.
        denom = w if normalize == "column" else w[0].expand_as(w)
        mean = s / torch.where(trained, denom, torch.ones_like(denom))
        base = prev.to(_ACC) if prev is not None else torch.zeros_like(s)
        new = base + mean if deltas else torch.where(trained, mean, base)
        out[name] = new.to(prev.dtype if prev is not None else torch.float32)
    return out


def split_for_rank(
    b_global: torch.Tensor, a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a device of rank `rank` trains and what it freezes: (B[:, :r], A[:r], B[:, r:] A[r:]).

    The third term is the rest of the global adapter, to be merged (times the LoRA scaling)
    into the device's frozen base weight, so the device computes with the full global adapter
    while holding parameters and optimizer state for only its r columns.
    """
    r_max = a.shape[0]
    if b_global.dim() != 2 or b_global.shape[1] != r_max or not 1 <= rank <= r_max:
        raise ValueError(
            f"need B (d x {r_max}) and 1 <= rank <= {r_max}, got {tuple(b_global.shape)}, {rank}"
        )
    return b_global[:, :rank].clone(), a[:rank].clone(), b_global[:, rank:] @ a[rank:]


def peft_alpha(rank: int, r_max: int, alpha: float) -> float:
    """`lora_alpha` for a rank-`rank` peft adapter so that its scaling alpha'/rank is alpha/r_max."""
    if not 1 <= rank <= r_max:
        raise ValueError(f"rank must lie in 1..{r_max}, got {rank}")
    return alpha * rank / r_max


def state_nbytes(state: HeteroState) -> int:
    """Bytes held by the state's tensors (constant in the number of contributions)."""
    tensors = [*state.sums.values(), *state.col_weights.values()]
    return sum(t.numel() * t.element_size() for t in tensors)
