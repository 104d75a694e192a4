"""Robust aggregation where secure aggregation is off: `trimmed-mean` and `krum` checked by hand,
the server's L2 norm bound on plain updates (`federation/rules/norm_bound.py`), and a
norm-boosted hostile device's effect on the global adapter, bounded in both modes (plain: the
norm bound or a robust rule; secure: the decoded-sum checks, with and without distributed DP).
"""

from __future__ import annotations

import numpy as np
import pytest

from federation.config import RunConfig
from federation.errors import FedgeError
from federation.rules import get_rule, known_rules
from federation.rules.exact_mixed_rank import WEIGHT, contribution
from federation.rules.krum import krum_scores, multi_krum, tolerated
from federation.rules.norm_bound import clip_update, update_norm
from federation.rules.trimmed_mean import trimmed_mean
from federation.secagg.protocol import plan
from federation.secagg.vector import (
    ImplausibleSumError,
    check_plausible_sum,
    decode_total,
    dp_value_length,
    encode_update,
    vector_length,
)

B, HEAD = "lora.q.lora_B.weight", "head.bias"
SHAPES = {B: (6, 4), HEAD: (5,)}
MEAN, TRIMMED, KRUM = get_rule("exact-mixed-rank"), get_rule("trimmed-mean"), get_rule("krum")


def _delta(rng: np.random.Generator, rank: int = 4, scale: float = 0.01, shift: float = 0.0) -> dict:
    b = rng.normal(shift, scale, SHAPES[B])
    b[:, rank:] = 0
    return {B: b, HEAD: rng.normal(shift, scale, SHAPES[HEAD])}


def _aggregate(rule, deltas: list[dict], weights: list[int], ranks: list[int]) -> dict[str, np.ndarray]:
    state = rule.init()
    for delta, w, r in zip(deltas, weights, ranks, strict=True):
        upload = rule.upload(delta, float(w), r)
        assert rule.check(upload, SHAPES, 1000.0) is None
        rule.add(state, {f"phone/{k}": v for k, v in upload.items()})
    return {k.removeprefix("phone/"): v for k, v in rule.finalize(state).items()}


def test_the_robust_rules_are_registered_and_refused_under_secure_aggregation() -> None:
    assert {"trimmed-mean", "krum"} <= set(known_rules())
    for name in ("trimmed-mean", "krum"):
        rule = get_rule(name)
        assert not rule.is_sum and rule.not_sum_reason
        with pytest.raises(FedgeError, match=f"aggregation='{name}' cannot run with secure aggregation"):
            RunConfig.parse({"scenario": "smoke", "aggregation": name})
        plain = {"scenario": "smoke", "aggregation": name, "secure-aggregation": False}
        assert RunConfig.parse(plain).rule is rule
        with pytest.raises(FedgeError, match="needs secure-aggregation = true"):  # and no DP with them
            RunConfig.parse({"scenario": "smoke", "aggregation": name, "secure-aggregation": False,
                             "dp-mechanism": "skellam"})  # fmt: skip


def test_trimmed_mean_by_hand() -> None:
    values = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0], [100.0, 5.0]])
    trained = np.array([[1, 1], [1, 1], [1, 1], [1, 1], [1, 0]], dtype=bool)
    # column 0: 5 devices, floor(0.2 x 5) = 1 cut from each end -> mean(2, 3, 4) = 3
    # column 1: 4 devices, floor(0.8) = 0 cut -> the plain mean 5 (the 5th did not train it)
    np.testing.assert_allclose(trimmed_mean(values, trained), [3.0, 5.0])
    np.testing.assert_allclose(trimmed_mean(values, np.zeros_like(trained)), [0.0, 0.0])
    # where every device trained every entry it is Flower's FedTrimmedAvg's trim_mean
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

    for devices in (3, 5, 7, 11):
        stack = np.random.default_rng(devices).standard_cauchy(size=(devices, 30))
        everyone = np.ones_like(stack, dtype=bool)
        np.testing.assert_allclose(trimmed_mean(stack, everyone), trim_mean(stack, 0.2), rtol=1e-12)


