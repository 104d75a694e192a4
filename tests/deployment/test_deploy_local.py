"""The same apps on Flower's deployment engine: a SuperLink and SuperNodes on 127.0.0.1.

`fedge deploy-local` starts `flower-superlink` and one `flower-supernode` per device (each with
`--node-config "device-class='sensor' partition-id=N"`, as a real node would say who it is), runs
the app with `flwr run . <connection>`, and stops every process by PID. A round here is secure
aggregation's three exchanges, each a fresh ClientApp process per node (Flower's default
isolation), so the scenario is three watches and one round.

While it runs, the processes it started (found as descendants of this test, or by a marker in
their environment) are sampled with their sockets: every listening socket must be bound to
loopback, and every connection must go to loopback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from federation.errors import FedgeError
from simulations.deploy import deploy_local

DEADLINE_S = 600  # deploy_local's own; the watch below kills the run a minute later still


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, run_processes: Any) -> tuple[Path, Any, int]:
    out = tmp_path_factory.mktemp("deploy")
    lines: list[str] = []
    config = {
        "scenario": "deploy-check",
        "seed": 0,
        "out-dir": str(out),
        "federated-eval-every": -1,
        "device-clock": False,  # real nodes: every connected node is available
    }
    with run_processes(deadline_s=DEADLINE_S + 60) as procs:
        code = deploy_local(config, on_line=lines.append, log_dir=out / "logs", timeout_s=DEADLINE_S)
    assert not procs.timed_out, "deploy_local hung past its own deadline"
    assert code == 0, "\n".join(lines[-30:])
    return out, procs, code


def test_a_secure_round_completes_and_learns(deployment: tuple[Path, Any, int]) -> None:
    out, _, _ = deployment
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["secure"] is True and rounds[1]["participants"] == {"sensor": 3}
    # seeded run: a fresh head (~0.02) against one secure round of three watches (~0.2)
    assert rounds[1]["eval"]["sensor"]["accuracy"] > rounds[0]["eval"]["sensor"]["accuracy"]


def test_nothing_the_deployment_started_is_left_running(deployment: tuple[Path, Any, int]) -> None:
    _, procs, _ = deployment
    assert any("flower-superlink" in name for name in procs.names.values()), "the watch saw no SuperLink"
    assert not procs.leftovers(), procs.leftovers()


def test_every_node_listens_and_connects_on_loopback_only(deployment: tuple[Path, Any, int]) -> None:
    _, procs, _ = deployment
    listening = {s for s in procs.sockets if s.kind == "listen"}
    # the SuperLink's and every SuperNode's port were seen listening (the watch is not blind)
    assert sum("flower-supernode" in s.process for s in listening) >= 3, sorted(listening, key=str)
    assert any("flower-superlink" in s.process for s in listening), sorted(listening, key=str)
    assert not procs.non_loopback(), procs.non_loopback()


def test_a_deployment_past_its_deadline_fails_clearly_and_stops_everything(
    tmp_path: Path, run_processes: Any
) -> None:
    """A run that cannot finish in time (here: 3 s, less than starting the app takes) is stopped
    by deploy_local's watchdog, whether or not it prints, with every process it started."""
    config = {"scenario": "deploy-check", "seed": 0, "out-dir": str(tmp_path), "device-clock": False}
    with run_processes(deadline_s=180) as procs, pytest.raises(FedgeError, match=r"did not finish within \d+ s"):
        deploy_local(config, log_dir=tmp_path / "logs", timeout_s=3)
    assert not procs.timed_out
    assert any("flower-superlink" in name for name in procs.names.values()), procs.names
    assert not procs.leftovers(), procs.leftovers()
