"""The served moving average on the server (`served-average`): devices train from the latest
global state; the server evaluates, sends for evaluation, checkpoints and exports the average."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federation.config import RunConfig
from federation.errors import FedgeError
from server import loop
from server.loop import RunState
from server.round import MetricsEntry

CONFIG = {"scenario": "deploy-check", "seed": 3, "secure-aggregation": False, "served-average": 0.5}


def _run(out: Path, **changes: Any) -> RunState:
    config = {**CONFIG, "out-dir": str(out), **changes}
    return RunState(None, RunConfig.parse(config), 0, config)  # type: ignore[arg-type]


def _moved(state: dict[str, np.ndarray], by: float) -> dict[str, np.ndarray]:
    return {k: (v + by).astype(v.dtype) for k, v in state.items()}


def test_rounds_train_from_the_latest_state_and_serve_the_average(tmp_path: Path) -> None:
    fed = _run(tmp_path)
    start = {k: v.copy() for k, v in fed.state.items()}
    assert fed.served is None and fed.served_state is fed.state  # round 0: the start itself
    fed.advance(_moved(start, 1.0))
    assert all(np.array_equal(fed.served_state[k], start[k] + np.float32(1.0)) for k in start)
    fed.advance(_moved(start, 3.0))
    for k in start:
        assert np.array_equal(fed.state[k], (start[k] + 3.0).astype(start[k].dtype))  # training's state
        np.testing.assert_allclose(fed.served_state[k], start[k] + 2.0, atol=1e-5)  # 0.5 x 1 + 0.5 x 3
    plain = _run(tmp_path / "plain", **{"served-average": 0.0})
    plain.advance(_moved(start, 1.0))
    plain.advance(_moved(start, 3.0))
    assert plain.served is None and plain.served_state is plain.state


@pytest.mark.usefixtures("flower_task_identity")
def test_the_server_evaluates_and_sends_the_served_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = _run(tmp_path)
    start = {k: v.copy() for k, v in fed.state.items()}
    before = fed.evaluate_server()["sensor"]
    fed.served = start  # served: the start; latest: a state whose head is ruined
    fed.state = {k: (v * 50.0 if "head" in k else v) for k, v in start.items()}
    assert fed.evaluate_server()["sensor"] == before
    fed.served = None
    assert fed.evaluate_server()["sensor"] != before  # the ruined head, when it is what is served

    sent: list[Any] = []
    monkeypatch.setattr(loop, "send_and_stream", lambda grid, messages, timeout: sent.extend(messages) or [])
    fed.registry.nodes[7] = type("Node", (), {"task": "sensor", "device_class": "sensor"})()
    monkeypatch.setattr(fed.registry, "of_task", lambda task: [7])
    fed.served = start
    fed.evaluate_federated(1, ("sensor",))
    arrays = {k: v.numpy() for k, v in sent[0].content["arrays"].items()}
    assert arrays and all(np.array_equal(arrays[k], start[f"sensor/{k}"]) for k in arrays)


def test_the_checkpoint_carries_the_average_and_a_resumed_run_continues_it(tmp_path: Path) -> None:
    fed = _run(tmp_path)
    start = {k: v.copy() for k, v in fed.state.items()}
    fed.advance(_moved(start, 1.0))
    fed.advance(_moved(start, 3.0))
    fed.write(MetricsEntry(round=2, eval={}, federated={}, wall_seconds=1.0))
    resumed = _run(tmp_path, **{"initial-checkpoint": str(tmp_path / "checkpoint.safetensors")})
    assert resumed.start_round == 3 and resumed.served is not None
    for k in start:
        assert np.array_equal(resumed.state[k], fed.state[k])
        assert np.array_equal(resumed.served[k], fed.served[k])
    resumed.advance(_moved(start, 5.0))  # 0.5 x 2 + 0.5 x 5
    key = next(iter(start))
    np.testing.assert_allclose(resumed.served_state[key], start[key] + 3.5, atol=1e-5)


def test_a_checkpoint_whose_served_average_does_not_match_is_refused_at_start(tmp_path: Path) -> None:
    from federation.checkpoint import load_checkpoint, save_checkpoint
    from federation.served_average import SERVED_PREFIX

    fed = _run(tmp_path)
    fed.advance(_moved(fed.state, 1.0))
    fed.write(MetricsEntry(round=1, eval={}, federated={}, wall_seconds=1.0))
    arrays, info = load_checkpoint(tmp_path / "checkpoint.safetensors")
    key = next(k for k in arrays if k.startswith(SERVED_PREFIX))
    arrays[key] = np.zeros(arrays[key].size + 1, dtype=arrays[key].dtype)  # a served array reshaped
    save_checkpoint(tmp_path, arrays, info)
    with pytest.raises(FedgeError, match="served average does not match its global state"):
        _run(tmp_path, **{"initial-checkpoint": str(tmp_path / "checkpoint.safetensors")})


def test_the_export_is_the_served_model(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from server.report import export_adapters

    fed = _run(tmp_path)
    start = {k: v.copy() for k, v in fed.state.items()}
    fed.advance(_moved(start, 1.0))
    fed.advance(_moved(start, 3.0))
    export_adapters(fed, tmp_path / "adapter")
    head = load_file(str(tmp_path / "adapter" / "sensor" / "head.safetensors"))
    for name, value in head.items():
        np.testing.assert_allclose(value, start[f"sensor/head.{name}"] + 2.0, atol=1e-5)


def test_a_bad_decay_and_a_rule_whose_states_do_not_average_are_refused() -> None:
    with pytest.raises(FedgeError, match=r"served-average must lie in \[0, 1\)"):
        RunConfig.parse({**CONFIG, "served-average": 1.0})
    with pytest.raises(FedgeError, match=r"flexlora.*truncated SVD"):
        RunConfig.parse({**CONFIG, "aggregation": "flexlora"})
    assert RunConfig.parse({**CONFIG, "aggregation": "flexlora", "served-average": 0.0}).served_average == 0.0