def test_trimmed_mean_over_mixed_ranks_trims_per_column() -> None:
    rng = np.random.default_rng(0)
    ranks = [1, 2, 4, 4, 4]
    deltas = [_delta(rng, r) for r in ranks]
    deltas[4][B][:, :4] = 50.0  # one outlier on every column it trained
    out = _aggregate(TRIMMED, deltas, [1] * 5, ranks)
    col0 = np.stack([d[B][:, 0] for d in deltas])  # 5 devices: drop min and max
    expected0 = np.sort(col0, axis=0)[1:4].mean(axis=0)
    np.testing.assert_allclose(out[B][:, 0], expected0)
    # column 2: devices 3, 4, 5 (3 devices: nothing trimmed, the outlier stays in: documented)
    np.testing.assert_allclose(out[B][:, 2], np.mean([d[B][:, 2] for d in deltas[2:]], axis=0))


def test_krum_scores_by_hand_and_multi_krum_leaves_out_the_far_update() -> None:
    vectors = np.array([[0.0], [1.0], [2.0], [10.0]])
    # f = 1 for n = 4: each row's n - f - 2 = 1 nearest neighbour
    assert tolerated(4) == 1 and tolerated(7) == 2 and tolerated(2) == 0
    np.testing.assert_allclose(krum_scores(vectors, 1), [1.0, 1.0, 1.0, 64.0])
    assert multi_krum(vectors).tolist() == [0, 1, 2]
    # the same scores and selection as Flower's MultiKrum strategy on the same updates
    from flwr.app import Array, ArrayRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum

    wide = np.random.default_rng(9).normal(size=(6, 40))
    wide[4] *= 30
    records = [ArrayRecord({"x": Array(row)}) for row in wide]
    flower = compute_distances(records)
    for i, row in enumerate(flower):
        nearest = np.sort(row)[1 : 6 - 1 - 2 + 1]
        assert krum_scores(wide, 1)[i] == pytest.approx(nearest.sum(), rel=1e-9)
    picked = select_multikrum([RecordDict({"a": r}) for r in records], 1, 5)
    chosen = sorted(int(np.flatnonzero((wide == p["a"]["x"].numpy()).all(axis=1))[0]) for p in picked)
    assert multi_krum(wide).tolist() == chosen == [0, 1, 2, 3, 5]
    rng = np.random.default_rng(1)
    ranks = [2, 4, 4, 4, 4]
    deltas = [_delta(rng, r) for r in ranks]
    deltas[3] = {k: v * 1000 for k, v in deltas[3].items()}  # norm-boosted
    out = _aggregate(KRUM, deltas, [1] * 5, ranks)
    honest = [d for i, d in enumerate(deltas) if i != 3]
    np.testing.assert_allclose(out[HEAD], np.mean([d[HEAD] for d in honest], axis=0), atol=1e-8)
    np.testing.assert_allclose(out[B][:, 3], np.mean([d[B][:, 3] for d in honest[1:]], axis=0), atol=1e-8)


def test_the_norm_bound_clips_the_delta_not_the_weights() -> None:
    rng = np.random.default_rng(2)
    delta = _delta(rng, 3)
    layout = MEAN.layout(SHAPES)
    upload = contribution(delta, 20.0, 3)  # weight 20: the values are 20 x delta
    norm = float(np.sqrt(np.sum(delta[B] ** 2) + np.sum(delta[HEAD] ** 2)))
    assert update_norm(upload, layout) == pytest.approx(norm, rel=1e-6)
    clipped, before = clip_update(upload, layout, norm / 4)
    assert before == pytest.approx(norm, rel=1e-6)
    assert update_norm(clipped, layout) == pytest.approx(norm / 4, rel=1e-6)
    np.testing.assert_allclose(clipped[B], upload[B] / 4, rtol=1e-6)
    assert np.array_equal(clipped[B + WEIGHT], upload[B + WEIGHT])  # weights untouched
    assert MEAN.check(clipped, SHAPES, 100.0) is None
    same, _ = clip_update(upload, layout, 10 * norm)  # under the bound: unchanged
    assert all(np.array_equal(same[k], upload[k]) for k in upload)
    off, _ = clip_update(upload, layout, 0.0)  # 0: no bound
    assert all(np.array_equal(off[k], upload[k]) for k in upload)


def _distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in (B, HEAD))))


