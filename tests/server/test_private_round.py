"""Distributed DP and the plain norm bound through the server's real rounds (`RunState.train_round`)
against the real device handlers, over the in-memory Grid of test_secure_round.py.

- DP on: the round's devices clip, rotate, round and noise inside the secure vector; the server
  decodes, applies, and writes the accountant's entry (epsilon per round, growing).
- a device whose run config promises less noise refuses the round before it trains.
- plain rounds with `max-update-norm`: a norm-boosted device is clipped by the server, counted,
  and its pull on the global adapter is bounded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message
from test_secure_round import LogLines, _federation, _on, _snapshot, log_lines  # noqa: F401

from federation.secagg.packing import packed_size
from federation.secagg.vector import vector_length
from server.round import MetricsEntry

pytestmark = pytest.mark.usefixtures("flower_task_identity")
DP = {"dp-mechanism": "distributed-discrete-gaussian", "dp-noise-multiplier": 1.0, "dp-clip": 0.5}


@pytest.mark.parametrize("mechanism", ["distributed-discrete-gaussian", "skellam"])
def test_private_rounds_apply_noisy_sums_and_account_for_them(
    app: Any,
    tmp_path: Path,
    cache_dir: Path,
    log_lines: LogLines,  # noqa: F811
    mechanism: str,
) -> None:
    fed, _ = _federation(app, tmp_path, cache_dir, **{**DP, "dp-mechanism": mechanism})
    before = _snapshot(fed)
    first = fed.train_round(1)
    second = fed.train_round(2)
    assert first.aborted == [] and first.participants == {"sensor": 10}
    assert any(not np.array_equal(fed.state[k], before[k]) for k in before)  # the noisy sum was applied
    p1, p2 = first.privacy, second.privacy
    assert p1 is not None and p2 is not None
    assert p1["epsilon"] == pytest.approx(p1["round_epsilon"]) and 0 < p1["epsilon"] < p2["epsilon"]
    assert p2["round_epsilon"] == pytest.approx(p1["round_epsilon"])
    assert p1["delta"] == 1e-5 and p1["noise_multiplier"] == 1.0 and 0 <= p1["wrap_probability"] < 1e-12
    assert p1["per_task"]["sensor"]["survivors"] == 10
    line = json.loads(json.dumps(MetricsEntry(1, {}, {}, 1.0, train=first).to_json()))
    assert line["privacy"]["epsilon"] == pytest.approx(p1["epsilon"])
    assert f"{mechanism} noise, multiplier 1 of 10 planned devices" in log_lines.text()
    # the simulated clock sizes a device's upload as the private vector the round really masked
    m = int(re.search(r"secure sum of 10 devices \(m=(\d+) bits", log_lines.text()).group(1))
    length = vector_length(fed.run.rule, fed.task_shapes("sensor"), dp=True)
    assert fed.upload_bytes("sensor") == packed_size(length, m)
    assert "modulus wrap probability" in log_lines.text()


def test_a_device_promised_more_noise_refuses_the_round_before_training(
    app: Any, tmp_path: Path, cache_dir: Path
) -> None:
    """The server plans noise multiplier 1.0; the devices' own config says 2.0: every device
    refuses the parameters, nothing is aggregated, the global state is unchanged."""
    fed, grid = _federation(app, tmp_path, cache_dir, **DP)
    for context in grid.contexts.values():
        context.run_config["dp-noise-multiplier"] = 2.0
    before = _snapshot(fed)
    result = fed.train_round(1)
    assert result.failures == 10 and result.participants == {}
    assert all(np.array_equal(fed.state[k], before[k]) for k in before)


def test_plain_rounds_clip_a_boosted_update_to_max_update_norm(
    app: Any,
    tmp_path: Path,
    cache_dir: Path,
    log_lines: LogLines,  # noqa: F811
) -> None:
    """One watch multiplies its update 1000x. With max-update-norm the server clips it (logged,
    counted in `clipped`), and the global adapter moves by no more than its weight's share of
    the bound beyond where the honest devices alone would take it."""
    bound = 0.05
    plain = {"secure-aggregation": False}
    fed, grid = _federation(app, tmp_path, cache_dir, **plain, **{"max-update-norm": bound})
    honest_fed, honest_grid = _federation(app, tmp_path / "honest", cache_dir, **plain)
    hostile = sorted(fed.registry.nodes)[2]

    def boost(reply: Message) -> Message:
        arrays = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord(
            {k: Array(v.numpy() if k.endswith("#weight") else v.numpy() * 1000) for k, v in arrays.items()}
        )
        return reply

    grid.hooks.append(_on("train", {hostile}, boost))
    before = _snapshot(fed)
    result = fed.train_round(1)
    assert result.clipped >= 1 and "max-update-norm 0.05: clipped to it" in log_lines.text()
    assert MetricsEntry(1, {}, {}, 1.0, train=result).to_json()["clipped"] == result.clipped
    # the honest devices alone (the hostile one's reply dropped), the same round
    honest_grid.hooks.append(_on("train", {sorted(honest_fed.registry.nodes)[2]}, lambda reply: None))
    honest_fed.train_round(1)
    moved = np.sqrt(sum(np.sum((fed.state[k] - honest_fed.state[k]) ** 2) for k in before))
    drift = np.sqrt(sum(np.sum((honest_fed.state[k] - before[k]) ** 2) for k in before))
    assert moved <= bound + drift  # weight share <= 1: the bound plus the honest mean's own length
