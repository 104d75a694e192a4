"""Small hand-sized cases shared by the research rules' tests (tests/federation/test_rule_*.py):
one LoRA layer (B [3, r_max = 2], A [2, 4]), a head, and devices with seeded deltas and weights.
Every expected number in those tests is computed here, independently, in float64 numpy from
the paper's formula, never by the rule under test."""

from __future__ import annotations

import numpy as np

B = "lora.q.lora_B.weight"
A = "lora.q.lora_A.weight"
R = "lora.q.lora_residual"
HEAD = "head.bias"
SHAPES = {B: (3, 2), A: (2, 4), HEAD: (2,)}
SHAPES_WITH_RESIDUAL = {**SHAPES, R: (3, 4)}


def global_state(seed: int = 0, residual: bool = False, b_zero: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    if b_zero:
        state[B] = np.zeros(SHAPES[B], dtype=np.float32)
    if residual:
        state[R] = (0.1 * rng.normal(size=SHAPES_WITH_RESIDUAL[R])).astype(np.float32)
    return state


def device_deltas(n: int, seed: int = 1, ranks: tuple[int, ...] | None = None) -> list[dict[str, np.ndarray]]:
    """n devices' deltas of A, B and the head (zero beyond each device's rank)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        d = {key: (0.5 * rng.normal(size=s)).astype(np.float32) for key, s in SHAPES.items()}
        r = ranks[k] if ranks else 2
        d[B][:, r:] = 0
        d[A][r:] = 0
        out.append(d)
    return out


WEIGHTS = (10.0, 20.0, 40.0)


def run_round(rule, state, uploads_in, weights=WEIGHTS, ranks=None, prefix=""):
    """One round of `rule` in plaintext: upload, add, finalize, update; returns the new state."""
    agg = rule.init()
    for i, (values, w) in enumerate(zip(uploads_in, weights, strict=True)):
        up = rule.upload(values, w, None if ranks is None else ranks[i])
        assert rule.check(up, {k: v.shape for k, v in state.items()}, 1e5) is None
        rule.add(agg, {prefix + k: v for k, v in up.items()})
    return rule.update({prefix + k: v for k, v in state.items()}, rule.finalize(agg), 1.0)