def test_a_norm_boosted_device_is_bounded_in_plain_mode() -> None:
    """Seven honest devices and one that boosts its update 1000x. The mean without a bound is
    dragged ~1000x further than the honest spread; with the server's norm bound its pull on
    the global adapter is at most (its weight / total weight) x (bound + |honest mean|); with
    the robust rules it stays within the honest devices' range."""
    rng = np.random.default_rng(3)
    ranks, weights = [4] * 8, [10] * 8
    deltas = [_delta(rng, 4, 0.01, 0.02) for _ in range(8)]
    honest_mean = _aggregate(MEAN, deltas[:7], weights[:7], ranks[:7])
    deltas[7] = {k: v * 1000 for k, v in deltas[7].items()}
    boosted = _aggregate(MEAN, deltas, weights, ranks)
    honest_spread = max(_distance(d, honest_mean) for d in deltas[:7])
    assert _distance(boosted, honest_mean) > 50 * honest_spread  # unbounded: the attack works

    bound = 0.1
    layout = MEAN.layout(SHAPES)
    state = MEAN.init()
    for delta, w, r in zip(deltas, weights, ranks, strict=True):
        upload, _ = clip_update(MEAN.upload(delta, float(w), r), layout, bound)
        MEAN.add(state, {f"phone/{k}": v for k, v in upload.items()})
    bounded = {k.removeprefix("phone/"): v for k, v in MEAN.finalize(state).items()}
    zero = {B: np.zeros(SHAPES[B]), HEAD: np.zeros(SHAPES[HEAD])}
    limit = weights[7] / sum(weights) * (bound + _distance(honest_mean, zero))
    assert _distance(bounded, honest_mean) <= limit * (1 + 1e-6)

    for rule in (TRIMMED, KRUM, get_rule("median")):
        robust = _aggregate(rule, deltas, [1] * 8, ranks)
        assert _distance(robust, honest_mean) <= honest_spread, rule.name


@pytest.mark.parametrize("dp", [False, True])
def test_a_norm_boosted_device_is_bounded_under_secure_aggregation(dp: bool) -> None:
    """The server sees only the sum. Without DP a boosted update past secagg-clip fails the
    value-bound check and the group is aborted (the global adapter does not move); with DP the
    sum's norm check refuses it. Either way the boost does not reach the global adapter."""
    rng = np.random.default_rng(4)
    n = 4
    extra = dict(dp_mechanism="distributed-discrete-gaussian", dp_noise_multiplier=0.5, dp_clip=0.05,
                 dp_length=dp_value_length(MEAN, SHAPES)) if dp else {}  # fmt: skip
    params = plan(1, 1, "phone", n, vector_length(MEAN, SHAPES, dp=dp), clip=1.0, value_bits=24,
                  max_weight=1 if dp else 64, **extra)  # fmt: skip
    deltas = [_delta(rng, 4, 0.01) for _ in range(n)]
    deltas[3] = {k: v * 1000 for k, v in deltas[3].items()}  # 10 per coordinate: past clip 1.0
    vectors = []
    for i, delta in enumerate(deltas):
        if i == 3 and dp:  # a hostile device skips its own clipping (and its noise)
            from federation.privacy.rotation import rotate

            flat = np.concatenate([delta[B].ravel(), delta[HEAD].ravel()])  # layout order: B, head
            q = np.rint(rotate(flat, params.dp_rotation_seed) * params.dp_plan().scale).astype(np.int64)
            raw = np.concatenate([q, np.ones(5, dtype=np.int64)]).view(np.uint64)  # any residues it likes
            vectors.append(raw & np.uint64((1 << params.modulus_bits) - 1))
        elif i == 3:  # skips the per-coordinate clip: its weighted values, exactly
            from federation.secagg.quantize import encode_integers, scale_for

            upload = MEAN.upload(delta, 8.0, 4)
            parts = []
            for key in sorted(upload):
                if key.endswith(WEIGHT):
                    parts.append(encode_integers(upload[key].astype(np.int64), params.modulus_bits))
                else:
                    scaled = np.rint(upload[key].ravel() * scale_for(1.0, 24)).astype(np.int64)
                    parts.append(encode_integers(scaled, params.modulus_bits))
            vectors.append(np.concatenate(parts))
        else:
            vectors.append(encode_update(MEAN, delta, 8, SHAPES, params, rank=4))
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total = total + v
    total &= np.uint64((1 << params.modulus_bits) - 1)
    with pytest.raises(ImplausibleSumError, match=r"dp-norm-bound|dp-coordinate-bound|value-bound"):
        decoded = decode_total(MEAN, total, SHAPES, params, n)
        check_plausible_sum(MEAN, decoded, SHAPES, params, n)
