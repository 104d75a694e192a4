"""Every device class on Flower's deployment engine with TLS, node authentication and secure
aggregation: phones, TVs and watches as registered SuperNodes on 127.0.0.1, two secure rounds,
held-out metrics of every task logged. Slow (each exchange a ClientApp process per node, forked by
its warm executor; six nodes with MiniLM and IMU models on two cores): `-m slow`.

Two devices per class, not one: a secure sum of a single device is that device's update, so
fedge's secure aggregation needs at least two devices of a task per round (`secagg-min-devices`,
default 3, set to 2 here).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from simulations.deploy import down, run, up

pytestmark = pytest.mark.slow
DEADLINE_S = 1500


def test_phones_tvs_and_watches_train_securely_over_tls_and_node_auth(
    tmp_path: Any, run_processes: Any
) -> None:
    out = tmp_path / "out"
    lines: list[str] = []
    config = {
        "scenario": "deploy-mixed",
        "seed": 0,
        "out-dir": str(out),
        "device-clock": False,
        "secagg-min-devices": 2,  # two devices per task (the default, 3, would sit every task out)
    }
    with run_processes(deadline_s=DEADLINE_S + 120) as procs:
        state = up("deploy-mixed", tmp_path / "deployment")
        try:
            code = run(state, config, on_line=lines.append, timeout_s=DEADLINE_S)
        finally:
            down(state)
    assert not procs.timed_out and code == 0, "\n".join(lines[-40:])
    assert not procs.leftovers(), procs.leftovers()
    assert not procs.non_loopback(), procs.non_loopback()
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["devices"] == {"phone": 2, "tv": 2, "sensor": 2}
    for entry in rounds[1:]:
        assert entry["secure"] is True
        assert entry["participants"] == {"phone": 2, "tv": 2, "sensor": 2}, entry
    # held-out metrics of every task: server-side for phone and watch, on the devices for the TV
    for task, metric in (("phone", "top1"), ("sensor", "accuracy")):
        values = [r["eval"][task][metric] for r in rounds]
        assert all(math.isfinite(v) for v in values), (task, values)
    assert rounds[2]["eval"]["sensor"]["accuracy"] > rounds[0]["eval"]["sensor"]["accuracy"]
    assert "auc" in rounds[2]["federated"]["tv"] and "auc" in rounds[0]["federated"]["tv"]
