"""`flexlora`: FlexLoRA, the weighted sum of the devices' full updates B_k A_k, cut back to a rank
by truncated SVD.

Bai, Chen, Qian, Yao and Li, "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources", NeurIPS 2024. Each device k trains a LoRA of its own rank r_k; the
server forms every device's full-size update and their weighted average

    W = sum_k p_k B_k A_k / P,   p_k = examples,

then takes its SVD W = U S V^T and hands device k the rank-r_k truncation: B = U_r sqrt(S_r),
A = sqrt(S_r) V_r^T (r = r_k). The truncation error is the discarded singular values:
||W - B A||_F^2 = sum_{i > r} S_i^2.

In fedge: the global state carries A and B at r_max (`Adapter.train_a`); the server keeps the
rank-r_max truncation, and a device of rank r takes its first r columns of B and rows of A,
which are the rank-r truncation itself (the singular values are sorted), dropping the rest
(`Adapter.truncate`: unlike fedge's default, a small device does not hold the tail frozen). A
device trains A and B with AdamW and uploads its trained A and B themselves (zero beyond its
rank, `Adapter.upload_full`) and weight x its head delta. The server computes each device's
product as the upload arrives and keeps only the running sum, one d x d' array per target.
The SVD is of W alone, as in the paper (the pretrained weight is not part of it), and what the
truncation discards is lost. The product needs each device's own A and B: not a sum of what
devices upload as implemented, so secure aggregation cannot carry it (a device uploading its
d x d' product B_k A_k would make it one, at ~d / (2 r) times the upload).

Parameters: none beyond the run's (`lr`, `lora-rank` = r_max, `lora-alpha`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from federation.rules.base import (
    Adapter,
    Rule,
    Slot,
    a_key_of,
    add_mean_delta,
    is_a_key,
    is_b_key,
    is_residual_key,
    lora_product,
)

NAME = "flexlora"
WEIGHT = "#weight"


def layout(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Slot]:
    """The device's A and B (not weighted), weight x each head delta, and its weight (one number)."""
    out: dict[str, Slot] = {}
    for key, shape in shapes.items():
        if is_residual_key(key):
            continue
        if is_a_key(key) or is_b_key(key):
            out[key] = Slot(tuple(shape))
        else:
            out[key] = Slot(tuple(shape), weighted_by=WEIGHT)
    out[WEIGHT] = Slot((1,), weights=True)
    return out


def upload(
    values: Mapping[str, np.ndarray],
    weight: float,
    rank: int | None = None,
    classes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """`values`: the device's trained A and B (zero beyond its rank) and its head deltas. One
    weight behind everything: the head is averaged as a whole (`classes` is not used)."""
    if not (np.isfinite(weight) and weight > 0):
        raise ValueError(f"aggregation weight must be a positive number, got {weight}")
    out = {}
    for key, value in values.items():
        value = np.asarray(value, dtype=np.float32)
        out[key] = value if (is_a_key(key) or is_b_key(key)) else value * np.float32(weight)
    out[WEIGHT] = np.array([weight], dtype=np.float32)
    return out


def check(
    contrib: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], max_weight: float
) -> str | None:
    """Why a device's upload must be left out (None: fine): keys, shapes, finite, one weight."""
    expected = {k: s.shape for k, s in layout(shapes).items()}
    missing, extra = set(expected) - set(contrib), set(contrib) - set(expected)
    if missing or extra:
        return f"missing keys {sorted(missing)[:3]}, unexpected keys {sorted(extra)[:3]}"
    for key, shape in expected.items():
        value = np.asarray(contrib[key])
        if tuple(value.shape) != tuple(shape):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            return f"{key} is not finite floating point"
    weight = float(np.asarray(contrib[WEIGHT]).ravel()[0])
    if not 0 < weight <= max_weight:
        return f"weight {weight} is outside (0, {max_weight}]"
    return None


@dataclass
class FlexState:
    products: dict[str, np.ndarray] = field(default_factory=dict)  # B key -> sum p_k B_k A_k
    heads: dict[str, np.ndarray] = field(default_factory=dict)  # head key -> sum p_k delta_k
    weights: dict[str, float] = field(default_factory=dict)  # task prefix -> sum p_k
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # B key -> B, A
    count: int = 0


