"""Secure aggregation under dropouts, through Flower's simulation engine.

`dropout-after-keys` makes a seeded fraction of devices vanish after step 1 (they answer the
keys + training exchange, then fail the mask exchange), as phones that lose Wi-Fi would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.cli import simulate_scenario

DEADLINE_S = 900  # a hung simulation is stopped and fails its test instead of blocking the suite


def _simulate(run_processes: Any, out: Path, sets: dict[str, object]) -> Path:
    """A 2-round `dropout-check` run, its processes found and stopped by the test's deadline."""
    with run_processes(deadline_s=DEADLINE_S) as procs:
        try:
            return simulate_scenario("dropout-check", 2, 0, out, sets, quiet=True)
        finally:
            assert not procs.timed_out, f"the simulation ran past {DEADLINE_S} s and was stopped"


def _rounds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def some_vanish(tmp_path_factory: pytest.TempPathFactory, run_processes: Any) -> Path:
    # 10 watches in one group (complete graph, k = 9, threshold t = 5): 30% may vanish
    sets = {"dropout-after-keys": 0.3, "federated-eval-every": -1}
    return _simulate(run_processes, tmp_path_factory.mktemp("drop"), sets)


@pytest.fixture(scope="module")
def most_vanish(tmp_path_factory: pytest.TempPathFactory, run_processes: Any) -> Path:
    # 75% vanish after keys: with seed 0 the seeded draw leaves 2 watches in round 1 and 4 in
    # round 2, i.e. 1 <= survivors < t = 5 (not zero survivors, which would test nothing of the
    # devices' threshold check)
    sets = {"dropout-after-keys": 0.75, "federated-eval-every": -1}
    return _simulate(run_processes, tmp_path_factory.mktemp("abort"), sets)


def test_rounds_complete_over_the_survivors(some_vanish: Path) -> None:
    rounds = _rounds(some_vanish)[1:]
    assert sum(r["vanished"] for r in rounds) > 0  # the knob really removed devices mid-protocol
    for r in rounds:
        assert r["secure"] is True and r["aborted"] == []
        # every device that did not vanish is in the sum
        assert r["participants"] == {"sensor": r["sampled"] - r["vanished"]}
    log = (some_vanish / "flwr.log").read_text()
    assert "vanished after sharing keys" in log and "secure sum of" in log
    # the model still learned from the survivors
    assert rounds[-1]["eval"]["sensor"]["accuracy"] > _rounds(some_vanish)[0]["eval"]["sensor"]["accuracy"]


def test_below_threshold_the_round_aborts_and_the_model_is_unchanged(most_vanish: Path) -> None:
    rounds = _rounds(most_vanish)
    assert [r["round"] for r in rounds] == [0, 1, 2]  # the next round ran
    for r in rounds[1:]:
        assert 1 <= r["sampled"] - r["vanished"] < 5  # some survivors, fewer than the threshold
        assert r["aborted"] == ["sensor"]
        assert r["participants"] == {}
        # nothing was applied: the server-side held-out results are those of round 0, exactly
        assert r["eval"] == rounds[0]["eval"]
    log = (most_vanish / "flwr.log").read_text()
    assert "below the threshold 5" in log  # the survivors refused to reveal
    assert "update aborted, global sensor model unchanged" in log
