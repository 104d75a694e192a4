"""The same apps on Flower's deployment engine: a SuperLink and SuperNodes on 127.0.0.1.

`fedge deploy-local` starts `flower-superlink` and one `flower-supernode` per device (each with
`--node-config "device-class='sensor' partition-id=N"`, as a real node would say who it is), runs
the app with `flwr run . <connection>`, and stops every process by PID. A round here is secure
aggregation's three exchanges, each a fresh ClientApp process per node (Flower's default
isolation), so the scenario is three watches and one round.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from simulations.deploy import deploy_local

FLOWER = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-clientapp", "flwr-serverapp")


def _flower_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(name in cmd for name in FLOWER):
            pids.add(proc.pid)
    return pids


def test_secure_round_in_a_loopback_deployment(tmp_path: Path) -> None:
    before = _flower_pids()
    lines: list[str] = []
    config = {
        "scenario": "deploy-check",
        "seed": 0,
        "out-dir": str(tmp_path),
        "federated-eval-every": -1,
        "device-clock": False,  # real nodes: every connected node is available
    }
    code = deploy_local(config, on_line=lines.append, log_dir=tmp_path / "logs", timeout_s=900)
    assert code == 0, "\n".join(lines[-30:])
    assert not (_flower_pids() - before), "deployment processes left running"
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["secure"] is True and rounds[1]["participants"] == {"sensor": 3}
    assert rounds[1]["eval"]["sensor"]["accuracy"] > rounds[0]["eval"]["sensor"]["accuracy"]
    # every SuperNode and the SuperLink listened on loopback only (their logs name the address)
    superlink_log = (tmp_path / "logs" / "superlink.log").read_text()
    assert "127.0.0.1" in superlink_log and "0.0.0.0" not in superlink_log
