"""Crash safety of the server's state: what a checkpoint carries, and what a resumed run starts from.

The server checkpoints after every completed round (global state, round, scenario, seed, the
simulated clock, the run config); a run started with `initial-checkpoint` continues after that
round with the metrics of the rounds it covers, and a round whose metrics line was written but
whose checkpoint was not (a crash between the two) is dropped, so it runs once, not twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from federation.config import RunConfig
from federation.errors import FedgeError
from server.loop import RunState
from server.round import MetricsEntry
from simulations.cli import resume_settings

CONFIG = {"scenario": "deploy-check", "seed": 3, "secure-aggregation": False, "lr": 0.01}


def _crashed_run(out: Path) -> RunState:
    """A run that completed rounds 0 and 1, then died after writing round 2's metrics line but
    before round 2's checkpoint."""
    config = {**CONFIG, "out-dir": str(out)}
    fed = RunState(None, RunConfig.parse(config), 0, config)  # type: ignore[arg-type]
    first = next(iter(fed.state))
    for server_round in (0, 1):
        fed.state[first] = fed.state[first] + 1.0  # a round's update
        fed.sim_time_s += 1000.0 + server_round
        evals = {"sensor": {"accuracy": 0.1 * server_round}}
        fed.write(MetricsEntry(round=server_round, eval=evals, federated={}, wall_seconds=1.0))
    with fed.metrics_path.open("a") as f:
        f.write(json.dumps({"round": 2, "eval": {}}) + "\n")
    return fed


def _resumed(out: Path, **changes: object) -> RunState:
    config = {
        **CONFIG,
        "out-dir": str(out),
        "initial-checkpoint": str(out / "checkpoint.safetensors"),
        **changes,
    }
    return RunState(None, RunConfig.parse(config), 0, config)  # type: ignore[arg-type]


def test_a_resumed_run_starts_after_the_last_checkpointed_round(tmp_path: Path) -> None:
    crashed = _crashed_run(tmp_path)
    resumed = _resumed(tmp_path)
    assert resumed.start_round == 2  # round 2 runs again: its checkpoint was never written
    assert set(resumed.state) == set(crashed.state)
    assert all(np.array_equal(resumed.state[k], crashed.state[k]) for k in crashed.state)
    assert resumed.sim_time_s == crashed.sim_time_s  # the simulated clock goes on, not from the start
    assert [e["round"] for e in resumed.history] == [0, 1]
    lines = [json.loads(x) for x in resumed.metrics_path.read_text().splitlines()]
    assert [e["round"] for e in lines] == [0, 1]  # the half-done round's line is gone: no round twice


def test_the_checkpoint_carries_the_run_config_and_resume_settings_use_it(tmp_path: Path) -> None:
    _crashed_run(tmp_path)
    info = json.loads((tmp_path / "checkpoint.json").read_text())
    assert info["round"] == 1 and info["scenario"] == "deploy-check" and info["seed"] == 3
    assert info["run_config"]["lr"] == 0.01 and info["run_config"]["secure-aggregation"] is False
    scenario, rounds, seed, out, sets = resume_settings(tmp_path, {"round-timeout": 30.0})
    assert (scenario, rounds, seed, out) == ("deploy-check", None, 3, tmp_path.resolve())
    assert sets["lr"] == 0.01 and sets["secure-aggregation"] is False and sets["round-timeout"] == 30.0
    assert sets["initial-checkpoint"] == str(tmp_path.resolve() / "checkpoint.safetensors")


def test_resuming_with_another_seed_or_without_a_checkpoint_fails_clearly(tmp_path: Path) -> None:
    _crashed_run(tmp_path)
    with pytest.raises(FedgeError, match="seed 3, this run's is 4"):
        _resumed(tmp_path, seed=4)
    with pytest.raises(FedgeError, match=r"no checkpoint\.json"):
        resume_settings(tmp_path / "elsewhere", {})


def test_a_checkpoint_with_other_keys_is_refused_naming_them(tmp_path: Path) -> None:
    """A checkpoint of another fedge version (here the sensor head's output layer under its old
    name, `head.out`) is refused, and the message names what differs."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    _crashed_run(tmp_path)
    path = tmp_path / "checkpoint.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
        state = {k.replace("head.classes.", "head.out."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert "sensor/head.out.weight" in state
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(FedgeError, match="does not match this run's model") as refused:
        _resumed(tmp_path)
    message = str(refused.value)
    assert "lacks sensor/head.classes.bias, sensor/head.classes.weight" in message
    assert "has unknown sensor/head.out.bias, sensor/head.out.weight" in message
