"""The pure parts of `fedge bench deploy`: Flower's floor under a deployed round, and the
per-exchange breakdown read from the ClientApp processes' logs."""

from __future__ import annotations

import pytest

from federation.scenarios import get_scenario
from simulations.bench import DEPLOY_NODES, exchange_breakdown, flower_floor


def test_floor_is_exchanges_times_last_poll_plus_process_start() -> None:
    # 4 exchanges, 3 nodes: the last of 3 uniform phases over 3 s is 3 * 3/4 = 2.25 s on average
    assert flower_floor(4, 3, 1.5) == pytest.approx(4 * (2.25 + 1.5))
    # one node waits half a poll on average; more nodes approach the whole poll
    assert flower_floor(1, 1, 0.0) == pytest.approx(1.5)
    assert flower_floor(1, 99, 0.0) == pytest.approx(2.97)
    assert flower_floor(0, 3, 1.0) == 0.0


@pytest.mark.parametrize("args", [(-1, 3, 1.0), (1, 0, 1.0), (1, 3, -0.1)])
def test_floor_refuses_impossible_inputs(args: tuple[int, int, float]) -> None:
    with pytest.raises(ValueError):
        flower_floor(*args)


def test_bench_counts_the_deploy_scenarios_nodes() -> None:
    assert get_scenario("deploy-check").size == DEPLOY_NODES


def test_breakdown_averages_steady_rounds_and_phases() -> None:
    lines = [
        {"ok": True, "round": 1, "exchange": "train.secagg_keys", "start": 9.0, "app-import": 9.0,
         "handler": 9.0, "phases": {"imports": 9.0}, "loaded": ["torch"]},
        {"ok": True, "round": 2, "exchange": "train.secagg_keys", "start": 1.0, "app-import": 0.5,
         "handler": 4.0, "phases": {"imports": 3.0, "training": 0.5}, "loaded": ["torch"]},
        {"ok": True, "round": 2, "exchange": "train.secagg_keys", "start": 2.0, "app-import": 0.5,
         "handler": 6.0, "phases": {"imports": 5.0}, "loaded": []},
        {"ok": False, "round": 2, "exchange": "train.secagg_mask", "start": 1.0, "app-import": 0.1,
         "handler": 0.1, "phases": {}, "loaded": []},
    ]  # fmt: skip
    out = exchange_breakdown(lines, first_round=2)
    assert set(out) == {"train.secagg_keys"}  # round 1 and the failed exchange are left out
    keys = out["train.secagg_keys"]
    assert keys["start"] == pytest.approx(1.5)
    assert keys["handler"] == pytest.approx(5.0)
    assert keys["imports"] == pytest.approx(4.0)
    assert keys["training"] == pytest.approx(0.25)  # a process without the phase counts 0
    assert keys["processes"] == 2.0
    assert keys["torch-loaded"] == pytest.approx(0.5)
