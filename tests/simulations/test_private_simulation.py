"""Distributed DP through Flower's simulation engine: secure aggregation with discrete Gaussian
noise shares, devices vanishing mid-protocol, and epsilon per round in metrics.jsonl and the
summary (docs/privacy.md). Slow: ~2 minutes on 2 shared cores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.cli import simulate_scenario

DEADLINE_S = 900


@pytest.mark.slow
def test_a_private_run_writes_epsilon_per_round(tmp_path: Path, run_processes: Any) -> None:
    sets = {"dp-mechanism": "distributed-discrete-gaussian", "dp-noise-multiplier": 2.0, "dp-clip": 1.0,
            "dropout-after-keys": 0.2, "federated-eval-every": -1}  # fmt: skip
    with run_processes(deadline_s=DEADLINE_S) as procs:
        try:
            out = simulate_scenario("dropout-check", 2, 0, tmp_path / "dp", sets, quiet=True)
        finally:
            assert not procs.timed_out, f"the simulation ran past {DEADLINE_S} s and was stopped"
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2] and "privacy" not in rounds[0]
    privacy = [r["privacy"] for r in rounds[1:]]
    for r, p in zip(rounds[1:], privacy, strict=True):
        assert r["secure"] is True and r["aborted"] == []
        assert (
            p["delta"] == 1e-5
            and p["noise_multiplier"] == 2.0
            and p["mechanism"] == "distributed-discrete-gaussian"
        )
        assert 0 < p["round_epsilon"] <= p["epsilon"] and 0 <= p["wrap_probability"] < 1e-12
        survivors = p["per_task"]["sensor"]["survivors"]
        assert survivors == r["sampled"] - r["vanished"] == r["participants"]["sensor"]
        # the survivors' noise is what is charged: fewer survivors, less noise, a dearer round
        assert p["per_task"]["sensor"]["effective_noise_multiplier"] == pytest.approx(
            2.0 * (survivors / 10) ** 0.5
        )
    assert privacy[1]["epsilon"] > privacy[0]["epsilon"]  # it composes
    assert sum(r["vanished"] for r in rounds[1:]) > 0  # the knob removed devices mid-protocol
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(privacy[1]["epsilon"])
    log = (out / "flwr.log").read_text()
    assert "distributed-discrete-gaussian noise, multiplier 2 of 10 planned devices" in log
