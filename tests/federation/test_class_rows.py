"""Class-wise head averaging (`head.classes.*`): each class's rows are averaged over the devices
that hold the class, in plaintext, under secure aggregation, and in the robust rules; and what a
hostile device can and cannot do with its class weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from federation.config import RunConfig
from federation.local import held_classes
from federation.rules import exact_mixed_rank, get_rule
from federation.rules.base import device_upload
from federation.rules.exact_mixed_rank import WEIGHT, contribution, layout, validate_contribution
from federation.secagg.protocol import Params
from federation.secagg.quantize import quantization_error_bound
from federation.secagg.vector import (
    ImplausibleSumError,
    check_plausible_sum,
    decode_total,
    encode_update,
    secure_layout,
)
from federation.tasks import get_task

RULE = exact_mixed_rank.RULE
ROWS, BIAS, NORM, B = "head.classes.weight", "head.classes.bias", "head.norm.weight", "lora.x.lora_B.weight"
SHAPES = {ROWS: (3, 2), BIAS: (3,), NORM: (2,), B: (4, 2)}


def _delta(scale: float) -> dict[str, np.ndarray]:
    return {
        ROWS: np.full((3, 2), scale, np.float32) + 0.5 * np.arange(3, dtype=np.float32)[:, None],
        BIAS: np.full(3, -scale, np.float32),
        NORM: np.full(2, scale, np.float32),
        B: np.full((4, 2), scale, np.float32),
    }


DEVICES = [  # (delta, weight, classes held)
    (_delta(0.1), 10.0, np.array([True, True, False])),
    (_delta(0.3), 30.0, np.array([True, False, False])),
    (_delta(-0.2), 20.0, np.array([False, True, False])),
]


def _round(devices=DEVICES, rule=RULE) -> dict[str, np.ndarray]:
    state = rule.init()
    for delta, weight, held in devices:
        rule.add(state, device_upload(rule, delta, weight, None, held))
    return rule.finalize(state)


def test_each_class_row_is_the_mean_over_the_devices_that_hold_it() -> None:
    mean = _round()
    # class 0: devices 1 and 2 (weights 10, 30); class 1: devices 1 and 3 (10, 20); class 2: nobody
    row0 = (10 * (0.1 + 0) + 30 * (0.3 + 0)) / 40
    row1 = (10 * (0.1 + 0.5) + 20 * (-0.2 + 0.5)) / 30
    np.testing.assert_allclose(mean[ROWS], [[row0, row0], [row1, row1], [0, 0]], rtol=1e-6)
    np.testing.assert_allclose(
        mean[BIAS], [-(10 * 0.1 + 30 * 0.3) / 40, -(10 * 0.1 - 20 * 0.2) / 30, 0], rtol=1e-6
    )
    # every other key: the mean over all three, as before
    np.testing.assert_allclose(mean[NORM], np.full(2, (1 + 9 - 4) / 60), rtol=1e-6)
    np.testing.assert_allclose(mean[B], np.full((4, 2), (1 + 9 - 4) / 60), rtol=1e-6)
    # a class nobody held keeps its rows
    new = RULE.update({k: np.ones(s, np.float32) for k, s in SHAPES.items()}, mean, 1.0)
    np.testing.assert_array_equal(new[ROWS][2], [1, 1])


@pytest.mark.parametrize("name", ["exact-mixed-rank", "median", "trimmed-mean"])
def test_the_server_s_task_prefixed_sums_are_finalized_row_by_row(name: str) -> None:
    """The server folds every task's uploads under `task/key`: class rows are found there too.
    (Krum selects devices per task prefix, so unprefixed keys are not its comparison.)"""
    rule = get_rule(name)
    state = rule.init()
    for delta, weight, held in DEVICES:
        upload = device_upload(rule, delta, weight, None, held)
        rule.add(state, {f"sensor/{k}": v for k, v in upload.items()})
    prefixed = rule.finalize(state)
    expected = _round(rule=rule)
    assert set(prefixed) == {f"sensor/{k}" for k in expected}
    for key, value in expected.items():
        np.testing.assert_allclose(prefixed[f"sensor/{key}"], value, rtol=1e-12, err_msg=key)


def test_without_classes_every_row_is_the_plain_mean() -> None:
    plain = _round([(d, w, None) for d, w, _ in DEVICES])
    np.testing.assert_allclose(
        plain[ROWS][:, 0], (10 * 0.1 + 30 * 0.3 - 20 * 0.2) / 60 + 0.5 * np.arange(3), rtol=1e-6
    )


def test_the_rows_of_classes_a_device_lacks_are_not_uploaded() -> None:
    delta, weight, held = DEVICES[0]
    up = contribution(delta, weight, None, held)
    assert up[ROWS + WEIGHT].tolist() == [10, 10, 0] and up[BIAS + WEIGHT].tolist() == [10, 10, 0]
    assert not up[ROWS][2].any() and not up[BIAS][2]
    np.testing.assert_allclose(up[ROWS][:2], 10 * delta[ROWS][:2])
    assert up[NORM + WEIGHT].tolist() == [10]
    assert validate_contribution(up, SHAPES, 100) is None
    with pytest.raises(ValueError, match="at least one class"):
        contribution(delta, weight, None, np.zeros(3, bool))
    with pytest.raises(ValueError, match="3 booleans"):
        contribution(delta, weight, None, np.array([1, 0, 1]))


def test_the_server_refuses_hostile_class_weights_in_plaintext() -> None:
    delta, weight, held = DEVICES[0]
    honest = contribution(delta, weight, None, held)
    boosted = {**honest, ROWS + WEIGHT: np.array([50, 10, 0], np.float32)}  # more on one class
    assert "one positive number" in validate_contribution(boosted, SHAPES, 100)
    nothing = {**honest, ROWS + WEIGHT: np.zeros(3, np.float32), BIAS + WEIGHT: np.zeros(3, np.float32)}
    assert "holds no class" in validate_contribution(nothing, SHAPES, 100)
    hidden = {k: v.copy() for k, v in honest.items()}
    hidden[ROWS][2] = 5.0  # a row it claims not to hold, moved anyway
    assert "did not train" in validate_contribution(hidden, SHAPES, 100)
    too_heavy = contribution(delta, 500.0, None, held)
    assert "outside" in validate_contribution(too_heavy, SHAPES, 100)


def _params(length: int) -> Params:
    return Params(
        run_id=1, server_round=1, group="sensor", n=3, degree=2, threshold=2, graph_seed=bytes(32),
        clip=1.0, value_bits=16, modulus_bits=40, max_weight=64, length=length,
    )  # fmt: skip


def _secure_sum(devices, params: Params) -> dict[str, np.ndarray]:
    total = sum(
        encode_update(RULE, d, int(w), SHAPES, params, classes=h).astype(object) for d, w, h in devices
    )
    vector = np.array([int(x) % (1 << params.modulus_bits) for x in total], dtype=np.uint64)
    return decode_total(RULE, vector, SHAPES, params)


def test_the_secure_sum_carries_the_class_weights() -> None:
    n = sum(int(np.prod(s.shape)) for s in secure_layout(RULE, SHAPES).values())
    params = _params(n)
    decoded = _secure_sum(DEVICES, params)
    assert check_plausible_sum(RULE, decoded, SHAPES, params, devices=3) == 60
    plain = RULE.init()
    for d, w, h in DEVICES:
        RULE.add(plain, contribution(d, w, None, h))
    bound = quantization_error_bound(1.0, 16, 3, max_weight=30)
    for key, value in decoded.items():
        assert np.max(np.abs(value - plain.sums[key])) <= bound, key
    assert decoded[ROWS + WEIGHT].tolist() == [40, 30, 0]


def test_the_server_refuses_implausible_class_weights_in_a_secure_sum() -> None:
    n = sum(int(np.prod(s.shape)) for s in secure_layout(RULE, SHAPES).values())
    params = _params(n)
    decoded = _secure_sum(DEVICES, params)
    for bad in ([70, 30, 0], [-5, 30, 0], [20, 30, 0]):  # above W; negative; a device holding no class
        with pytest.raises(ImplausibleSumError, match="class weights"):
            check_plausible_sum(RULE, {**decoded, ROWS + WEIGHT: np.array(bad, float)}, SHAPES, params, 3)
    # a device moving the row of a class nobody holds: its weight behind is 0, so any value shows
    moved = {k: v.copy() for k, v in decoded.items()}
    moved[ROWS][2] = 0.5
    with pytest.raises(ImplausibleSumError, match="value-bound"):
        check_plausible_sum(RULE, moved, SHAPES, params, 3)
    # under distributed DP every device weighs every class row: class weights there are a lie
    dp = replace(params, dp_mechanism="distributed-discrete-gaussian")
    ones = {k: (np.ones_like(v) * 3 if k.endswith(WEIGHT) else v) for k, v in decoded.items()}
    check_plausible_sum(RULE, ones, SHAPES, dp, 3)
    with pytest.raises(ImplausibleSumError, match="distributed DP"):
        check_plausible_sum(RULE, {**ones, ROWS + WEIGHT: np.array([3.0, 2.0, 3.0])}, SHAPES, dp, 3)


def test_robust_rules_take_each_class_row_over_the_devices_that_hold_it() -> None:
    median = _round(rule=get_rule("median"))
    # class 0: devices 1, 2 -> median of (0.1, 0.3); class 1: devices 1, 3 -> (0.6, 0.3); class 2: none
    np.testing.assert_allclose(median[ROWS][:, 0], [0.2, 0.45, 0.0], rtol=1e-6)
    np.testing.assert_allclose(median[NORM], [0.1, 0.1], rtol=1e-6)  # every device: median of 3
    for name in ("trimmed-mean", "krum"):
        rows = _round(rule=get_rule(name))[ROWS]
        assert rows[2].tolist() == [0, 0], name  # nobody held class 2: nothing moves it


def test_the_layout_declares_class_weights() -> None:
    slots = layout(SHAPES)
    assert slots[ROWS + WEIGHT].classes and slots[ROWS + WEIGHT].shape == (3,) and slots[ROWS].axis == 0
    assert not slots[B + WEIGHT].classes and slots[NORM + WEIGHT].shape == (1,)


def test_a_rule_without_class_rows_keeps_its_three_argument_upload() -> None:
    calls = []

    def upload(delta, weight, rank=None):
        calls.append(weight)
        return contribution(delta, weight, rank)

    rule = replace(RULE, name="mine", upload=upload, class_rows=False)
    up = device_upload(rule, DEVICES[0][0], 10.0, None, np.array([True, False, False]))
    assert calls == [10.0] and up[ROWS + WEIGHT].tolist() == [10, 10, 10]


def test_which_devices_report_their_classes() -> None:
    run = RunConfig.parse({"scenario": "smoke"})
    sensor = get_task("sensor")

    class Data:
        train_y = __import__("torch").tensor([0, 0, 3, 5])

    assert sensor.classes_held(Data).tolist() == [True, False, False, True, False, True, False]
    assert held_classes(run, "sensor", Data).tolist() == sensor.classes_held(Data).tolist()
    assert held_classes(run, "tv", Data) is None  # a task without class rows
    whole = RunConfig.parse({"scenario": "smoke", "class-wise-heads": False})
    assert held_classes(whole, "sensor", Data) is None
    dp = RunConfig.parse({"scenario": "smoke", "dp-mechanism": "distributed-discrete-gaussian"})
    assert held_classes(dp, "sensor", Data) is None  # exact weights outside the noise: not under DP
    plain = RunConfig.parse(
        {"scenario": "smoke", "aggregation": "flexlora", "uniform-rank": 4, "secure-aggregation": False,
         "served-average": 0.0}
    )
    assert held_classes(plain, "sensor", Data) is None  # a rule that averages the head whole
