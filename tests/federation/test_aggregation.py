"""Streamed weighted averaging (`federation.aggregation`) and summed metrics (`federation.metrics`).

Every expectation is computed independently by hand with numpy (or with the exact per-example
functions of `federation.data.baselines`), never by calling the code under test twice.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from federation import aggregation, metrics
from federation.data import baselines

# ------------------------------------------------------------------------------- aggregation


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "phone/lora.q": rng.normal(size=(4, 3)).astype(np.float32),
        "phone/head.bias": rng.normal(size=(5,)).astype(np.float32),
        "tv/lora.q": rng.normal(size=(4, 3)).astype(np.float32),
        "tv/head.item": rng.normal(size=(2, 3)).astype(np.float32),
        "sensor/head.weight": rng.normal(size=(7, 2)).astype(np.float32),
    }


def _updates() -> list[tuple[dict[str, np.ndarray], float]]:
    """Three phones (one uploads only its LoRA part) and two TVs, with unequal weights."""
    rng = np.random.default_rng(1)

    def r(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    return [
        ({"phone/lora.q": r(4, 3), "phone/head.bias": r(5)}, 10.0),
        ({"phone/lora.q": r(4, 3), "phone/head.bias": r(5)}, 30.0),
        ({"phone/lora.q": r(4, 3)}, 60.0),
        ({"tv/lora.q": r(4, 3), "tv/head.item": r(2, 3)}, 5.0),
        ({"tv/lora.q": r(4, 3), "tv/head.item": r(2, 3)}, 15.0),
    ]


def _aggregate(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    state = aggregation.init()
    for delta, weight in updates:
        aggregation.accumulate(state, delta, weight)
    assert state.contributors == len(updates)
    return aggregation.apply(state, _global())


def test_weighted_mean_over_contributors_only() -> None:
    g, ups = _global(), _updates()
    new = _aggregate(ups)

    def hand(key: str) -> np.ndarray:
        pairs = [(d[key].astype(np.float64), w) for d, w in ups if key in d]
        total = sum(w for _, w in pairs)
        return g[key].astype(np.float64) + sum(w * d for d, w in pairs) / total

    # phone LoRA: all three phones, weights 10/30/60
    np.testing.assert_allclose(new["phone/lora.q"], hand("phone/lora.q"), rtol=1e-6, atol=1e-6)
    # phone head: only the two phones that uploaded it (weights 10/30), not diluted by the third
    b0, b1 = ups[0][0]["phone/head.bias"], ups[1][0]["phone/head.bias"]
    expected_head = g["phone/head.bias"] + (10 * b0 + 30 * b1) / 40
    np.testing.assert_allclose(new["phone/head.bias"], expected_head, rtol=1e-6, atol=1e-6)
    # tv: averaged over the TVs only (weights 5/15)
    for key in ("tv/lora.q", "tv/head.item"):
        expected = g[key] + (5 * ups[3][0][key] + 15 * ups[4][0][key]) / 20
        np.testing.assert_allclose(new[key], expected, rtol=1e-6, atol=1e-6)
    # nobody uploaded the sensor head: unchanged, bit for bit, same dtype
    assert np.array_equal(new["sensor/head.weight"], g["sensor/head.weight"])
    assert all(new[k].dtype == g[k].dtype for k in g)
    assert set(new) == set(g)


def test_apply_does_not_touch_the_input_state_and_scales_by_server_lr() -> None:
    g = _global()
    before = {k: v.copy() for k, v in g.items()}
    state = aggregation.init()
    delta = {"sensor/head.weight": np.ones((7, 2), np.float32)}
    aggregation.accumulate(state, delta, 3.0)
    new = aggregation.apply(state, g, server_lr=0.5)
    assert all(np.array_equal(g[k], before[k]) for k in g)
    np.testing.assert_allclose(new["sensor/head.weight"], g["sensor/head.weight"] + 0.5, rtol=1e-6)


def test_order_independent() -> None:
    ups = _updates()
    reference = _aggregate(ups)
    for perm in itertools.permutations(range(len(ups))):
        other = _aggregate([ups[i] for i in perm])
        for key in reference:
            np.testing.assert_allclose(other[key], reference[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_non_positive_weight_raises(weight: float) -> None:
    state = aggregation.init()
    with pytest.raises(ValueError, match="weight"):
        aggregation.accumulate(state, {"a": np.ones(2)}, weight)
    assert state.contributors == 0 and not state.sums


EXPECTED = {"lora.q": (4, 3), "head.bias": (5,)}


def _good() -> dict[str, np.ndarray]:
    return {"lora.q": np.zeros((4, 3), np.float32), "head.bias": np.ones(5, np.float32)}


def test_validate_update_accepts_a_good_update() -> None:
    assert aggregation.validate_update(_good(), EXPECTED, 12.0) is None


@pytest.mark.parametrize(
    ("change", "weight", "words"),
    [
        (lambda u: u["lora.q"].__setitem__((0, 0), np.nan), 1.0, ["lora.q", "NaN"]),
        (lambda u: u["head.bias"].__setitem__(2, np.inf), 1.0, ["head.bias", "inf"]),
        (lambda u: u["head.bias"].__setitem__(2, -np.inf), 1.0, ["head.bias", "inf"]),
        (lambda u: u.__setitem__("lora.q", np.zeros((3, 4), np.float32)), 1.0, ["lora.q", "shape", "(3, 4)"]),
        (lambda u: u.pop("head.bias"), 1.0, ["missing", "head.bias"]),
        (lambda u: u.__setitem__("head.extra", np.zeros(1, np.float32)), 1.0, ["unexpected", "head.extra"]),
        (lambda u: u.__setitem__("head.bias", np.ones(5, np.int64)), 1.0, ["head.bias", "dtype", "int64"]),
        (lambda u: None, 0.0, ["num-examples", "positive"]),
        (lambda u: None, -3.0, ["num-examples", "positive"]),
        (lambda u: None, float("nan"), ["num-examples", "positive"]),
        (lambda u: None, float("inf"), ["num-examples", "positive"]),
    ],
    ids=["nan", "inf", "-inf", "shape", "missing", "extra", "int-dtype", "w0", "w-neg", "w-nan", "w-inf"],
)
def test_validate_update_names_the_problem(change, weight: float, words: list[str]) -> None:
    update = _good()
    change(update)
    reason = aggregation.validate_update(update, EXPECTED, weight)
    assert reason is not None
    for word in words:
        assert word in reason, (word, reason)


# ----------------------------------------------------------------------------------- metrics


def _binned(scores: np.ndarray, labels: np.ndarray, bins: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Histograms exactly as the TV evaluation bins probabilities (federation.training.eval_tv)."""
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
