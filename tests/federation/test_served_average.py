"""The served moving average of global states (`federation.served_average`): hand-checked math."""

from __future__ import annotations

import numpy as np
import pytest

from federation.served_average import SERVED_PREFIX, check_decay, split_served, update


def _state(b: float, head: float) -> dict[str, np.ndarray]:
    return {"t/lora.B": np.full((2, 3), b, dtype=np.float32), "t/head.w": np.array([head, -head])}


def test_the_first_round_serves_its_state_and_later_rounds_average() -> None:
    s1, s2, s3 = _state(1.0, 4.0), _state(3.0, 0.0), _state(-1.0, 8.0)
    served = update(None, s1, 0.75)
    assert all(np.array_equal(served[k], s1[k]) for k in s1)  # the pretrained start is not averaged in
    served["t/head.w"][0] = 99.0
    assert s1["t/head.w"][0] == 4.0  # a copy, not the state's own arrays
    served = update(None, s1, 0.75)
    served = update(served, s2, 0.75)
    # 0.75 x 1 + 0.25 x 3 = 1.5;  0.75 x 4 + 0.25 x 0 = 3
    np.testing.assert_array_equal(served["t/lora.B"], np.full((2, 3), 1.5, dtype=np.float32))
    np.testing.assert_array_equal(served["t/head.w"], [3.0, -3.0])
    served = update(served, s3, 0.75)
    # 0.75 x 1.5 + 0.25 x (-1) = 0.875;  0.75 x 3 + 0.25 x 8 = 4.25
    np.testing.assert_allclose(served["t/lora.B"], 0.875)
    np.testing.assert_allclose(served["t/head.w"], [4.25, -4.25])
    assert served["t/lora.B"].dtype == np.float32 and served["t/head.w"].dtype == np.float64


def test_decay_zero_serves_the_latest_state() -> None:
    served = update(update(None, _state(1.0, 1.0), 0.0), _state(5.0, 2.0), 0.0)
    np.testing.assert_array_equal(served["t/lora.B"], 5.0)


def test_a_constant_state_is_served_unchanged_and_a_swing_is_damped() -> None:
    served = None
    for r in range(40):  # the state alternates around 1.0: the average settles near it
        served = update(served, _state(1.0 + (0.5 if r % 2 else -0.5), 0.0), 0.8)
    # its swing is the state's x (1 - decay) / (1 + decay) once the start has decayed away
    assert abs(float(served["t/lora.B"][0, 0]) - 1.0) == pytest.approx(0.5 * (1 - 0.8) / (1 + 0.8), abs=1e-3)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, True, float("nan")])
def test_a_decay_outside_zero_to_one_is_refused(decay: float) -> None:
    assert check_decay(decay) is not None
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        update(_state(1.0, 1.0), _state(1.0, 1.0), decay)


def test_states_that_do_not_match_are_refused() -> None:
    served = update(None, _state(1.0, 1.0), 0.5)
    with pytest.raises(ValueError, match="different keys: t/extra"):
        update(served, {**_state(1.0, 1.0), "t/extra": np.zeros(1)}, 0.5)
    bad = {**_state(1.0, 1.0), "t/head.w": np.zeros(3)}
    with pytest.raises(ValueError, match="shape"):
        update(served, bad, 0.5)


def test_a_checkpoint_splits_into_the_rest_and_the_served_average() -> None:
    state, served = _state(1.0, 1.0), _state(2.0, 2.0)
    rest, got = split_served({**state, **{SERVED_PREFIX + k: v for k, v in served.items()}})
    assert set(rest) == set(state) and got is not None and set(got) == set(served)
    assert np.array_equal(got["t/lora.B"], served["t/lora.B"])
    assert split_served(state) == (state, None)
