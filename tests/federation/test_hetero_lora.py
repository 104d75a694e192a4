"""Exactness of heterogeneous-rank LoRA aggregation under a shared frozen A (federation/hetero_lora.py).

What is proven, for random mixes of ranks {2, 4, 8} and random weights p_k (float64 references,
float tolerance 1e-6; see the module docstring for the derivation):
- sum:     (sum_k p_k pad(B_k)) A == sum_k p_k B_k A[:r_k];
- columns: column j of the aggregate is the p-weighted mean over the devices with r_k > j, and
           for each block J of columns trained by the same devices S_J,
           B[:, J] A[J] == sum_{S_J} p_k B_k[:, J] A[J] / sum_{S_J} p_k;
           with a single rank, B A == the weighted mean of B_k A exactly;
- totals:  with deltas, (B_new - B_prev) A == sum_k p_k dB_k A[:r_k] / sum_k p_k for any mix;
- the result does not depend on accumulation order or on summing uploads first (secure sum);
- the state's memory does not grow with the number of clients.
"""

from __future__ import annotations

import math

import pytest
import torch

from federation import hetero_lora as hl

R_MAX = 8
SHAPES = {"layer0.query": (12, R_MAX), "layer0.value": (12, R_MAX), "head.dense": (5, R_MAX)}
IN_FEATURES = {"layer0.query": 16, "layer0.value": 16, "head.dense": 12}
TOL = 1e-6


def _a(name: str, seed: int = 7) -> torch.Tensor:
    return hl.frozen_a(seed, name, R_MAX, IN_FEATURES[name]).double()


