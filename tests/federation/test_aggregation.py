"""The default aggregation rule (`exact-mixed-rank`, through `federation.rules.get_rule`) and
summed metrics (`federation.metrics`).

Devices upload *contributions* (weighted delta + `KEY#weight` weights); the server `add`s them
and `apply`s the sum. Every expectation is computed independently by hand with numpy (or with
the exact per-example functions of `federation.data.baselines`), never by calling the code under
test twice. The mixed-rank identities are in `test_mixed_rank.py`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from federation import metrics
from federation.data import baselines
from federation.rules import get_rule
from federation.rules.exact_mixed_rank import WEIGHT

RULE = get_rule("exact-mixed-rank")  # every test goes through the rule interface

# ------------------------------------------------------------------------------- aggregation

B = "lora.q.lora_B.weight"  # a LoRA B key: weighted per column


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"phone/{B}": rng.normal(size=(4, 3)).astype(np.float32),
        "phone/head.bias": rng.normal(size=(5,)).astype(np.float32),
        f"tv/{B}": rng.normal(size=(4, 3)).astype(np.float32),
        "tv/head.item": rng.normal(size=(2, 3)).astype(np.float32),
        "sensor/head.weight": rng.normal(size=(7, 2)).astype(np.float32),
    }


def _updates() -> list[tuple[dict[str, np.ndarray], float]]:
    """Three phones (one uploads only its LoRA part) and two TVs, with unequal weights."""
    rng = np.random.default_rng(1)

    def r(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    return [
        ({f"phone/{B}": r(4, 3), "phone/head.bias": r(5)}, 10.0),
        ({f"phone/{B}": r(4, 3), "phone/head.bias": r(5)}, 30.0),
        ({f"phone/{B}": r(4, 3)}, 60.0),
        ({f"tv/{B}": r(4, 3), "tv/head.item": r(2, 3)}, 5.0),
        ({f"tv/{B}": r(4, 3), "tv/head.item": r(2, 3)}, 15.0),
    ]


def _aggregate(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    state = RULE.init()
    for delta, weight in updates:
        RULE.add(state, RULE.upload(delta, weight))
    assert state.count == len(updates)
    return RULE.update(_global(), RULE.finalize(state), 1.0)


def test_contribution_is_the_weighted_delta_and_its_weights() -> None:
    delta = {B: np.arange(12, dtype=np.float32).reshape(4, 3), "head.bias": np.ones(5, np.float32)}
    contrib = RULE.upload(delta, 2.5)
    assert set(contrib) == {B, B + WEIGHT, "head.bias", "head.bias" + WEIGHT}
    np.testing.assert_array_equal(contrib[B], 2.5 * delta[B])
    np.testing.assert_array_equal(contrib[B + WEIGHT], [2.5, 2.5, 2.5])  # one weight per column
    np.testing.assert_array_equal(contrib["head.bias" + WEIGHT], [2.5])  # one weight per key
    assert all(v.dtype == np.float32 for v in contrib.values())
    # a device of rank 2 of 3: weight on its 2 columns only; a rank at or above r_max means all
    low = {B: delta[B] * np.array([1, 1, 0], np.float32)}
    np.testing.assert_array_equal(RULE.upload(low, 2.0, rank=2)[B + WEIGHT], [2, 2, 0])
    np.testing.assert_array_equal(RULE.upload(delta, 2.0, rank=8)[B + WEIGHT], [2, 2, 2])
    with pytest.raises(ValueError, match="beyond the device's rank 2"):
        RULE.upload(delta, 2.0, rank=2)
    with pytest.raises(ValueError, match="rank"):
        RULE.upload(delta, 2.0, rank=0)


def test_weighted_mean_over_contributors_only() -> None:
    g, ups = _global(), _updates()
    new = _aggregate(ups)

    def hand(key: str) -> np.ndarray:
        pairs = [(d[key].astype(np.float64), w) for d, w in ups if key in d]
        total = sum(w for _, w in pairs)
        return g[key].astype(np.float64) + sum(w * d for d, w in pairs) / total

    # phone LoRA: all three phones, weights 10/30/60
    np.testing.assert_allclose(new[f"phone/{B}"], hand(f"phone/{B}"), rtol=1e-6, atol=1e-6)
    # phone head: only the two phones that uploaded it (weights 10/30), not diluted by the third
    b0, b1 = ups[0][0]["phone/head.bias"], ups[1][0]["phone/head.bias"]
    expected_head = g["phone/head.bias"] + (10 * b0 + 30 * b1) / 40
    np.testing.assert_allclose(new["phone/head.bias"], expected_head, rtol=1e-6, atol=1e-6)
    # tv: averaged over the TVs only (weights 5/15)
    for key in (f"tv/{B}", "tv/head.item"):
        expected = g[key] + (5 * ups[3][0][key] + 15 * ups[4][0][key]) / 20
        np.testing.assert_allclose(new[key], expected, rtol=1e-6, atol=1e-6)
    # nobody uploaded the sensor head: unchanged, bit for bit, same dtype
    assert np.array_equal(new["sensor/head.weight"], g["sensor/head.weight"])
    assert all(new[k].dtype == g[k].dtype for k in g)
    assert set(new) == set(g)


def test_apply_does_not_touch_the_input_state_and_scales_by_server_lr() -> None:
    g = _global()
    before = {k: v.copy() for k, v in g.items()}
    state = RULE.init()
    delta = {"sensor/head.weight": np.ones((7, 2), np.float32)}
    RULE.add(state, RULE.upload(delta, 3.0))
    new = RULE.update(g, RULE.finalize(state), 0.5)
    assert all(np.array_equal(g[k], before[k]) for k in g)
    np.testing.assert_allclose(new["sensor/head.weight"], g["sensor/head.weight"] + 0.5, rtol=1e-6)


def test_order_independent() -> None:
    ups = _updates()
    reference = _aggregate(ups)
    for perm in itertools.permutations(range(len(ups))):
        other = _aggregate([ups[i] for i in perm])
        for key in reference:
            np.testing.assert_allclose(other[key], reference[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_a_device_refuses_to_upload_with_a_non_positive_or_non_finite_weight(weight: float) -> None:
    # A weight of 0 would silently drop the device's work; NaN/inf would poison the sum.
    with pytest.raises(ValueError, match="aggregation weight must be a positive number"):
        RULE.upload({"lora.q.lora_B.weight": np.ones((2, 3)), "head.bias": np.ones(2)}, weight)


EXPECTED = {"lora.q.lora_B.weight": (4, 3), "head.bias": (5,)}
MAX_WEIGHT = 100.0


def _good(rank: int = 3, weight: float = 12.0) -> dict[str, np.ndarray]:
    delta = {"lora.q.lora_B.weight": np.ones((4, 3), np.float32), "head.bias": np.ones(5, np.float32)}
    delta["lora.q.lora_B.weight"][:, rank:] = 0.0
    return RULE.upload(delta, weight, rank=rank)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_validate_contribution_accepts_a_good_contribution(rank: int) -> None:
    assert RULE.check(_good(rank), EXPECTED, MAX_WEIGHT) is None
    assert RULE.check(_good(rank, MAX_WEIGHT), EXPECTED, MAX_WEIGHT) is None


def _set_weight(contrib: dict[str, np.ndarray], weight: float) -> None:
    """Claim another weight on every trained entry (as a dishonest or broken device might)."""
    for key in list(contrib):
        if key.endswith(WEIGHT):
            contrib[key] = np.where(contrib[key] != 0, weight, 0).astype(np.float32)


Q, QW = "lora.q.lora_B.weight", "lora.q.lora_B.weight#weight"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda u: u[Q].__setitem__((0, 0), np.nan), [Q, "NaN"]),
        (lambda u: u["head.bias"].__setitem__(2, np.inf), ["head.bias", "inf"]),
        (lambda u: u["head.bias"].__setitem__(2, -np.inf), ["head.bias", "inf"]),
        (lambda u: u.__setitem__(Q, np.zeros((3, 4), np.float32)), [Q, "shape", "(3, 4)"]),
        (lambda u: u.__setitem__(QW, np.ones(4, np.float32)), [QW, "shape", "(4,)"]),
        (lambda u: u.pop("head.bias"), ["missing", "head.bias"]),
        (lambda u: u.pop("head.bias#weight"), ["missing", "head.bias#weight"]),
        (lambda u: u.__setitem__("head.extra", np.zeros(1, np.float32)), ["unexpected", "head.extra"]),
        (lambda u: u.__setitem__("head.bias", np.ones(5, np.int64)), ["head.bias", "dtype", "int64"]),
        (lambda u: _set_weight(u, 0.0), ["weights", "positive"]),
        (lambda u: _set_weight(u, -3.0), ["weight -3.0", "outside"]),
        (lambda u: _set_weight(u, np.nan), ["#weight", "NaN"]),
        (lambda u: _set_weight(u, np.inf), ["#weight", "inf"]),
        (lambda u: _set_weight(u, MAX_WEIGHT * 2), ["weight 200.0", "outside", "100.0"]),
        (lambda u: u["head.bias#weight"].__setitem__(0, 5.0), ["one positive number per device"]),
        (lambda u: u.__setitem__(QW, np.array([0.0, 12.0, 12.0], np.float32)), [QW, "prefix"]),
    ],
    ids=[
        "nan",
        "inf",
        "-inf",
        "shape",
        "weight-shape",
        "missing",
        "missing-weight",
        "extra",
        "int-dtype",
        "w0",
        "w-neg",
        "w-nan",
        "w-inf",
        "w-above-max",
        "two-weights",
        "not-a-prefix",
    ],
)
def test_validate_contribution_names_the_problem(change, words: list[str]) -> None:
    contrib = _good()
    change(contrib)
    reason = RULE.check(contrib, EXPECTED, MAX_WEIGHT)
    assert reason is not None
    for word in words:
        assert word in reason, (word, reason)


def test_values_in_untrained_columns_are_refused() -> None:
    contrib = _good(rank=2)
    contrib[Q][1, 2] = 0.5  # column 2 carries no weight: the device did not train it
    reason = RULE.check(contrib, EXPECTED, MAX_WEIGHT)
    assert reason is not None and Q in reason and "did not train" in reason


# ----------------------------------------------------------------------------------- metrics


def _binned(scores: np.ndarray, labels: np.ndarray, bins: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Histograms exactly as the TV evaluation bins probabilities (federation.tasks.tv.eval_tv)."""
    idx = np.clip((scores * bins).astype(np.int64), 0, bins - 1)
    pos = np.bincount(idx[labels == 1], minlength=bins).astype(np.float64)
    neg = np.bincount(idx[labels == 0], minlength=bins).astype(np.float64)
    return pos, neg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_from_histograms_matches_exact_auc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(3000) < 0.4).astype(np.int64)
    # informative but noisy scores in [0, 1]
    scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=labels.size) + 1.2 * labels)))
    exact = baselines.auc(scores, labels)
    binned = metrics.auc_from_histograms(*_binned(scores, labels))
    assert 0.6 < exact < 0.9  # the case is not degenerate
    assert abs(binned - exact) < 0.01