def _task(key: str) -> str:
    return key.rpartition("/")[0]


def init() -> FlexState:
    return FlexState()


def add(state: FlexState, contrib: Mapping[str, np.ndarray]) -> FlexState:
    """Fold one device's upload: p_k B_k A_k per target, p_k x its head deltas, p_k."""
    weights = {k: float(np.asarray(v).ravel()[0]) for k, v in contrib.items() if k.endswith(WEIGHT)}
    for key, value in contrib.items():
        if key.endswith(WEIGHT) or is_a_key(key):
            continue
        prefix = _task(key)
        weight = weights[f"{prefix}/{WEIGHT}" if prefix else WEIGHT]
        if is_b_key(key):
            a = np.asarray(contrib[a_key_of(key)])
            total = weight * lora_product(value, a)
            state.shapes[key] = (tuple(np.shape(value)), tuple(a.shape))
            bucket = state.products
        else:
            total = np.asarray(value, dtype=np.float64)
            bucket = state.heads
        if key in bucket:
            bucket[key] += total
        else:
            bucket[key] = total
    for key, weight in weights.items():
        prefix = _task(key)
        state.weights[prefix] = state.weights.get(prefix, 0.0) + weight
    state.count += 1
    return state


def truncated_svd(w: np.ndarray, rank: int, b_shape: tuple[int, ...], a_shape: tuple[int, ...]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(B, A, singular values) with B A the best rank-`rank` approximation of `w` (a Linear
    weight [out, in], or a Conv1d's [out, in, k] flattened to [out, in k]); B = U sqrt(S),
    A = sqrt(S) V^T, zero-padded to r_max = b_shape[1] when `w` has fewer singular values."""
    flat = w.reshape(w.shape[0], -1)
    u, s, vt = np.linalg.svd(flat, full_matrices=False)
    r = min(rank, len(s))
    root = np.sqrt(s[:r])
    b = np.zeros((b_shape[0], b_shape[1]))
    a = np.zeros((a_shape[0], flat.shape[1]))
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vt[:r]
    return b.reshape(b_shape), a.reshape(a_shape), s


def finalize(state: FlexState) -> dict[str, np.ndarray]:
    """The new A and B of every target (the rank-r_max truncation of sum p B A / P), and each
    head's mean delta. A and B are values, heads deltas: `update` knows which."""
    out: dict[str, np.ndarray] = {}
    for key, total in state.heads.items():
        out[key] = total / state.weights[_task(key)]
    for key, total in state.products.items():
        mean = total / state.weights[_task(key)]
        b_shape, a_shape = state.shapes[key]
        b, a, _ = truncated_svd(mean, b_shape[1], b_shape, a_shape)
        out[key] = b
        out[a_key_of(key)] = a
    return out


def update(global_state: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray], server_lr: float = 1.0
           ) -> dict[str, np.ndarray]:  # fmt: skip
    """A and B take the aggregate's truncation (moved server_lr of the way there); heads move by
    their mean delta."""
    lora = {k: v - np.asarray(global_state[k], dtype=np.float64) for k, v in aggregate.items()
            if is_a_key(k) or is_b_key(k)}  # fmt: skip
    heads = {k: v for k, v in aggregate.items() if not (is_a_key(k) or is_b_key(k))}
    return add_mean_delta(global_state, {**heads, **lora}, server_lr)


RULE = Rule(
    name=NAME,
    paper='FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous '
    'Tasks and Client Resources", NeurIPS 2024): weighted sum of B_k A_k, truncated SVD',
    is_sum=False,
    not_sum_reason="the server multiplies each device's own B by its own A before summing, so it needs "
    "every device's adapter, and secure aggregation reveals only their sum",
    layout=layout,
    upload=upload,
    check=check,
    init=init,
    add=add,
    finalize=finalize,
    update=update,
    adapter=Adapter(train_a=True, lora_fa=False, truncate=True, upload_full=True),
    state_averages=False,
    not_averaged_reason="the global A and B are rebuilt from a truncated SVD every round, whose "
    "singular vectors may change sign and basis between rounds, so an average of two rounds' factors "
    "is not a model between theirs",
)