def _devices(
    seed: int, n: int, ranks: tuple[int, ...] = (2, 4, 8)
) -> list[tuple[dict[str, torch.Tensor], int, float]]:
    """n devices: (B_k per adapter at its own rank, rank, weight), float64."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rank = ranks[int(torch.randint(len(ranks), (1,), generator=g))]
        weight = float(torch.rand(1, generator=g, dtype=torch.float64)) * 10 + 0.1
        b = {name: torch.randn(d, rank, generator=g, dtype=torch.float64) for name, (d, _) in SHAPES.items()}
        out.append((b, rank, weight))
    return out


def _aggregate(devices, previous, **kw) -> dict[str, torch.Tensor]:
    state = hl.init(SHAPES)
    for b, rank, weight in devices:
        state = hl.accumulate(state, b, rank, weight)
    return hl.finalize(state, previous, **kw)


def _previous(seed: int = 99) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(d, r, generator=g, dtype=torch.float64) for name, (d, r) in SHAPES.items()}


# --- the frozen A -----------------------------------------------------------------------------


def test_frozen_a_is_deterministic_nested_and_peft_like() -> None:
    a = hl.frozen_a(3, "layer0.query", 8, 64)
    assert a.shape == (8, 64) and a.dtype == torch.float32
    assert torch.equal(a, hl.frozen_a(3, "layer0.query", 8, 64))
    assert not torch.equal(a, hl.frozen_a(4, "layer0.query", 8, 64))
    assert not torch.equal(a, hl.frozen_a(3, "layer0.value", 8, 64))
    # rank r's A is the first r rows of the r_max A, so devices of every rank share it
    assert torch.equal(hl.frozen_a(3, "layer0.query", 4, 64), a[:4])
    # peft's default lora_A init, kaiming_uniform_(a=sqrt(5)), is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / math.sqrt(64)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    state = torch.random.get_rng_state()
    hl.frozen_a(5, "x", 8, 8)
    assert torch.equal(state, torch.random.get_rng_state()), "frozen_a must not touch the global RNG"


def test_pad_and_column_weights() -> None:
    b = torch.ones(3, 2)
    padded = hl.pad_b(b, 8)
    assert padded.shape == (3, 8) and torch.equal(padded[:, :2], b) and not padded[:, 2:].any()
    assert hl.column_weights(4, 8, 2.5).tolist() == [2.5] * 4 + [0.0] * 4
    with pytest.raises(ValueError):
        hl.pad_b(torch.ones(3, 9), 8)
    with pytest.raises(ValueError):
        hl.column_weights(9, 8, 1.0)
    with pytest.raises(ValueError):
        hl.column_weights(2, 8, -1.0)


# --- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_sum_identity_any_mix_of_ranks(seed: int) -> None:
    devices = _devices(seed, n=9)
    state = hl.init(SHAPES)
    for b, rank, weight in devices:
        state = hl.accumulate(state, b, rank, weight)
    for name in SHAPES:
        a = _a(name)
        expected = sum(w * b[name] @ a[:rank] for b, rank, w in devices)
        assert torch.allclose(state.sums[name] @ a, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_single_rank_is_the_weighted_mean_of_products(rank: int) -> None:
    devices = _devices(seed=rank, n=7, ranks=(rank,))
    previous = _previous()
    new = _aggregate(devices, previous)
    total = sum(w for _, _, w in devices)
    for name in SHAPES:
        a = _a(name)
        mean_product = sum(w * b[name] @ a[:rank] for b, _, w in devices) / total
        assert torch.allclose(new[name][:, :rank] @ a[:rank], mean_product, atol=TOL, rtol=0)
        # columns nobody trained keep their value
        assert torch.equal(new[name][:, rank:], previous[name][:, rank:])
        if rank == R_MAX:
            assert torch.allclose(new[name] @ a, mean_product, atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_mixed_ranks_column_means_and_block_products(seed: int) -> None:
    devices = _devices(seed, n=11)
    previous = _previous()
    new = _aggregate(devices, previous)
    for name in SHAPES:
        a = _a(name)
        # column j: weighted mean over the devices that trained it, else the previous column
        for j in range(R_MAX):
            trainers = [(b[name][:, j], w) for b, rank, w in devices if rank > j]
            if trainers:
                expected = sum(w * col for col, w in trainers) / sum(w for _, w in trainers)
            else:
                expected = previous[name][:, j]
            assert torch.allclose(new[name][:, j], expected, atol=TOL, rtol=0)
        # B A is the sum of the column outer products
        outer = sum(torch.outer(new[name][:, j], a[j]) for j in range(R_MAX))
        assert torch.allclose(new[name] @ a, outer, atol=TOL, rtol=0)
        # block-wise: each block's product is the weighted mean of the devices' block products
        for lo, hi in ((0, 2), (2, 4), (4, 8)):
            group = [(b, w) for b, rank, w in devices if rank >= hi]
            if not group:
                continue
            mean = sum(w * b[name][:, lo:hi] @ a[lo:hi] for b, w in group) / sum(w for _, w in group)
            assert torch.allclose(new[name][:, lo:hi] @ a[lo:hi], mean, atol=TOL, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_total_normalised_deltas_are_the_weighted_mean_of_products_for_any_mix(seed: int) -> None:
    devices = _devices(seed, n=10)  # here B_k are changes dB_k
    previous = _previous()
    new = _aggregate(devices, previous, deltas=True, normalize="total")
    total = sum(w for _, _, w in devices)
    for name in SHAPES:
        a = _a(name)
        mean_product = sum(w * b[name] @ a[:rank] for b, rank, w in devices) / total
        assert torch.allclose((new[name] - previous[name]) @ a, mean_product, atol=TOL, rtol=0)


def test_column_deltas_equal_column_values_from_a_common_start() -> None:
    previous = _previous()
    deltas = _devices(seed=11, n=8)
    values = [({n: previous[n][:, :rank] + d[n] for n in d}, rank, w) for d, rank, w in deltas]
    from_values = _aggregate(values, previous)
    from_deltas = _aggregate(deltas, previous, deltas=True)
    for name in SHAPES:
        assert torch.allclose(from_values[name], from_deltas[name], atol=TOL, rtol=0)


def test_split_for_rank_reproduces_the_global_adapter() -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(12, R_MAX, generator=g, dtype=torch.float64)
    a = _a("layer0.query")
    for rank in (2, 4, 8):
        b_train, a_train, frozen = hl.split_for_rank(b, a, rank)
        assert b_train.shape == (12, rank) and a_train.shape == (rank, 16)
        assert torch.allclose(b_train @ a_train + frozen, b @ a, atol=TOL, rtol=0)
    assert hl.peft_alpha(2, 8, 16.0) / 2 == 16.0 / 8


# --- order, secure sums, memory -----------------------------------------------------------------


def test_order_and_grouping_do_not_matter() -> None:
    devices = _devices(seed=21, n=30)
    previous = _previous()
    reference = _aggregate(devices, previous)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        order = torch.randperm(len(devices), generator=g).tolist()
        shuffled = _aggregate([devices[i] for i in order], previous)
        for name in SHAPES:
            assert torch.allclose(shuffled[name], reference[name], atol=1e-12, rtol=0)
    # Secure aggregation reveals only the sum of uploads: adding that sum once is the same.
    uploads = [hl.contribution(b, rank, w, SHAPES) for b, rank, w in devices]
    secure_sum = hl.Contribution(
        {n: sum(u.weighted_b[n] for u in uploads) for n in SHAPES},
        {n: sum(u.col_weights[n] for u in uploads) for n in SHAPES},
    )
    summed = hl.finalize(hl.add(hl.init(SHAPES), secure_sum), previous)
    for name in SHAPES:
        assert torch.allclose(summed[name], reference[name], atol=1e-12, rtol=0)


def test_state_memory_does_not_grow_with_clients() -> None:
    devices = _devices(seed=5, n=300)
    state = hl.init(SHAPES)
    size = hl.state_nbytes(state)
    assert size == sum(d * r * 8 + r * 8 for d, r in SHAPES.values())
    for i, (b, rank, w) in enumerate(devices):
        state = hl.accumulate(state, b, rank, w)
        if i in (0, 9, 299):
            assert hl.state_nbytes(state) == size
            assert set(state.sums) == set(SHAPES) and state.count == i + 1


def test_accumulate_is_functional_and_accepts_padded_uploads() -> None:
    b = {"head.dense": torch.ones(5, 2, dtype=torch.float64)}
    empty = hl.init(SHAPES)
    s1 = hl.accumulate(empty, b, 2, 1.0)
    assert not empty.sums["head.dense"].any(), "accumulate must not mutate its input state"
    s2 = hl.accumulate(empty, {"head.dense": hl.pad_b(b["head.dense"], R_MAX)}, 2, 1.0)
    assert torch.equal(s1.sums["head.dense"], s2.sums["head.dense"])
    # an adapter a device did not send gets no weight from it
    assert not s1.col_weights["layer0.query"].any()


def test_refusals() -> None:
    state = hl.init(SHAPES)
    with pytest.raises(ValueError, match="unknown adapter"):
        hl.accumulate(state, {"nope": torch.ones(5, 2)}, 2, 1.0)
    with pytest.raises(ValueError, match=r"1\.\.8"):
        hl.accumulate(state, {"head.dense": torch.ones(5, 9)}, 9, 1.0)
    with pytest.raises(ValueError, match="beyond rank"):
        hl.accumulate(state, {"head.dense": torch.ones(5, R_MAX)}, 2, 1.0)
    with pytest.raises(ValueError, match="shape"):
        hl.accumulate(state, {"head.dense": torch.ones(4, 2)}, 2, 1.0)
    with pytest.raises(ValueError, match="weight"):
        hl.accumulate(state, {"head.dense": torch.ones(5, 2)}, 2, -1.0)
    with pytest.raises(ValueError, match="deltas=True"):
        hl.finalize(state, _previous(), normalize="total")
    with pytest.raises(ValueError, match="previous B"):
        hl.finalize(hl.accumulate(state, {"head.dense": torch.ones(5, 2)}, 2, 1.0), {})