def test_auc_from_histograms_extremes() -> None:
    labels = np.array([0] * 50 + [1] * 50)
    scores = np.concatenate([np.linspace(0.0, 0.45, 50), np.linspace(0.55, 1.0, 50)])
    assert metrics.auc_from_histograms(*_binned(scores, labels)) == 1.0
    assert metrics.auc_from_histograms(*_binned(1.0 - scores, labels)) == 0.0
    # everything in one bin: a tie, one half
    assert metrics.auc_from_histograms(*_binned(np.full(100, 0.3), labels)) == 0.5
    assert math.isnan(metrics.auc_from_histograms([0.0, 0.0], [3.0, 1.0]))


@pytest.mark.parametrize("seed", [0, 1])
def test_macro_f1_from_confusion_matches_per_example_macro_f1(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_classes = 7
    # class 6 occurs neither in truth nor in predictions (F1 undefined: left out)
    target = rng.integers(0, n_classes - 1, size=400)
    pred = np.where(rng.random(400) < 0.6, target, rng.integers(0, n_classes - 2, size=400))
    confusion = np.bincount(target * n_classes + pred, minlength=n_classes**2).astype(float)
    expected = baselines.macro_f1(pred, target, n_classes)
    got = metrics.macro_f1_from_confusion(confusion.tolist(), n_classes)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.3 < expected < 0.95


def test_finalize_per_task() -> None:
    assert metrics.finalize("phone", {"count": 0.0}) == {}
    phone = metrics.finalize("phone", {"loss_sum": 30.0, "count": 10.0, "top1": 2.0, "top3": 5.0})
    assert phone == {"loss": 3.0, "examples": 10.0, "top1": 0.2, "top3": 0.5}

    pos, neg = [0.0, 0.0, 3.0, 1.0], [2.0, 2.0, 0.0, 0.0]
    tv = metrics.finalize(
        "tv", {"loss_sum": 4.0, "count": 8.0, "correct": 6.0, "pos_hist": pos, "neg_hist": neg}
    )
    assert tv == {"loss": 0.5, "examples": 8.0, "accuracy": 0.75, "auc": 1.0}

    # 3 classes; rows truth, columns predicted
    confusion = [[2, 1, 0], [0, 3, 0], [1, 0, 0]]
    flat = [float(v) for row in confusion for v in row]
    sensor = metrics.finalize("sensor", {"loss_sum": 7.0, "count": 7.0, "correct": 5.0, "confusion": flat})
    # F1: class 0 = 2*2/(3+3) = 2/3, class 1 = 2*3/(3+4) = 6/7, class 2 = 0 (in truth, never predicted)
    assert sensor["loss"] == 1.0 and sensor["accuracy"] == pytest.approx(5 / 7)
    assert sensor["macro_f1"] == pytest.approx((2 / 3 + 6 / 7 + 0.0) / 3)
    assert metrics.PRIMARY_METRIC == {"phone": "top1", "tv": "auc", "sensor": "accuracy"}


def test_add_sums_adds_scalars_and_lists_elementwise() -> None:
    total: dict[str, float | list[float]] = {}
    metrics.add_sums(total, {"count": 3, "loss_sum": 1.5, "hist": [1.0, 2.0, 0.0]})
    metrics.add_sums(total, {"count": 2.0, "loss_sum": 0.5, "hist": (0.0, 1.0, 4.0)})
    metrics.add_sums(total, {"hist": np.array([1.0, 1.0, 1.0]), "new": 7})
    assert total == {"count": 5.0, "loss_sum": 2.0, "hist": [2.0, 4.0, 5.0], "new": 7.0}
    assert isinstance(total["hist"], list)
