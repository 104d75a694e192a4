"""A SuperNode killed in the middle of a secure round, on a local deployment (TLS, node
authentication, certified secure-aggregation keys; everything on 127.0.0.1, stopped by PID).

Four watches, all of them every round, three rounds. In round 1, as soon as the server has every
device's keys and has moved on to the masking exchange, one watch whose masked vector has not
come back yet is killed: its SuperNode's whole process group (SuperNode, SuperExec, ClientApp
process), by PID, with SIGKILL. The round must then complete through secure aggregation's
dropout recovery (the survivors reveal the vanished device's pairwise seeds; at n = 4 the
neighbour graph is complete with threshold 2, so one vanished device is recoverable) or abort
that task's sum cleanly (global model unchanged); either way the run goes on: round 2 runs, and
the node, restarted with the same key and node config, rejoins and trains again.

Why four watches and not "a phone, a TV and a watch": a secure sum of one device would be that
device's update, so secure aggregation needs at least `secagg-min-devices` (>= 2) devices of a
task in a round, and a sum that must survive one device vanishing needs a third and fourth
(with three, each survivor's self-mask seed has only one live neighbour holding a share, below
the threshold of 2, and the round could only abort). Every device class over the same
deployment is test_deploy_fleet.py's (two per class). Slow: ~3 rounds of fresh ClientApp
processes per exchange on two cores, plus the round's wait for the dead node (`-m slow`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from simulations.deploy import NodeSpec, down, run, start_supernode, up

pytestmark = pytest.mark.slow
DEADLINE_S = 1500

SCENARIO = """\
[scenario]
name = "deploy-kill"
description = "4 watches, all every round: one SuperNode killed mid-round, then restarted"
fleet = { "sensor/low" = 2, "sensor/high" = 2 }
per_round = { sensor = 4 }
rounds = 3
local_steps = { sensor = 10 }
device_clock = false
"""


def _exchanges(path: Path) -> list[dict[str, Any]]:
    calls = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):  # a line still being written
            calls.append(json.loads(line))
    return calls


def _wait(what: str, until: Any, deadline: float) -> Any:
    while time.monotonic() < deadline:
        found = until()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_supernode_killed_mid_round_is_recovered_from_and_rejoins(
    tmp_path: Path, run_processes: Any
) -> None:
    scenario = tmp_path / "deploy-kill.toml"
    scenario.write_text(SCENARIO)
    out, log = tmp_path / "out", tmp_path / "exchanges.jsonl"
    config = {
        "scenario": str(scenario),
        "seed": 0,
        "out-dir": str(out),
        "federated-eval-every": -1,
        "device-clock": False,
        "secagg-min-devices": 2,
        "round-timeout": 150.0,  # how long a stage waits for the dead node
    }
    lines: list[str] = []
    result: dict[str, int] = {}
    with run_processes(deadline_s=DEADLINE_S + 180) as procs:
        state = up(str(scenario), tmp_path / "deployment", exchange_log=log)
        try:
            runner = threading.Thread(
                target=lambda: result.update(
                    code=run(state, config, on_line=lines.append, timeout_s=DEADLINE_S)
                ),
                daemon=True,
            )
            runner.start()
            deadline = time.monotonic() + DEADLINE_S

            def mask_stage_began() -> list[str]:  # devices not yet done with round 1's mask
                calls = [c for c in _exchanges(log) if c.get("round") == 1]
                if not any(c["exchange"] == "train.secagg_mask" for c in calls):
                    return []
                masked = {c["device"] for c in calls if c["exchange"] == "train.secagg_mask"}
                keyed = {c["device"] for c in calls if c["exchange"] == "train.secagg_keys"}
                return sorted(keyed - masked)

            victim = _wait("round 1's masking exchange", mask_stage_began, deadline)[0]
            spec = next(NodeSpec(**n) for n in state.nodes if n["name"] == victim)
            pid = state.pids[f"supernode-{victim}"]
            os.killpg(pid, signal.SIGKILL)  # the node, its SuperExec and its ClientApp process
            killed_at = time.monotonic()
            _wait("round 1's metrics", lambda: (out / "metrics.jsonl").exists()
                  and len((out / "metrics.jsonl").read_text().splitlines()) >= 2, deadline)  # fmt: skip
            restarted = start_supernode(state, victim, state.node_config(spec))
            runner.join(timeout=max(1.0, deadline - time.monotonic()))
            node_log = (state.logs / f"supernode-{victim}.log").read_text()
        finally:
            down(state)
    assert not procs.timed_out and result.get("code") == 0, "\n".join(lines[-40:])
    assert not procs.leftovers(), procs.leftovers()
    assert not procs.non_loopback(), procs.non_loopback()
    assert restarted.pid != pid and time.monotonic() > killed_at

    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3], [r["round"] for r in rounds]
    first = rounds[1]
    if first["aborted"]:  # aborted cleanly: the sum was not applied, the model stayed as it was
        assert first["aborted"] == ["sensor"] and first["eval"] == rounds[0]["eval"], first
    else:  # completed through dropout recovery, without the vanished watch
        assert first["participants"] == {"sensor": 3} and first["vanished"] == 1, first
        assert first["eval"]["sensor"]["accuracy"] > rounds[0]["eval"]["sensor"]["accuracy"]
    assert all(r["secure"] for r in rounds[1:])
    # the run went on, and the restarted node rejoined (same registered key) and trained again
    assert node_log.count("SuperNode ID:") == 2, node_log[-2000:]
    later = [c for c in _exchanges(log) if c.get("round", 0) >= 2 and c["device"] == victim]
    assert any(c["exchange"] == "train.secagg_keys" and c["ok"] for c in later), later
    assert rounds[3]["participants"] == {"sensor": 4}, rounds[3]
