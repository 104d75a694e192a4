"""Exactness of mixed-rank LoRA aggregation under a shared frozen A: the default rule
(`exact-mixed-rank`, `federation/rules/exact_mixed_rank.py`) through the rule interface.

Devices of ranks {2, 4, 8} (r_max = 8) start from one global state, each changes the first r_k
columns of every B by dB_k (its new adapter is B_k = B + [dB_k, 0]) and the heads, and uploads
`RULE.upload(delta, p_k, rank=r_k)`; the server `add`s the uploads, `finalize`s and `update`s.
A is `federation.model.lora.frozen_a`, drawn at r_max. What is proven, for random mixes of ranks
and weights (float64 references computed here by hand; uploads are float32, as on the wire, so
the tolerance is float32's: 1e-6 absolute + 1e-6 relative):

- sum:      (sum of the uploaded B values) A == sum_k p_k dB_k A[:r_k], for any mix;
- columns:  each column block J of the new B A (J = 0-1: every device; 2-3: ranks >= 4; 4-7:
            rank 8) is the p-weighted mean of the devices' products B_k[:, J] A[J] over the
            devices that trained it; a block nobody trained keeps its value;
- one rank: the new B A is exactly the weighted mean of the devices' B_k A;
- heads:    the weighted mean over the devices of the task;
- the result does not depend on the order of the contributions, or on adding their sum at
  once (what secure aggregation reveals), and the state's size does not grow with devices.

Linear adapters (B [d, r], A [r, in]) and Conv1d ones (B [d, r, 1], A [r, in, k]) alike.
"""

from __future__ import annotations

import numpy as np
import pytest

from federation.model.lora import frozen_a
from federation.rules import get_rule
from federation.rules.exact_mixed_rank import WEIGHT

RULE = get_rule("exact-mixed-rank")


R_MAX = 8
SEED = 7
# key -> (shape of B, shape of A after its first axis)
ADAPTERS = {
    "phone/lora.layer0.query.lora_B.weight": ((12, R_MAX), (16,)),
    "phone/lora.layer0.value.lora_B.weight": ((12, R_MAX), (16,)),
    "phone/lora.conv2.lora_B.weight": ((10, R_MAX, 1), (6, 5)),
}
HEADS = {"phone/head.bias": (5,), "phone/head.dense.weight": (3, 4)}
BLOCKS = ((0, 2), (2, 4), (4, 8))  # columns trained by: every device, ranks >= 4, rank 8
TOL = 1e-6
RTOL = 1e-6  # contributions are float32 (the wire format): ~1e-7 relative per value


def _a(key: str) -> np.ndarray:
    """The shared frozen A of an adapter, as the devices' peft layers hold it (r_max rows)."""
    return frozen_a(SEED, key, (R_MAX, *ADAPTERS[key][1])).double().numpy()


def _product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """B A for a Linear (B [d, r], A [r, in]) or Conv1d (B [d, r, 1], A [r, in, k]) adapter."""
    return np.tensordot(b.reshape(b.shape[0], b.shape[1]), a, axes=(1, 0))


def _global(seed: int = 99) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {k: s for k, (s, _) in ADAPTERS.items()} | HEADS
    return {k: rng.normal(size=s) for k, s in shapes.items()}


