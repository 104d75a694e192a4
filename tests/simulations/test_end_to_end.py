"""One small end-to-end run through Flower's simulation engine (`flwr run`, Ray on loopback).

It checks what a user of `fedge simulate --scenario smoke` relies on: the run finishes, every
output is there, held-out loss falls for the wholly shared tasks, the final metric beats the
pretrained start, nothing the run started is left running, and no process of the run (Ray's
included) listens or connects anywhere but loopback.

The processes are those of this run only (descendants of the test, or carrying the run's
marker in their environment), so a concurrent run elsewhere on the machine cannot fail it.
The run is seeded: device sampling, data, batches and initial models are fixed by seed 0, and
the only randomness left (stochastic rounding in secure aggregation, at 2^-24 of the clip)
moves metrics far less than the margins asserted below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.cli import simulate_scenario

DEADLINE_S = 900


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, run_processes: Any) -> tuple[Path, Any]:
    with run_processes(deadline_s=DEADLINE_S) as procs:
        try:
            out = simulate_scenario("smoke", None, 0, tmp_path_factory.mktemp("smoke"), {}, quiet=True)
        finally:
            assert not procs.timed_out, f"the smoke simulation ran past {DEADLINE_S} s and was stopped"
    return out, procs


def test_outputs_exist(smoke_run: tuple[Path, Any]) -> None:
    out, _ = smoke_run
    for name in ("metrics.jsonl", "summary.json", "checkpoint.safetensors", "checkpoint.json", "flwr.log"):
        assert (out / name).is_file(), name
    for task in ("phone", "tv", "sensor"):
        assert (out / "adapter" / task / "adapter_config.json").is_file()
        assert (out / "plots" / f"{task}.png").is_file()


def test_held_out_loss_falls_and_metrics_improve(smoke_run: tuple[Path, Any]) -> None:
    out, _ = smoke_run
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # Phone is the task with enough held-out data in a 2-round smoke run for its loss to be a
    # stable signal (the smoke watches hold a few recordings each; their loss is noisy). The
    # trend over the run is asserted, not each round's step.
    losses = [r["eval"]["phone"]["loss"] for r in rounds]
    assert losses[-1] < losses[0], losses
    summary = json.loads((out / "summary.json").read_text())
    for task, result in summary["tasks"].items():
        assert result["final"] > result["initial"], (task, result)
    participants = sum(sum(r.get("participants", {}).values()) for r in rounds)
    assert participants == 2 * 9  # 2 rounds x (3 phones + 3 TVs + 3 watches), none failed
    assert all(r.get("failures", 0) == 0 and r.get("rejected", 0) == 0 for r in rounds)


def test_nothing_the_run_started_is_left_running(smoke_run: tuple[Path, Any]) -> None:
    _, procs = smoke_run
    names = list(procs.names.values())
    assert any("flwr" in n for n in names) and any("ray" in n.lower() for n in names), names
    assert not procs.leftovers(), procs.leftovers()


def test_the_run_listens_and_connects_on_loopback_only(smoke_run: tuple[Path, Any]) -> None:
    _, procs = smoke_run
    assert any(s.kind == "listen" for s in procs.sockets), "the watch saw no listening socket"
    assert not procs.non_loopback(), procs.non_loopback()


def test_the_run_ends_with_a_done_status(smoke_run: tuple[Path, Any]) -> None:
    out, _ = smoke_run
    status = json.loads((out / "status.json").read_text())
    assert status == {"stage": "done", "rounds": 2}


def test_a_run_the_server_refuses_fails_with_the_servers_reason(tmp_path: Path, run_processes: Any) -> None:
    """A setting only the server can check (the CA of certified keys is read when the run starts):
    the user's error names it, read from the run's status.json, not from Flower's log text."""
    from federation.errors import FedgeError

    missing_ca = {"secagg-pki": str(tmp_path / "no-ca")}
    with run_processes(deadline_s=300), pytest.raises(FedgeError) as refused:
        simulate_scenario("smoke", 1, 0, tmp_path / "run", missing_ca, quiet=True)
    message = str(refused.value)
    assert "simulation failed" in message and "secagg-pki" in message and "flwr.log" in message, message