def _devices(seed: int, n: int, ranks: tuple[int, ...] = (2, 4, 8)) -> list[tuple[dict, int, float]]:
    """n devices: (delta, rank, weight); B deltas are zero beyond the device's rank."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rank = int(rng.choice(ranks))
        weight = float(rng.uniform(0.1, 10.0))
        delta = {}
        for key, (shape, _) in ADAPTERS.items():
            d = np.zeros(shape)
            d[:, :rank] = rng.normal(size=(shape[0], rank, *shape[2:]))
            delta[key] = d
        delta.update({k: rng.normal(size=s) for k, s in HEADS.items()})
        out.append((delta, rank, weight))
    return out


def _contributions(devices) -> list[dict[str, np.ndarray]]:
    return [RULE.upload(delta, weight, rank=rank) for delta, rank, weight in devices]


def _aggregate(devices, previous) -> dict[str, np.ndarray]:
    state = RULE.init()
    for c in _contributions(devices):
        RULE.add(state, c)
    assert state.count == len(devices)
    return RULE.update(previous, RULE.finalize(state), 1.0)


# --- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_sum_identity_any_mix_of_ranks(seed: int) -> None:
    devices = _devices(seed, n=9)
    state = RULE.init()
    for c in _contributions(devices):
        RULE.add(state, c)
    for key in ADAPTERS:
        a = _a(key)
        expected = sum(w * _product(d[key][:, :r], a[:r]) for d, r, w in devices)
        np.testing.assert_allclose(_product(state.sums[key], a), expected, atol=TOL, rtol=RTOL)
        # the column weights are the summed weights of the devices that trained each column
        col_w = [sum(w for _, r, w in devices if r > j) for j in range(R_MAX)]
        np.testing.assert_allclose(state.sums[key + WEIGHT], col_w, rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_mixed_ranks_each_column_block_is_the_mean_over_its_trainers(seed: int) -> None:
    devices = _devices(seed, n=11)
    previous = _global()
    new = _aggregate(devices, previous)
    for key in ADAPTERS:
        a = _a(key)
        for lo, hi in BLOCKS:
            trainers = [(previous[key] + d[key], w) for d, r, w in devices if r >= hi]
            got = _product(new[key][:, lo:hi], a[lo:hi])
            if not trainers:  # nobody trained the block: it keeps its value
                np.testing.assert_array_equal(new[key][:, lo:hi], previous[key][:, lo:hi])
                continue
            total = sum(w for _, w in trainers)
            mean = sum(w * _product(b[:, lo:hi], a[lo:hi]) for b, w in trainers) / total
            np.testing.assert_allclose(got, mean, atol=TOL, rtol=RTOL)
        # B A is the sum of its column blocks' products
        blocks = sum(_product(new[key][:, lo:hi], a[lo:hi]) for lo, hi in BLOCKS)
        np.testing.assert_allclose(_product(new[key], a), blocks, atol=TOL, rtol=RTOL)
    # heads: the weighted mean over every device of the task
    total = sum(w for _, _, w in devices)
    for key in HEADS:
        mean = previous[key] + sum(w * d[key] for d, _, w in devices) / total
        np.testing.assert_allclose(new[key], mean, atol=TOL, rtol=RTOL)


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_single_rank_is_the_weighted_mean_of_products(rank: int) -> None:
    devices = _devices(seed=rank, n=7, ranks=(rank,))
    previous = _global()
    new = _aggregate(devices, previous)
    total = sum(w for _, _, w in devices)
    for key in ADAPTERS:
        a = _a(key)
        # every device's adapter is B_k = previous + its delta; the new one is their mean
        mean = sum(w * _product(previous[key] + d[key], a) for d, _, w in devices) / total
        np.testing.assert_allclose(_product(new[key], a), mean, atol=TOL, rtol=RTOL)
        np.testing.assert_array_equal(new[key][:, rank:], previous[key][:, rank:])


def test_a_rank_r_device_leaves_the_other_columns_alone() -> None:
    """One rank-2 device among none of higher rank: columns 2..7 keep their value bit for bit."""
    previous = _global()
    [(delta, rank, weight)] = _devices(seed=3, n=1, ranks=(2,))
    new = _aggregate([(delta, rank, weight)], previous)
    for key in ADAPTERS:
        np.testing.assert_allclose(
            new[key][:, :2], previous[key][:, :2] + delta[key][:, :2], atol=TOL, rtol=RTOL
        )
        np.testing.assert_array_equal(new[key][:, 2:], previous[key][:, 2:])


# --- order, secure sums, memory -----------------------------------------------------------------


def test_order_does_not_matter() -> None:
    devices = _devices(seed=21, n=30)
    previous = _global()
    reference = _aggregate(devices, previous)
    rng = np.random.default_rng(1)
    for _ in range(3):
        shuffled = _aggregate([devices[i] for i in rng.permutation(len(devices))], previous)
        for key in reference:
            np.testing.assert_allclose(shuffled[key], reference[key], atol=1e-12, rtol=0)


def test_adding_the_secure_sum_at_once_is_the_same() -> None:
    """Secure aggregation reveals only the sum of the contributions: adding it once is the same."""
    devices = _devices(seed=22, n=20)
    previous = _global()
    reference = _aggregate(devices, previous)
    uploads = _contributions(devices)
    secure_sum = {k: sum(u[k].astype(np.float64) for u in uploads) for k in uploads[0]}
    state = RULE.add(RULE.init(), secure_sum)
    assert state.count == 1
    summed = RULE.update(previous, RULE.finalize(state), 1.0)
    for key in reference:
        np.testing.assert_allclose(summed[key], reference[key], atol=1e-12, rtol=0)


def test_state_size_does_not_grow_with_devices() -> None:
    devices = _devices(seed=5, n=300)
    state = RULE.init()
    sizes = []
    for i, c in enumerate(_contributions(devices)):
        RULE.add(state, c)
        if i in (0, 9, 299):
            sizes.append(sum(v.nbytes for v in state.sums.values()))
            assert state.count == i + 1 and len(state.sums) == 2 * (len(ADAPTERS) + len(HEADS))
    expected = 8 * sum(int(np.prod(s)) + s[1] for s, _ in ADAPTERS.values())
    expected += 8 * sum(int(np.prod(s)) + 1 for s in HEADS.values())
    assert sizes == [expected] * 3
